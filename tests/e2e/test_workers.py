"""Two workers and the fast path: the supervisor loads the XDP program once, each worker installs
its own clients' routes in the shared maps, and the kernel carries the traffic of both.

Clients behind the masquerading NAT are opened until each worker has one (the kernel picks the
worker by 4-tuple; the relay's log says which); then each exchanges datagrams with a peer on the
internet, and the program's per-route counters must account for every one of them, also after
the other worker's client has gone (next hops are kept by the supervisor for all workers).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from tests.e2e.helpers import (
    assert_intact,
    channel_route,
    counters_note,
    misses,
    route_deltas,
    run,
    udp_route,
)
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import (
    INTERNET_HOST_IPV4,
    EndpointSpec,
    RelayProcess,
    TurnEndpoint,
    UdpPeer,
    exchange,
    xdp_attached,
)

pytestmark = pytest.mark.kernel

WORKERS = 2
COUNT = 1_000
TRIES = 40  # clients opened at most to reach every worker (each misses one with p = 1/2)
V4 = Family.IPV4


def client_is(client: TurnEndpoint) -> Callable[[dict[str, Any]], bool]:
    mapped = str(client.mapped)
    return lambda record: record.get("client") == mapped


def test_routes_of_both_workers_are_carried_in_the_kernel(world: Testbed) -> None:
    relay = RelayProcess(world, "relay", fastpath=True, workers=WORKERS)
    node = relay.relay
    with relay:
        assert relay.fastpath_mode == "native"
        relay.wait_for("listening", where=lambda r: r.get("workers") == WORKERS)

        async def scenario() -> None:
            async with AsyncExitStack() as stack:
                peer = await UdpPeer.open("peer", world.inet_netns, INTERNET_HOST_IPV4)
                stack.callback(peer.close)
                by_worker: dict[int, TurnEndpoint] = {}
                for _ in range(TRIES):
                    client = await TurnEndpoint.open(EndpointSpec(world, "client", relay.server()))
                    stack.push_async_callback(client.close)
                    opened = relay.wait_for("allocation opened", where=client_is(client))
                    by_worker.setdefault(opened["worker"], client)
                    if len(by_worker) == WORKERS:
                        break
                assert sorted(by_worker) == list(range(WORKERS)), "a worker got no client"
                for client in by_worker.values():
                    await client.connect_to(peer.address)
                # Both workers' routes lead to the same NAT address and the same peer: one
                # worker's routes going must not take the other's next hops with them.
                for worker in range(WORKERS):
                    client = by_worker[worker]
                    peer.target = client.relayed_of(V4)
                    before = relay.counters()
                    to_peer, to_client = await exchange(client, peer, COUNT)
                    after = relay.counters()
                    note = f"worker {worker}: {counters_note(before, after)}"
                    assert_intact(to_peer, to_client, note=note)
                    assert route_deltas(before, after) == {
                        channel_route(V4, V4, "udp"): COUNT,
                        udp_route(V4, V4): COUNT,
                    }, note
                    assert misses(before, after) == {}, note
                    await client.close()

        run(scenario())
    assert relay.returncode == 0
    assert not xdp_attached(world, node, node.interface)
    detached = [r for r in relay.records if r.get("message") == "XDP program detached from eth0"]
    assert len(detached) == 1  # by the supervisor, once, after both workers had gone
    assert "worker" not in detached[0]
