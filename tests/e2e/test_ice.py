"""A real ICE stack: two aioice Connections, behind their NATs, restricted to relay candidates on
the same xdpturn relay. Their checks and data go relay -> relay itself (the hairpin); with the
fast path on, the XDP hairpin route carries the data. Each Connection's event loop runs in a
thread inside its site's namespace, so aioice's own sockets live there."""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
import time
from dataclasses import dataclass, field

import aioice
import pytest

from tests.e2e.helpers import channel_route, misses, route_deltas
from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family
from xdpturn.proto.auth import mint_rest_credentials
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import RelayProcess, run_in_netns

pytestmark = [pytest.mark.kernel, pytest.mark.interop]

MESSAGES = 500
STEP = 15.0  # seconds for gathering, the other side's offer, or connectivity checks
Offer = tuple[list[str], str, str]  # candidates (SDP), ufrag, password


@dataclass
class Side:
    name: str
    controlling: bool
    offers: queue.Queue[Offer] = field(default_factory=queue.Queue)  # what this side receives
    connected: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)  # start sending data
    candidate_types: set[str] = field(default_factory=set)
    received: list[bytes] = field(default_factory=list)
    error: BaseException | None = None


async def ice_side(side: Side, other: Side, relay: RelayProcess) -> None:
    server = relay.server(Family.IPV4)
    creds = mint_rest_credentials(relay.secret, now=time.time(), ttl=600, user_id=side.name)
    conn = aioice.Connection(
        ice_controlling=side.controlling,
        components=1,
        turn_server=(str(server.ip), server.port),
        turn_username=creds.username,
        turn_password=creds.password,
        use_ipv6=False,
        transport_policy=aioice.TransportPolicy.RELAY,
    )
    try:
        await asyncio.wait_for(conn.gather_candidates(), STEP)
        side.candidate_types = {c.type for c in conn.local_candidates}
        offer = (
            [c.to_sdp() for c in conn.local_candidates],
            conn.local_username,
            conn.local_password,
        )
        other.offers.put(offer)
        candidates, conn.remote_username, conn.remote_password = await asyncio.to_thread(
            side.offers.get, timeout=STEP
        )
        for sdp in candidates:
            await conn.add_remote_candidate(aioice.Candidate.from_sdp(sdp))
        await conn.add_remote_candidate(None)
        await asyncio.wait_for(conn.connect(), STEP)
        side.connected.set()
        # Data only once the test has read the counters after connecting.
        if not await asyncio.to_thread(side.go.wait, STEP):
            raise TimeoutError("no go from the test")
        for i in range(MESSAGES):
            if side.controlling:
                await conn.send(b"ping %d" % i)
                side.received.append(await asyncio.wait_for(conn.recv(), STEP))
            else:
                data = await asyncio.wait_for(conn.recv(), STEP)
                side.received.append(data)
                await conn.send(data.replace(b"ping", b"pong"))
    except BaseException as exc:
        side.error = exc
    finally:
        await conn.close()


def test_aioice_connections_over_the_relay_to_itself(world: Testbed, fastpath: bool) -> None:
    with RelayProcess(world, "relay", fastpath=fastpath) as relay:
        client, gateway = Side("client", True), Side("gateway", False)
        threads = [
            run_in_netns(world.netns_of(me.name), functools.partial(ice_side, me, you, relay))
            for me, you in ((client, gateway), (gateway, client))
        ]
        connected = all(s.connected.wait(3 * STEP) for s in (client, gateway))
        before = relay.counters()
        for s in (client, gateway):
            s.go.set()
        for t in threads:
            t.join(2 * STEP + MESSAGES * 0.1)
        after = relay.counters()
        assert not any(t.is_alive() for t in threads), "an ICE side did not finish"
    for s in (client, gateway):
        assert s.error is None, f"{s.name}: {s.error!r}"
    assert connected
    assert client.candidate_types == gateway.candidate_types == {"relay"}
    assert client.received == [b"pong %d" % i for i in range(MESSAGES)]
    assert gateway.received == [b"ping %d" % i for i in range(MESSAGES)]
    if fastpath:
        deltas = route_deltas(before, after)
        # Both directions hairpin; consent checks may add a few packets on the same route.
        assert set(deltas) == {channel_route(Family.IPV4, Family.IPV4)}, deltas
        assert deltas[channel_route(Family.IPV4, Family.IPV4)] >= 2 * MESSAGES
        assert misses(before, after) == {}
    else:
        assert before == after == FastPathCounters()
