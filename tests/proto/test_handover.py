"""The core's state handed to the next process (xdpturn.proto.handover): the new core carries on
with the old allocations, on its own clock, and refuses a state it cannot read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.proto.harness import Harness, error_code, routes
from xdpturn.proto import stun
from xdpturn.proto.addr import PeerAddr, Transport, TransportAddr
from xdpturn.proto.commands import (
    AllocationClosed,
    AllocationOpened,
    CloseRelayPort,
    InstallChannel,
    RemoveChannel,
)
from xdpturn.proto.handover import CoreState, StateError, from_plain, to_plain
from xdpturn.proto.server import RESERVATION_LIFETIME
from xdpturn.proto.stun import AttrType, MessageClass

PEER = TransportAddr.parse("198.51.100.7:9000")
WALL = 1_900_000_000.0  # the wall clock when the old process stops
NEW_CORE_NOW = 50.0  # the new process's core clock then: unrelated to the old one's


def handed_over(old: Harness, wall_now: float) -> CoreState:
    """Export, through JSON text as the state file holds it, and read back."""
    state = old.server.export_state(old.now, wall_now)
    return from_plain(json.loads(json.dumps(to_plain(state))))


def test_the_new_core_carries_on_with_the_old_allocations() -> None:
    old = Harness()
    alice = old.client()
    assert alice.allocate().cls == MessageClass.SUCCESS
    assert alice.bind(0x4000, PEER).cls == MessageClass.SUCCESS
    old.take()
    old.now += 10
    state = handed_over(old, WALL)

    new = Harness(now=NEW_CORE_NOW)
    assert new.server.restore_state(state, new.now, WALL + 5, listeners=1) == []
    commands = new.take()
    [opened] = [c for c in commands if isinstance(c, AllocationOpened)]
    assert opened.relay_port == alice.relay_port
    route = routes(commands, InstallChannel)
    assert {(r.channel, r.peer) for r in route} == {(0x4000, PEER)}

    # The same client, with the nonce the old process gave it, on the new core.
    alice.harness = new
    assert alice.refresh().cls == MessageClass.SUCCESS
    assert alice.permit(PEER).cls == MessageClass.SUCCESS
    assert alice.bind(0x4000, PEER).cls == MessageClass.SUCCESS
    other = TransportAddr.parse("198.51.100.8:9000")
    assert error_code(alice.bind(0x4000, other)) == 400  # the binding itself came along


def test_timers_fire_as_if_nothing_happened() -> None:
    old = Harness()
    alice = old.client()
    alice.allocate()
    alice.bind(0x4000, PEER)  # permission and channel from now on: 300 s and 600 s
    old.take()
    state = handed_over(old, WALL)

    new = Harness(now=NEW_CORE_NOW)
    new.server.restore_state(state, new.now, WALL + 100, listeners=1)  # 100 s without a process
    new.take()
    assert not routes(new.advance(199), RemoveChannel)
    assert routes(new.advance(2), RemoveChannel)  # the permission ended 300 s after it began


def test_what_lapsed_while_no_process_ran_is_not_taken() -> None:
    old = Harness()
    alice = old.client()
    alice.allocate()  # 600 s
    bob = old.client("192.0.2.11:5000")
    bob.allocate((0x000D, (3600).to_bytes(4, "big")))  # LIFETIME: 3600 s
    bob.bind(0x4000, PEER)
    old.take()
    state = handed_over(old, WALL)

    new = Harness(now=NEW_CORE_NOW)
    skipped = new.server.restore_state(state, new.now, WALL + 700, listeners=1)
    assert [(s.relay_port, why) for s, why in skipped] == [(alice.relay_port, "expired")]
    assert alice.relay_port not in new.ports.open
    commands = new.take()
    # Bob's allocation lives on, but his permission and channel lapsed: nothing to install.
    assert [c.relay_port for c in commands if isinstance(c, AllocationOpened)] == [bob.relay_port]
    assert not routes(commands, InstallChannel)


def test_an_allocation_whose_port_is_handed_out_is_not_taken() -> None:
    old = Harness()
    alice = old.client()
    alice.allocate()
    state = handed_over(old, WALL)
    new = Harness(now=NEW_CORE_NOW)
    new.ports.free.remove(alice.relay_port)  # the chooser has it taken
    skipped = new.server.restore_state(state, new.now, WALL, listeners=1)
    assert [why for _, why in skipped] == ["port unavailable"]
    assert new.server.allocations() == []


def test_an_allocation_whose_port_cannot_be_opened_again_is_closed() -> None:
    """Its port is opened again like a new allocation's (OpenRelayPort); another program may
    hold it by now."""
    old = Harness()
    alice = old.client()
    alice.allocate()
    alice.bind(0x4000, PEER)
    old.take()
    state = handed_over(old, WALL)
    new = Harness(now=NEW_CORE_NOW)
    new.ports.refused.add(alice.relay_port)
    assert new.server.restore_state(state, new.now, WALL, listeners=1) == []
    commands = new.take()
    closed = [c for c in commands if isinstance(c, AllocationClosed)]
    assert [(c.relay_port, c.reason) for c in closed] == [(alice.relay_port, "port_unavailable")]
    installed = routes(commands, InstallChannel)
    assert installed and installed == routes(commands, RemoveChannel)  # none left
    assert new.server.allocations() == []
    assert alice.relay_port not in new.ports.open


def test_stream_clients_are_not_handed_over() -> None:
    """A TCP or TLS client's connection ends with the process that held it."""
    old = Harness()
    old.client("192.0.2.10:5000", transport=Transport.TCP).allocate()
    assert old.server.export_state(old.now, WALL).allocations == ()


