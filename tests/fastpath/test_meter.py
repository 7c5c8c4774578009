"""Metering and the per-allocation rate limit in the XDP program, through BPF_PROG_TEST_RUN: the
counts equal what was sent per allocation and direction; over the limit datagrams are dropped
(XDP_DROP, never passed to Python) and counted. The core's side is in
tests/proto/test_server_metering.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.fastpath.conftest import LOCAL4, LOCAL6, PUBLIC4, PUBLIC6, TURN_PORT, Lab
from tests.fastpath.packets import run
from tests.fastpath.test_routes import (
    RELAY_A,
    RELAY_B,
    Case,
    channel_to_udp,
    hairpin,
    udp_to_channel,
)
from xdpturn.fastpath import FastPathConfig, FastPathMode
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto.meter import AllocationTraffic
from xdpturn_lab.testbed import netns

pytestmark = pytest.mark.kernel

RATE = 800_000  # bits per second: 100,000 bytes per second
BURST = 0.25  # 25,000 bytes
SIZE = 1000


def payload(n: int) -> bytes:
    return bytes([0x41 + n % 26]) * n


# Each kind of route, built for a given payload.
KINDS: dict[str, Callable[[bytes], Case]] = {
    "channel_to_udp": lambda data: channel_to_udp(4, 6, data, 0),
    "udp_to_channel": lambda data: udp_to_channel(6, 4, data),
    "channel_to_channel": lambda data: hairpin(4, 4, data, 0),
}


@pytest.fixture
def limited(lab: Lab) -> Iterator[XdpFastPath]:
    """A second copy of the program in the lab, with --max-bps-per-allocation RATE."""
    with netns.entered(lab.ns):
        fp = XdpFastPath(
            FastPathConfig(
                mode=FastPathMode.AUTO,
                interfaces=[],
                turn_port=TURN_PORT,
                public_ipv4=PUBLIC4,
                public_ipv6=PUBLIC6,
                local_ipv4=LOCAL4,
                local_ipv6=LOCAL6,
                allocation_rate_bps=RATE,
                allocation_burst=BURST,
            )
        )
    try:
        yield fp
    finally:
        fp.close()


def installed(fp: XdpFastPath, case: Case) -> None:
    for r in case.routes:
        fp.install(r)
    for port in {r.relay_port for r in case.routes}:
        fp.open_allocation(port)


def removed(fp: XdpFastPath, case: Case) -> dict[int, AllocationTraffic]:
    for r in case.routes:
        fp.remove(r)
    return {port: fp.close_allocation(port) for port in {r.relay_port for r in case.routes}}


def test_each_route_counts_payload_on_its_allocations(lab: Lab) -> None:
    fp = lab.fastpath
    sizes = [1, 20, 333, 1200]
    for make in KINDS.values():
        case = make(b"")
        installed(fp, case)
        try:
            for n in sizes:
                frame = make(payload(n)).frame
                assert run(fp, lab.ns, lab.ifindex[case.ingress], frame).action == case.action
            live = fp.allocation_traffic()
        finally:
            closed = removed(fp, case)
        assert live == closed  # read while open, then the last read at close: nothing moved
        got = {
            (port, name): (getattr(t, name).packets, getattr(t, name).bytes)
            for port, t in closed.items()
            for name in ("client_to_peer", "peer_to_client")
        }
        sent = (len(sizes), sum(sizes))
        if "_udp_to_" in case.name:
            want = {(RELAY_A, "peer_to_client"): sent, (RELAY_A, "client_to_peer"): (0, 0)}
        elif case.name.endswith("_udp"):
            want = {(RELAY_A, "client_to_peer"): sent, (RELAY_A, "peer_to_client"): (0, 0)}
        else:  # the relay is the peer: leaves A, reaches B's client
            want = {
                (RELAY_A, "client_to_peer"): sent,
                (RELAY_A, "peer_to_client"): (0, 0),
                (RELAY_B, "peer_to_client"): sent,
                (RELAY_B, "client_to_peer"): (0, 0),
            }
        assert got == want, case.name
        assert fp.allocation_traffic() == {}  # deleted on close


def test_a_passed_packet_is_not_counted(lab: Lab) -> None:
    # Python relays what the program passes, and counts it there: never twice.
    fp = lab.fastpath
    case = KINDS["channel_to_udp"](payload(10))
    installed(fp, case)
    try:
        frame = case.frame
        ttl_one = frame[:22] + b"\x01" + frame[23:]  # TTL 1 (checksum left wrong: any pass will do)
        assert run(fp, lab.ns, lab.ifindex["rly0"], ttl_one).action == bpf.XDP_PASS
        assert fp.allocation_traffic()[RELAY_A] == AllocationTraffic()
        assert run(fp, lab.ns, lab.ifindex["rly0"], frame).action == case.action
        assert fp.allocation_traffic()[RELAY_A].client_to_peer.bytes == 10
        # Opened again (as after a restart), the meter goes on; closed and reopened, it restarts.
        fp.open_allocation(RELAY_A)
        assert fp.allocation_traffic()[RELAY_A].client_to_peer.bytes == 10
        assert fp.close_allocation(RELAY_A).client_to_peer.bytes == 10
        fp.open_allocation(RELAY_A)
        assert fp.allocation_traffic()[RELAY_A] == AllocationTraffic()
    finally:
        closed = removed(fp, case)
    assert closed[RELAY_A] == AllocationTraffic()


def test_a_burst_beyond_the_limit_is_dropped_and_counted(lab: Lab, limited: XdpFastPath) -> None:
    case = KINDS["channel_to_udp"](payload(SIZE))
    installed(limited, case)
    try:
        frame = case.frame
        before = limited.counters()
        start = time.monotonic()
        verdicts = [run(limited, lab.ns, lab.ifindex["rly0"], frame).action for _ in range(100)]
        elapsed = time.monotonic() - start
        after = limited.counters()
    finally:
        closed = removed(limited, case)[RELAY_A].client_to_peer
    sent, dropped = verdicts.count(case.action), verdicts.count(bpf.XDP_DROP)
    assert sent + dropped == 100  # nothing passed to Python
    assert after.drops["allocation_rate"] - before.drops["allocation_rate"] == dropped
    # The burst (25 datagrams), plus what the rate refilled while the loop ran.
    refilled = elapsed * RATE / 8 / SIZE
    assert 25 <= sent <= 25 + refilled + 1
    assert (closed.packets, closed.bytes) == (sent, sent * SIZE)
    assert (closed.dropped_packets, closed.dropped_bytes) == (dropped, dropped * SIZE)


@pytest.mark.parametrize("kind", ["channel_to_udp", "udp_to_channel"])
def test_the_rate_delivered_is_the_limit(lab: Lab, limited: XdpFastPath, kind: str) -> None:
    case = KINDS[kind](payload(SIZE))
    direction = "client_to_peer" if kind == "channel_to_udp" else "peer_to_client"
    installed(limited, case)
    offered = 2 * RATE / 8 / SIZE  # twice the limit: 200 datagrams per second
    count = 300  # 1.5 s
    try:
        frame = case.frame
        start = time.monotonic()
        for i in range(count):
            # Paced: wait for this datagram's slot (bounded: the loop is `count` long).
            delay = start + i / offered - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            run(limited, lab.ns, lab.ifindex[case.ingress], frame)
        elapsed = time.monotonic() - start
    finally:
        traffic = getattr(removed(limited, case)[RELAY_A], direction)
    # GCRA: the burst at once, then the rate over the time the datagrams were offered.
    expected = (BURST + elapsed) * RATE / 8
    assert traffic.bytes == pytest.approx(expected, rel=0.03, abs=SIZE)
    assert traffic.packets + traffic.dropped_packets == count
    assert traffic.dropped_bytes == traffic.dropped_packets * SIZE


def test_every_open_allocation_is_read_in_batches(lab: Lab) -> None:
    fp = lab.fastpath
    ports = range(40000, 42500)
    for port in ports:
        fp.open_allocation(port)
    try:
        # Chunks much smaller than the map: every key once, across many batch calls.
        keys = [k for k, _ in fp.alloc_meters.items_percpu(chunk=64)]
        assert sorted(int.from_bytes(k, "little") for k in keys) == list(ports)
        assert fp.allocation_traffic() == {port: AllocationTraffic() for port in ports}
    finally:
        for port in ports:
            fp.close_allocation(port)
    assert fp.allocation_traffic() == {}
