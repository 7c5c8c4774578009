"""Issue 15 (metering and limits): through the real `xdpturn serve`, between namespaces.

A client behind NAT and a plain UDP peer exchange datagrams through a relay, with the fast path on
(the kernel relays, its per-allocation meters count) and off (Python relays and counts). /status
shows the allocation's traffic per direction equal to what was sent, and the allocation's close
is logged with the same totals. With --max-bps-per-allocation, a client sending at twice the
limit gets the limit through (within a few percent) and the rest is counted as dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest

from tests.e2e.helpers import METRICS, assert_intact, route_deltas, run
from xdpturn.proto.addr import Family
from xdpturn_lab.testbed import Testbed
from xdpturn_lab.testbed.scenario import (
    INTERNET_HOST_IPV4,
    EndpointSpec,
    RelayProcess,
    TurnEndpoint,
    UdpPeer,
    exchange,
)

pytestmark = pytest.mark.kernel

COUNT = 1_000
SIZE = 200
RATE = 400_000  # bits per second: 50,000 bytes, 100 datagrams of 500 bytes
BURST = 0.25  # the relay's burst, in seconds' worth of RATE
LIMITED_SIZE = 500
OFFERED = 200  # datagrams per second: twice the limit
SENT = 400  # 2 s
V4 = Family.IPV4


def status(world: Testbed, relay: RelayProcess) -> dict[str, Any]:
    def fetch() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{METRICS}/status?top=5", timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    result: dict[str, Any] = world.call(relay.relay, fetch)
    return result


def traffic_of(world: Testbed, relay: RelayProcess, port: int) -> dict[str, dict[str, int]]:
    (top,) = [t for t in status(world, relay)["top"] if t["relay_port"] == port]
    traffic: dict[str, dict[str, int]] = top["traffic"]
    return traffic


def test_meters_count_what_was_sent_per_direction(world: Testbed, fastpath: bool) -> None:
    args = ["--metrics", METRICS]
    with RelayProcess(world, "relay", fastpath=fastpath, extra_args=args) as relay:

        async def scenario() -> tuple[Any, Any, dict[str, dict[str, int]], int]:
            peer = await UdpPeer.open("peer", world.inet_netns, INTERNET_HOST_IPV4)
            client = await TurnEndpoint.open(EndpointSpec(world, "client", relay.server(V4)))
            try:
                await client.connect_to(peer.address)
                peer.target = client.relayed_of(V4)
                to_peer, to_client = await exchange(client, peer, COUNT, size=SIZE)
                port = peer.target.port
                return to_peer, to_client, traffic_of(world, relay, port), port
            finally:
                await client.close()
                peer.close()

        before = relay.counters()
        to_peer, to_client, traffic, port = run(scenario())
        after = relay.counters()
        closed = relay.wait_for("allocation closed", where=lambda r: r["relay_port"] == port)
    assert_intact(to_peer, to_client)
    sent = {"packets": COUNT, "bytes": COUNT * SIZE, "dropped_packets": 0, "dropped_bytes": 0}
    assert traffic == {"client_to_peer": sent, "peer_to_client": sent}
    assert closed["traffic"] == traffic
    if fastpath:  # the kernel carried (nearly) all of it, so its meters are what counted
        assert sum(route_deltas(before, after).values()) >= 2 * COUNT - 20


def test_a_client_over_its_limit_gets_the_limit(world: Testbed, fastpath: bool) -> None:
    args = ["--metrics", METRICS, "--max-bps-per-allocation", str(RATE)]
    with RelayProcess(world, "relay", fastpath=fastpath, extra_args=args) as relay:

        async def scenario() -> tuple[int, float, dict[str, int], int]:
            peer = await UdpPeer.open("peer", world.inet_netns, INTERNET_HOST_IPV4)
            client = await TurnEndpoint.open(EndpointSpec(world, "client", relay.server(V4)))
            received = 0
            try:
                await client.connect_to(peer.address)
                peer.target = client.relayed_of(V4)
                port = peer.target.port
                loop = asyncio.get_running_loop()
                start = loop.time()
                for i in range(SENT):  # paced: each datagram at its slot
                    await asyncio.sleep(max(0.0, start + i / OFFERED - loop.time()))
                    client.send(bytes([i % 256]) * LIMITED_SIZE)
                elapsed = loop.time() - start
                # The relay has judged every datagram once its counts add up to SENT.
                deadline = time.monotonic() + 10
                while True:
                    out = traffic_of(world, relay, port)["client_to_peer"]
                    if out["packets"] + out["dropped_packets"] >= SENT:
                        break
                    assert time.monotonic() < deadline, f"the relay saw only {out}"
                    await asyncio.sleep(0.05)
                while received < out["packets"]:  # and the peer gets what it relayed
                    data = await asyncio.wait_for(peer.recv(), 5)
                    assert len(data) == LIMITED_SIZE
                    received += 1
                return received, elapsed, out, port
            finally:
                await client.close()
                peer.close()

        before = relay.counters()
        received, elapsed, out, port = run(scenario())
        closed = relay.wait_for("allocation closed", where=lambda r: r["relay_port"] == port)
        python_drops = status(world, relay)["drops"].get("allocation_rate", 0)
        kernel_drops = relay.counters().drops.get("allocation_rate", 0)
        kernel_drops -= before.drops.get("allocation_rate", 0)
    expected = (BURST + elapsed) * RATE / 8 / LIMITED_SIZE
    assert received == pytest.approx(expected, rel=0.03, abs=1)
    assert out["packets"] == received and out["bytes"] == received * LIMITED_SIZE
    assert out["dropped_packets"] == SENT - received
    assert closed["traffic"]["client_to_peer"] == out
    # With the fast path, the kernel dropped the excess itself: none of it reached Python.
    assert python_drops == (0 if fastpath else SENT - received)
    assert kernel_drops == (SENT - received if fastpath else 0)