def test_the_nonce_key_is_handed_over() -> None:
    old = Harness()
    state = old.server.export_state(old.now, WALL)
    new = Harness(now=NEW_CORE_NOW)
    new.server.restore_state(state, new.now, WALL, listeners=1)
    assert new.server.export_state(new.now, WALL).nonce_key == state.nonce_key


def _plain() -> dict[str, Any]:
    old = Harness()
    alice = old.client()
    alice.allocate()
    alice.bind(0x4000, PEER)
    return to_plain(old.server.export_state(old.now, WALL))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: p.update(format=1), "format 1"),
        (lambda p: p.pop("nonce_key"), "KeyError"),
        (lambda p: p.update(nonce_key="abcd"), "expected 16 bytes"),
        (lambda p: p["allocations"][0].update(relay_port="50000"), "expected an integer"),
        (lambda p: p["allocations"][0].update(client="not an address"), "malformed"),
        (lambda p: p["allocations"][0]["channels"][0].pop("peer"), "KeyError"),
        (lambda p: p["allocations"][0].update(families=[3]), "malformed"),
        (lambda p: p.update(allocations={}), "expected a list"),
        (lambda p: p.pop("reservations"), "KeyError"),
        (lambda p: p["allocations"][0].update(dont_fragment=1), "expected true or false"),
        (lambda p: p.update(reservations=[{"token": "ab"}]), "expected 8 bytes"),
    ],
)
def test_a_damaged_state_is_refused_whole(damage: Any, why: str) -> None:
    plain = _plain()
    damage(plain)
    with pytest.raises(StateError, match=why):
        from_plain(plain)


def test_restoring_twice_is_a_bug() -> None:
    old = Harness()
    old.client().allocate()
    state = old.server.export_state(old.now, WALL)
    new = Harness(now=NEW_CORE_NOW)
    new.server.restore_state(state, new.now, WALL, listeners=1)
    with pytest.raises(RuntimeError):
        new.server.restore_state(state, new.now, WALL, listeners=1)


def test_peer_addresses_keep_their_family() -> None:
    old = Harness()
    alice = old.client()
    alice.allocate((0x0017, bytes([2, 0, 0, 0])))  # REQUESTED-ADDRESS-FAMILY: IPv6
    peer6 = PeerAddr(TransportAddr.parse("[2001:db8::7]:9000"))
    assert alice.bind(0x4001, peer6).cls == MessageClass.SUCCESS
    state = handed_over(old, WALL)
    assert state.allocations[0].channels[0].peer == peer6


EVEN_RESERVE = (AttrType.EVEN_PORT, stun.encode_even_port(True))
DONT_FRAGMENT = (AttrType.DONT_FRAGMENT, b"")


def test_a_reservation_is_handed_over_with_its_port_deadline_and_dont_fragment() -> None:
    old = Harness()
    rtp = old.client("192.0.2.10:5000")
    token = rtp.allocate(EVEN_RESERVE, DONT_FRAGMENT).get(AttrType.RESERVATION_TOKEN)
    assert token is not None
    old.take()
    old.now += 10
    state = handed_over(old, WALL)

    new = Harness(now=NEW_CORE_NOW)
    assert new.server.restore_state(state, new.now, WALL + 5, listeners=1) == []
    new.take()
    reserved = rtp.relay_port + 1
    # Both ports reopened as the pair's Allocate asked: with DF.
    assert new.ports.dont_fragment == {rtp.relay_port, reserved}
    assert set(new.ports.open) == {rtp.relay_port, reserved}
    # 30 s from the pair's Allocate: 10 s ran in the old process, 5 s while none ran.
    assert new.server.get_timer() == NEW_CORE_NOW + RESERVATION_LIFETIME - 15
    rtcp = new.client("192.0.2.10:5001")
    assert rtcp.allocate((AttrType.RESERVATION_TOKEN, token)).cls == MessageClass.SUCCESS
    assert rtcp.relay_port == reserved
    # Single use, as before the restart.
    again = new.client("192.0.2.10:5002")
    assert error_code(again.allocate((AttrType.RESERVATION_TOKEN, token))) == 508


def test_a_reservation_that_lapsed_while_no_process_ran_is_gone() -> None:
    old = Harness()
    rtp = old.client("192.0.2.10:5000")
    token = rtp.allocate(EVEN_RESERVE).get(AttrType.RESERVATION_TOKEN)
    assert token is not None
    old.take()
    state = handed_over(old, WALL)

    new = Harness(now=NEW_CORE_NOW)
    new.server.restore_state(state, new.now, WALL + RESERVATION_LIFETIME + 1, listeners=1)
    new.take()
    assert rtp.relay_port + 1 not in new.ports.open
    rtcp = new.client("192.0.2.10:5001")
    assert error_code(rtcp.allocate((AttrType.RESERVATION_TOKEN, token))) == 508


def test_a_reservation_whose_port_cannot_be_opened_again_is_dropped() -> None:
    old = Harness()
    token = old.client().allocate(EVEN_RESERVE).get(AttrType.RESERVATION_TOKEN)
    assert token is not None
    state = handed_over(old, WALL)
    reserved = state.reservations[0].relay_port

    new = Harness(now=NEW_CORE_NOW)
    new.ports.refused.add(reserved)
    new.server.restore_state(state, new.now, WALL, listeners=1)
    commands = new.take()
    assert not [c for c in commands if isinstance(c, CloseRelayPort)]
    assert reserved not in new.ports.open and reserved in new.ports.free
    rtcp = new.client("192.0.2.10:5001")
    assert error_code(rtcp.allocate((AttrType.RESERVATION_TOKEN, token))) == 508
