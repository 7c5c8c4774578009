"""Issue "fast path": a client behind NAT, the relay, a plain UDP peer on the internet.

Channels are bound through the Python relay (`xdpturn serve`); then datagrams flow both ways.
With the fast path on, the XDP program's per-route counters show they took the kernel route;
with it off, the same exchange goes through Python. Stopping the relay leaves no XDP program.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.helpers import (
    MAX_STACK_DATAGRAMS,
    assert_intact,
    assert_not_a_router,
    assert_seen_through_nat,
    channel_route,
    counters_note,
    misses,
    route_deltas,
    run,
    udp_errors,
    udp_in,
    udp_route,
)
from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import (
    INTERNET_HOST_IPV4,
    INTERNET_HOST_IPV6,
    EndpointSpec,
    RelayProcess,
    Report,
    TurnEndpoint,
    UdpPeer,
    exchange,
    xdp_attached,
)

pytestmark = pytest.mark.kernel

COUNT = 2_000
V4, V6 = Family.IPV4, Family.IPV6


@pytest.mark.parametrize(
    ("transport", "relayed"),
    [(V4, V4), (V6, V6), (V4, V6), (V6, V4)],
    ids=["v4-to-v4", "v6-to-v6", "v4-to-v6", "v6-to-v4"],
)
def test_channel_to_a_plain_peer_both_ways(
    world: Testbed, fastpath: bool, transport: Family, relayed: Family
) -> None:
    """Client over `transport`, peer (and relayed address) in `relayed`: all 8 channel <-> UDP
    routes are covered by the four cases."""
    with RelayProcess(world, "relay", fastpath=fastpath) as relay:
        assert relay.fastpath_mode == ("native" if fastpath else "off")
        assert xdp_attached(world, relay.relay, relay.relay.interface) == fastpath
        errors_before = udp_errors(world, "client")
        stack = [0]  # datagrams that reached the relay's UDP stack during the exchange

        async def scenario() -> tuple[Report, Report, FastPathCounters, FastPathCounters]:
            peer_ip = INTERNET_HOST_IPV4 if relayed is V4 else INTERNET_HOST_IPV6
            peer = await UdpPeer.open("peer", world.inet_netns, peer_ip)
            spec = EndpointSpec(world, "client", relay.server(transport), family=relayed)
            client = await TurnEndpoint.open(spec)
            try:
                assert_seen_through_nat(world, relay, client, transport)
                await client.connect_to(peer.address)
                peer.target = client.relayed_of(relayed)
                before = relay.counters()
                stack_before = udp_in(world, "relay")
                to_peer, to_client = await exchange(client, peer, COUNT)
                assert_not_a_router(world, "relay")
                stack[0] = udp_in(world, "relay") - stack_before
                return to_peer, to_client, before, relay.counters()
            finally:
                await client.close()
                peer.close()

        to_peer, to_client, before, after = run(scenario())
    assert relay.returncode == 0
    assert_intact(to_peer, to_client, note=counters_note(before, after))
    assert udp_errors(world, "client") == errors_before
    if fastpath:
        assert route_deltas(before, after) == {
            channel_route(transport, relayed, "udp"): COUNT,
            udp_route(relayed, transport): COUNT,
        }
        assert misses(before, after) == {}
        assert stack[0] <= MAX_STACK_DATAGRAMS
    else:
        assert after == before == FastPathCounters()
        assert stack[0] >= 2 * COUNT


@pytest.mark.parametrize("allocation_open", [False, True], ids=["drained", "allocation-open"])
def test_sigterm_leaves_no_xdp_program(
    world: Testbed, fastpath: bool, allocation_open: bool
) -> None:
    """SIGTERM drains: with no allocation left the relay exits at once; with one still open it
    exits at --drain-timeout. Either way the XDP program is gone from the interface."""
    extra = ["--drain-timeout", "1"] if allocation_open else []
    relay = RelayProcess(world, "relay", fastpath=fastpath, extra_args=extra)
    node = relay.relay
    with relay:
        assert xdp_attached(world, node, node.interface) == fastpath

        async def scenario() -> None:
            client = await TurnEndpoint.open(EndpointSpec(world, "client", relay.server(V4)))
            try:
                if not allocation_open:
                    await client.close()
                # SIGTERM, and asserts that no XDP program is attached afterwards.
                await asyncio.to_thread(relay.stop)
            finally:
                client.abandon()

        run(scenario())
    assert relay.stopped_by == "SIGTERM"
    assert relay.returncode == 0
    assert not xdp_attached(world, node, node.interface)
    messages = [r.get("message") for r in relay.records]
    assert "stopped" in messages
    if fastpath:
        assert "XDP program detached from eth0" in messages
