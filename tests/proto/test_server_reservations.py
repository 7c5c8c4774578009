"""EVEN-PORT and RESERVATION-TOKEN (RFC 8656 section 7.2), on the hand-stepped clock: the even
port, the next port held 30 s for a single-use token, and the errors the RFC gives."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from tests.proto.harness import (
    PEER,
    PUBLIC_V4,
    PUBLIC_V6,
    T0,
    Client,
    FakePorts,
    Harness,
    error_code,
)
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, PeerAddr, Transport, TransportAddr
from xdpturn.proto.commands import AllocationOpened
from xdpturn.proto.server import RESERVATION_LIFETIME, AllocationInfo
from xdpturn.proto.stats import Drop
from xdpturn.proto.stun import AttrType, Message, MessageClass

EVEN = (AttrType.EVEN_PORT, stun.encode_even_port(False))
EVEN_RESERVE = (AttrType.EVEN_PORT, stun.encode_even_port(True))
IPV6 = (AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
DUAL = (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))


def token_of(response: Message) -> bytes:
    assert response.cls == MessageClass.SUCCESS, response
    token = response.get(AttrType.RESERVATION_TOKEN)
    assert token is not None and len(token) == 8
    return token


def with_token(token: bytes) -> tuple[int, bytes]:
    return (AttrType.RESERVATION_TOKEN, token)


def relayed(response: Message) -> list[TransportAddr]:
    assert response.cls == MessageClass.SUCCESS, response
    return [
        stun.decode_xor_address(value, response.transaction_id)
        for attr, value in response.attributes
        if attr == AttrType.XOR_RELAYED_ADDRESS
    ]


@dataclass(frozen=True)
class State:
    """What an error response must leave as it was."""

    ports: dict[int, frozenset[Family]]
    allocations: list[AllocationInfo]
    timer: float | None


def state(h: Harness) -> State:
    return State(dict(h.ports.open), h.server.allocations(), h.server.get_timer())


def reserve(h: Harness, where: str = "192.0.2.10:5000", *attrs: tuple[int, bytes]) -> bytes:
    """An RTP allocation with EVEN-PORT R=1; the RESERVATION-TOKEN it got."""
    return token_of(h.client(where).allocate(EVEN_RESERVE, *attrs))


# EVEN-PORT without the R bit


def test_even_port_gives_an_even_port_and_reserves_nothing() -> None:
    h = Harness(ports=FakePorts(50001, 50010))  # the first free port is odd
    response = h.client().allocate(EVEN)
    assert relayed(response) == [TransportAddr(PUBLIC_V4, 50002)]
    assert response.get(AttrType.RESERVATION_TOKEN) is None
    assert h.ports.open == {50002: frozenset({Family.IPV4})}


def test_even_port_with_dual_stack_gives_the_same_even_port_in_both_families() -> None:
    # The RFC forbids only the R bit with ADDITIONAL-ADDRESS-FAMILY; both relayed addresses of
    # a dual allocation share one port number here, so both are even.
    h = Harness(ports=FakePorts(50001, 50010))
    response = h.client().allocate(EVEN, DUAL)
    assert relayed(response) == [TransportAddr(PUBLIC_V4, 50002), TransportAddr(PUBLIC_V6, 50002)]
    assert h.ports.open == {50002: frozenset({Family.IPV4, Family.IPV6})}


def test_even_port_is_508_only_when_no_even_port_is_free() -> None:
    h = Harness(ports=FakePorts(50000, 50001))
    assert relayed(h.client("192.0.2.1:1").allocate(EVEN)) == [TransportAddr(PUBLIC_V4, 50000)]
    before = state(h)
    response = h.client("192.0.2.2:1").allocate(EVEN)
    assert error_code(response) == 508
    assert state(h) == before
    # The odd port is still free for a request that does not ask for an even one.
    assert relayed(h.client("192.0.2.3:1").allocate()) == [TransportAddr(PUBLIC_V4, 50001)]


# EVEN-PORT with the R bit, then RESERVATION-TOKEN


def test_the_r_bit_reserves_the_next_port_for_the_token() -> None:
    h = Harness(ports=FakePorts(50001, 50010))
    rtp = h.client("192.0.2.10:5000")
    token = token_of(rtp.allocate(EVEN_RESERVE))
    assert rtp.relay_port == 50002
    assert h.ports.open == {50002: frozenset({Family.IPV4}), 50003: frozenset({Family.IPV4})}
    h.take()

    # The reserved port is held: an allocation that asks for no particular port skips it.
    other = h.client("192.0.2.20:5000")
    other.allocate()
    assert other.relay_port == 50001
    h.take()

    # Any 5-tuple may present the token, over any transport (section 7.2).
    rtcp = h.client("192.0.2.30:6000", transport=Transport.TCP)
    response = rtcp.allocate(with_token(token))
    assert relayed(response) == [TransportAddr(PUBLIC_V4, 50003)]
    assert response.get(AttrType.RESERVATION_TOKEN) is None
    opened = [c for c in h.take() if isinstance(c, AllocationOpened)]
    assert [(o.flow, o.relay_port, o.families) for o in opened] == [
        (rtcp.flow, 50003, frozenset({Family.IPV4}))
    ]
    # Nothing more was opened: the allocation took the port the reservation held.
    assert sorted(h.ports.open) == [50001, 50002, 50003]


def test_the_token_takes_the_family_of_the_reservation() -> None:
    h = Harness()
    token = reserve(h, "192.0.2.10:5000", IPV6)
    response = h.client("192.0.2.30:6000").allocate(with_token(token))
    (address,) = relayed(response)
    assert address.ip == PUBLIC_V6 and address.port % 2 == 1
    assert h.ports.open[address.port] == frozenset({Family.IPV6})


def test_a_token_is_single_use() -> None:
    h = Harness()
    token = reserve(h)
    assert h.client("192.0.2.30:6000").allocate(with_token(token)).cls == MessageClass.SUCCESS
    before = state(h)
    response = h.client("192.0.2.31:6000").allocate(with_token(token))
    assert error_code(response) == 508
    assert state(h) == before


def test_an_unknown_token_is_508_and_changes_nothing() -> None:
    h = Harness()
    token = reserve(h)
    before = state(h)
    forged = bytes(b ^ 0xFF for b in token)
    assert error_code(h.client("192.0.2.30:6000").allocate(with_token(forged))) == 508
    assert state(h) == before
    # The real token still works.
    assert h.client("192.0.2.31:6000").allocate(with_token(token)).cls == MessageClass.SUCCESS


def test_the_reservation_expires_at_exactly_30_seconds_and_frees_the_port() -> None:
    h = Harness()
    token = reserve(h)
    reserved = max(h.ports.open)
    assert RESERVATION_LIFETIME == 30
    assert h.server.get_timer() == T0 + 30  # before the allocation's own 600 s

    h.advance(30 - 1e-6)
    assert reserved in h.ports.open
    h.advance(1e-6)
    assert h.now == T0 + 30
    assert reserved not in h.ports.open
    assert h.server.get_timer() == T0 + 600  # the RTP allocation's expiry, nothing else
    before = state(h)
    assert error_code(h.client("192.0.2.30:6000").allocate(with_token(token))) == 508
    assert state(h) == before


def test_a_token_presented_at_30_seconds_is_508_even_before_the_timer_runs() -> None:
    h = Harness()
    token = reserve(h)
    h.now = T0 + 30  # no timer fired yet: the reservation is still in the table
    assert error_code(h.client("192.0.2.30:6000").allocate(with_token(token))) == 508
    h.now = T0 + 30 - 1e-3
    assert h.client("192.0.2.31:6000").allocate(with_token(token)).cls == MessageClass.SUCCESS


def test_the_token_just_before_30_seconds_still_gets_the_port() -> None:
    h = Harness()
    token = reserve(h)
    reserved = max(h.ports.open)
    h.advance(30 - 1e-3)
    rtcp = h.client("192.0.2.30:6000")
    rtcp.allocate(with_token(token))
    assert rtcp.relay_port == reserved
    h.advance(1)  # the reservation's timer has nothing left to release
    assert reserved in h.ports.open
    assert [a.relay_port for a in h.server.allocations()] == [reserved - 1, reserved]


def test_the_reservation_outlives_the_allocation_that_made_it() -> None:
    # Section 7.2: the reservation is server-wide, not part of the allocation.
    h = Harness()
    rtp = h.client()
    token = token_of(rtp.allocate(EVEN_RESERVE))
    rtp.refresh(0)
    assert sorted(h.ports.open) == [rtp.relay_port + 1]
    rtcp = h.client("192.0.2.30:6000")
    rtcp.allocate(with_token(token))
    assert rtcp.relay_port == rtp.relay_port + 1


def test_datagrams_to_a_reserved_port_are_dropped() -> None:
    h = Harness()
    reserve(h)
    reserved = max(h.ports.open)
    h.take()
    h.server.handle_peer_datagram(b"early", reserved, PEER, h.now)
    assert h.take() == []
    assert h.server.stats.drops[Drop.NO_ALLOCATION] == 1


@pytest.mark.parametrize("refused", [50002, 50003], ids=["even", "odd"])
def test_a_pair_the_runtime_cannot_open_is_closed_and_the_next_pair_taken(refused: int) -> None:
    h = Harness(ports=FakePorts(50002, 50007))
    h.ports.refused.add(refused)  # another program holds one port of the first pair
    response = h.client().allocate(EVEN_RESERVE)
    assert relayed(response) == [TransportAddr(PUBLIC_V4, 50004)]
    token_of(response)
    v4 = frozenset({Family.IPV4})
    assert h.ports.open == {50004: v4, 50005: v4}  # the first pair's open port was closed
    # The refused port was held only while the Allocate lasted.
    assert refused in h.ports.free


def test_a_pair_is_508_when_every_pair_has_a_port_the_runtime_cannot_open() -> None:
    h = Harness(ports=FakePorts(50002, 50005))
    h.ports.refused.update({50003, 50004})
    before = state(h)
    response = h.client().allocate(EVEN_RESERVE)
    assert error_code(response) == 508
    assert state(h) == before
    assert sorted(h.ports.free) == [50002, 50003, 50004, 50005]


def test_the_pair_is_508_only_when_no_even_odd_pair_is_free() -> None:
    h = Harness(ports=FakePorts(50000, 50002))
    h.client("192.0.2.1:1").allocate()  # takes 50000: 50001 and 50002 are free, not a pair
    before = state(h)
    assert error_code(h.client("192.0.2.2:1").allocate(EVEN_RESERVE)) == 508
    assert state(h) == before
    assert relayed(h.client("192.0.2.3:1").allocate(EVEN)) == [TransportAddr(PUBLIC_V4, 50002)]


def test_a_retransmitted_r_bit_allocate_gets_the_same_token_and_no_second_reservation() -> None:
    h = Harness()
    rtp = h.client()
    rtp.allocate()  # learn the nonce; this allocation is replaced below
    rtp.refresh(0)
    msg = rtp.message(
        stun.Method.ALLOCATE,
        (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17)),
        EVEN_RESERVE,
    )
    data = rtp.signed(msg)
    first = h.exchange(rtp.flow, data)
    open_after_first = dict(h.ports.open)
    again = h.exchange(rtp.flow, data)
    assert token_of(first) == token_of(again)
    assert h.ports.open == open_after_first and len(open_after_first) == 2


def test_close_releases_reservations() -> None:
    h = Harness()
    reserve(h)
    h.server.close(h.now)
    h.take()
    assert h.ports.open == {}
    h.advance(RESERVATION_LIFETIME)  # FakePorts.release raises on a port released twice


# The combinations the RFC forbids: 400, and nothing changes (the token stays usable)


@pytest.mark.parametrize(
    "extra",
    [EVEN, EVEN_RESERVE, IPV6, DUAL],
    ids=["even-port", "even-port-r", "requested-family", "additional-family"],
)
def test_token_with_even_port_or_an_address_family_is_400(extra: tuple[int, bytes]) -> None:
    h = Harness()
    token = reserve(h)
    before = state(h)
    response = h.client("192.0.2.30:6000").allocate(with_token(token), extra)
    assert error_code(response) == 400
    assert state(h) == before
    assert h.client("192.0.2.31:6000").allocate(with_token(token)).cls == MessageClass.SUCCESS


def test_r_bit_with_additional_address_family_is_400() -> None:
    h = Harness()
    response = h.client().allocate(EVEN_RESERVE, DUAL)
    assert error_code(response) == 400
    assert h.ports.open == {} and h.server.get_timer() is None


@pytest.mark.parametrize(
    ("attr", "value"),
    [
        (AttrType.EVEN_PORT, b"\x80\x00"),
        (AttrType.EVEN_PORT, b""),
        (AttrType.RESERVATION_TOKEN, b"\x01\x02\x03\x04"),
        (AttrType.RESERVATION_TOKEN, bytes(9)),
    ],
)
def test_malformed_even_port_or_token_is_400(attr: int, value: bytes) -> None:
    h = Harness()
    token = reserve(h)
    before = state(h)
    assert error_code(h.client("192.0.2.30:6000").allocate((attr, value))) == 400
    assert state(h) == before
    assert h.client("192.0.2.31:6000").allocate(with_token(token)).cls == MessageClass.SUCCESS


def test_a_token_refused_by_quota_is_not_used_up() -> None:
    h = Harness()
    h = Harness(config=replace(h.config, max_allocations_per_ip=1))
    token = reserve(h, "192.0.2.10:5000")
    before = state(h)
    second: Client = h.client("192.0.2.10:5001")  # same IP: over its quota
    assert error_code(second.allocate(with_token(token))) == 486
    assert state(h) == before
    assert h.client("192.0.2.11:5000").allocate(with_token(token)).cls == MessageClass.SUCCESS


def test_relaying_through_the_reserved_port_once_allocated() -> None:
    h = Harness()
    token = reserve(h)
    rtcp = h.client("192.0.2.30:6000")
    rtcp.allocate(with_token(token))
    rtcp.permit(PEER)
    h.take()
    h.server.handle_peer_datagram(b"rtcp", rtcp.relay_port, PEER, h.now)
    (command,) = h.take()
    data = getattr(command, "data", b"")
    indication = stun.decode(data)
    assert indication.get(AttrType.DATA) == b"rtcp"
    peer = indication.get(AttrType.XOR_PEER_ADDRESS)
    assert peer is not None
    assert PeerAddr(stun.decode_xor_address(peer, indication.transaction_id)) == PEER
