"""Traffic per allocation and direction, the per-allocation rate limit and the relay-wide cap, in
the sans-IO core (the Python path). The XDP program's side is tests/fastpath/test_meter.py."""

from __future__ import annotations

import dataclasses

import pytest

from tests.proto.harness import PEER, Client, Harness, error_code
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.proto.commands import AllocationClosed, SendToClient, SendToPeer
from xdpturn.proto.meter import RateSchedule
from xdpturn.proto.server import ServerConfig
from xdpturn.proto.stats import Drop
from xdpturn.proto.stun import MessageClass

RATE = 80_000  # bits per second: 10,000 bytes per second
BURST = 0.25  # seconds' worth: 2,500 bytes
SIZE = 100  # payload bytes per datagram


def harness(**config: object) -> Harness:
    base = Harness().config
    return Harness(config=dataclasses.replace(base, **config))  # type: ignore[arg-type]


def bound(h: Harness, where: str = "192.0.2.10:5000") -> tuple[Client, int]:
    client = h.client(where)
    assert client.allocate().cls == MessageClass.SUCCESS
    assert client.permit(PEER).cls == MessageClass.SUCCESS
    assert client.bind(0x4000, PEER).cls == MessageClass.SUCCESS
    h.take()
    return client, client.relay_port


def test_counts_per_allocation_and_direction_equal_what_was_sent() -> None:
    h = harness()
    client, port = bound(h)
    for i in range(7):
        h.server.handle_client_datagram(
            encode_channel_data(0x4000, b"x" * (10 + i)), client.flow, h.now
        )
    for _ in range(3):
        h.server.handle_peer_datagram(b"y" * 50, port, PEER, h.now)
    sent = [c for c in h.take() if isinstance(c, SendToPeer | SendToClient)]
    assert len(sent) == 10
    (info,) = h.server.allocations()
    out, back = info.traffic.client_to_peer, info.traffic.peer_to_client
    assert (out.packets, out.bytes) == (7, sum(10 + i for i in range(7)))
    assert (back.packets, back.bytes) == (3, 150)
    assert out.dropped_packets == back.dropped_packets == 0
    client.refresh(0)
    (closed,) = [c for c in h.take() if isinstance(c, AllocationClosed)]
    assert closed.traffic.client_to_peer.bytes == out.bytes
    assert closed.traffic.peer_to_client.bytes == 150


def test_loopback_counts_on_both_allocations() -> None:
    h = harness()
    a = h.client("192.0.2.10:5000")
    b = h.client("192.0.2.11:5001")
    a.allocate()
    b.allocate()
    a.permit(b.relayed_v4)
    b.permit(a.relayed_v4)
    a.send_indication(b.relayed_v4, b"z" * 40)
    by_port = {i.relay_port: i.traffic for i in h.server.allocations()}
    assert by_port[a.relay_port].client_to_peer.bytes == 40
    assert by_port[b.relay_port].peer_to_client.bytes == 40
    assert by_port[a.relay_port].peer_to_client.packets == 0


def test_schedule_admits_the_burst_then_the_rate() -> None:
    schedule = RateSchedule(RATE, BURST)
    admitted = sum(schedule.admit(SIZE, 0.0) for _ in range(100))
    assert admitted == 25  # 2,500 bytes of burst
    # Then exactly the rate: 10,000 bytes/s is one 100-byte datagram every 10 ms.
    now, admitted = 0.0, 0
    for _ in range(1000):  # offered at 2x for 5 s
        now += 0.005
        admitted += schedule.admit(SIZE, now)
    assert admitted == pytest.approx(500, abs=1)


def test_rate_limit_drops_and_counts_the_excess_on_both_directions() -> None:
    h = harness(max_bps_per_allocation=RATE, allocation_burst=BURST)
    client, port = bound(h)
    seconds, offered = 4.0, 2 * RATE // 8 // SIZE  # datagrams per second
    step = 1 / offered
    for _ in range(int(seconds * offered)):
        h.now += step
        h.server.handle_client_datagram(
            encode_channel_data(0x4000, b"x" * SIZE), client.flow, h.now
        )
        h.server.handle_peer_datagram(b"y" * SIZE, port, PEER, h.now)
    sent = h.take()
    to_peer = [c for c in sent if isinstance(c, SendToPeer)]
    to_client = [c for c in sent if isinstance(c, SendToClient)]
    expected = (BURST + seconds) * RATE / 8 / SIZE
    for count in (len(to_peer), len(to_client)):
        assert count == pytest.approx(expected, rel=0.01)
    (info,) = h.server.allocations()
    for direction, delivered in (
        (info.traffic.client_to_peer, to_peer),
        (info.traffic.peer_to_client, to_client),
    ):
        assert direction.packets == len(delivered)
        assert direction.dropped_packets == int(seconds * offered) - len(delivered)
        assert direction.dropped_bytes == direction.dropped_packets * SIZE
    refused = 2 * int(seconds * offered) - len(to_peer) - len(to_client)
    assert h.server.stats.drops[Drop.ALLOCATION_RATE] == refused


def test_relay_wide_cap_refuses_new_allocations_with_508() -> None:
    h = harness(max_bps=1_000_000)
    first = h.client("192.0.2.10:5000")
    assert first.allocate().cls == MessageClass.SUCCESS
    h.server.set_throughput(1_000_000)
    second = h.client("192.0.2.11:5001")
    response = second.allocate()
    assert error_code(response) == 508
    assert first.refresh().cls == MessageClass.SUCCESS  # existing allocations carry on
    h.server.set_throughput(999_999)
    assert second.allocate().cls == MessageClass.SUCCESS


def test_no_cap_without_max_bps() -> None:
    h = Harness()
    h.server.set_throughput(10**12)
    assert h.client().allocate().cls == MessageClass.SUCCESS
    assert ServerConfig().max_bps is None
