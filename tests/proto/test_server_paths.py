"""Bound channels handed to the runtime as paths (xdpturn.proto.paths): a path exists only for
what the core would relay itself, any change to its allocation revokes it, and what it relays is
metered and limited on the core's own counters."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.proto.harness import PEER, Client, Harness, addr
from tests.proto.test_server_metering import BURST, RATE, SIZE, bound, harness
from xdpturn.proto.addr import PeerAddr, Transport
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.proto.commands import AllocationClosed, SendToPeer
from xdpturn.proto.paths import REVOKED
from xdpturn.proto.server import (
    DEFAULT_ALLOCATION_LIFETIME,
    PERMISSION_LIFETIME,
)
from xdpturn.proto.stats import Drop, Route
from xdpturn.proto.stun import MessageClass


def test_paths_vouch_until_the_first_expiry_and_meter_on_the_core_counters() -> None:
    h = harness()
    client, port = bound(h)
    out = h.server.channel_path(client.flow, 0x4000, h.now)
    back = h.server.peer_path(port, PEER, h.now)
    assert out is not None and back is not None
    assert (out.relay_port, out.peer, out.channel, out.flow) == (port, PEER, 0x4000, client.flow)
    assert (back.relay_port, back.peer, back.channel, back.flow) == out_fields(out)
    # The permission (300 s) lapses first: the allocation and the channel live 600 s.
    assert out.until == back.until == h.now + PERMISSION_LIFETIME
    # Asked again, the same path: nothing changed.
    assert h.server.channel_path(client.flow, 0x4000, h.now) is out
    for n in (10, 20, 30):
        assert out.relay(n, h.now)
    assert back.relay(50, h.now)
    # The core's own relaying adds to the same counters.
    h.server.handle_client_datagram(encode_channel_data(0x4000, b"x" * 7), client.flow, h.now)
    assert h.take() == [SendToPeer(port, PEER, b"x" * 7)]
    (info,) = h.server.allocations()
    assert (info.traffic.client_to_peer.packets, info.traffic.client_to_peer.bytes) == (4, 67)
    assert (info.traffic.peer_to_client.packets, info.traffic.peer_to_client.bytes) == (1, 50)
    relayed = h.server.stats.relayed
    assert (relayed[Route.CLIENT_TO_PEER].packets, relayed[Route.CLIENT_TO_PEER].bytes) == (4, 67)
    assert (relayed[Route.PEER_TO_CLIENT].packets, relayed[Route.PEER_TO_CLIENT].bytes) == (1, 50)
    client.refresh(0)
    (closed,) = [c for c in h.take() if isinstance(c, AllocationClosed)]
    assert closed.traffic.client_to_peer.bytes == 67 and closed.traffic.peer_to_client.bytes == 50


def out_fields(path: object) -> tuple[object, ...]:
    return tuple(getattr(path, name) for name in ("relay_port", "peer", "channel", "flow"))


def test_no_path_for_what_the_core_would_not_relay_on_a_channel() -> None:
    h = Harness()
    stranger = h.client("192.0.2.99:5000")
    assert h.server.channel_path(stranger.flow, 0x4000, h.now) is None  # no allocation
    client, port = bound(h)
    other = PeerAddr(addr("198.51.100.8:4000"))
    client.permit(other)
    assert h.server.channel_path(client.flow, 0x4001, h.now) is None  # channel not bound
    assert h.server.peer_path(port, other, h.now) is None  # no channel: a Data indication
    assert h.server.peer_path(port + 1, PEER, h.now) is None  # not an allocation's port
    # Past the permission's expiry, before any timer ran: neither way.
    later = h.now + PERMISSION_LIFETIME
    assert h.server.channel_path(client.flow, 0x4000, later) is None
    assert h.server.peer_path(port, PEER, later) is None


def test_no_path_for_stream_clients_or_channels_to_the_relay_itself() -> None:
    h = Harness()
    tcp = h.client("192.0.2.10:5000", transport=Transport.TCP)
    tcp.allocate()
    tcp.bind(0x4000, PEER)
    assert h.server.channel_path(tcp.flow, 0x4000, h.now) is None  # padded ChannelData
    assert h.server.peer_path(tcp.relay_port, PEER, h.now) is None
    a, b = h.client("192.0.2.11:5000"), h.client("192.0.2.12:5000")
    a.allocate()
    b.allocate()
    assert a.bind(0x4000, b.relayed_v4).cls == MessageClass.SUCCESS
    assert h.server.channel_path(a.flow, 0x4000, h.now) is None  # packets to itself


CHANGES: dict[str, Callable[[Client], object]] = {
    "refresh": lambda c: c.refresh(DEFAULT_ALLOCATION_LIFETIME),
    "permission": lambda c: c.permit(PEER),
    "channel bind": lambda c: c.bind(0x4000, PEER),
    "another permission": lambda c: c.permit(addr("198.51.100.9:1")),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_to_the_allocation_revokes_its_paths(change: str) -> None:
    h = Harness()
    client, port = bound(h)
    h.now += 30
    out = h.server.channel_path(client.flow, 0x4000, h.now)
    back = h.server.peer_path(port, PEER, h.now)
    assert out is not None and back is not None
    CHANGES[change](client)
    assert out.until == back.until == REVOKED
    fresh = h.server.channel_path(client.flow, 0x4000, h.now)
    assert fresh is not None and fresh is not out
    expected = h.now + PERMISSION_LIFETIME
    if change in ("refresh", "another permission"):
        expected = h.now - 30 + PERMISSION_LIFETIME  # the permission was not refreshed
    assert fresh.until == expected


def test_deleting_or_sweeping_the_allocation_revokes_its_paths() -> None:
    h = Harness()
    client, port = bound(h)
    out = h.server.channel_path(client.flow, 0x4000, h.now)
    assert out is not None
    h.advance(PERMISSION_LIFETIME + 1)  # the sweep takes the permission
    assert out.until == REVOKED
    client.permit(PEER)
    back = h.server.peer_path(port, PEER, h.now)
    assert back is not None
    client.refresh(0)
    assert back.until == REVOKED
    assert h.server.peer_path(port, PEER, h.now) is None


def test_paths_are_held_to_the_allocation_rate_limit_as_the_core_is() -> None:
    h = harness(max_bps_per_allocation=RATE, allocation_burst=BURST)
    client, port = bound(h)
    out = h.server.channel_path(client.flow, 0x4000, h.now)
    back = h.server.peer_path(port, PEER, h.now)
    assert out is not None and back is not None
    burst = int(BURST * RATE / 8 / SIZE)
    assert sum(out.relay(SIZE, h.now) for _ in range(burst + 10)) == burst
    assert sum(back.relay(SIZE, h.now) for _ in range(burst + 5)) == burst
    # The core's own path shares the schedule: still over the limit.
    h.server.handle_client_datagram(encode_channel_data(0x4000, b"x" * SIZE), client.flow, h.now)
    assert h.take() == []
    (info,) = h.server.allocations()
    assert info.traffic.client_to_peer.packets == burst
    assert info.traffic.client_to_peer.dropped_packets == 11
    assert info.traffic.client_to_peer.dropped_bytes == 11 * SIZE
    assert info.traffic.peer_to_client.dropped_packets == 5
    assert h.server.stats.drops[Drop.ALLOCATION_RATE] == 16
