"""RESERVATION-TOKEN across the worker processes of one relay, on the hand-stepped clock: a token
names the worker that made it; another worker's core holds the Allocate that presents it, asks
for the reservation (FetchReservation), and answers once the reservation (and, in a real
runtime, its port's sockets) has come; `hand_over` plays the runtimes and the supervisor."""

from __future__ import annotations

import pytest

from tests.proto.harness import PUBLIC_V4, T0, Client, FakePorts, Harness, error_code
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, Transport, TransportAddr
from xdpturn.proto.commands import AllocationOpened, Command, FetchReservation, SendToClient
from xdpturn.proto.server import FETCH_TIMEOUT, MAX_FETCHES, RESERVATION_LIFETIME
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

from .test_server_reservations import EVEN_RESERVE, relayed, token_of, with_token
from .test_server_workers import Registry, worker

TRANSPORT = (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
DF = (AttrType.DONT_FRAGMENT, b"")
V4 = frozenset({Family.IPV4})


def two_workers() -> tuple[Registry, Harness, Harness]:
    """Two cores of one relay on one port range. A real runtime skips a port another worker
    has bound; here the second core starts choosing where the first does not."""
    registry = Registry()
    one = worker(registry, FakePorts(50000, 50099), worker=0)
    two = worker(registry, FakePorts(50000, 50099), worker=1)
    two.ports.free = two.ports.free[50:] + two.ports.free[:50]
    return registry, one, two


def send_allocate(client: Client, *attrs: tuple[int, bytes]) -> bytes:
    """Send a signed Allocate and return it (to retransmit); its answer is left to the test."""
    if not client.nonce:
        assert error_code(client.refresh()) == 437  # the 401 dance, for a nonce
    data = client.signed(client.message(Method.ALLOCATE, TRANSPORT, *attrs))
    client.harness.server.handle_client_datagram(data, client.flow, client.harness.now)
    return data


def hand_over(asker: Harness, workers: list[Harness], token: bytes) -> None:
    """What the runtimes and the supervisor do with the asker's FetchReservation(token): the
    worker the token names gives the reservation up, the port's sockets move to the asker, and
    the asker's core gets the answer."""
    holder = workers[int.from_bytes(token[:2], "big")]
    handed = None if holder is asker else holder.server.give_up_reservation(token, holder.now)
    if handed is not None:
        port = handed.relay_port
        asker.ports.open[port] = holder.ports.open.pop(port)
        if port in holder.ports.dont_fragment:
            holder.ports.dont_fragment.discard(port)
            asker.ports.dont_fragment.add(port)
    asker.server.handle_fetched_reservation(token, handed, asker.now)


def answers(commands: list[Command]) -> list[Message]:
    return [stun.decode(c.data) for c in commands if isinstance(c, SendToClient)]


def reserve_on(h: Harness, where: str = "192.0.2.10:5000", *attrs: tuple[int, bytes]) -> bytes:
    token = token_of(h.client(where).allocate(EVEN_RESERVE, *attrs))
    h.take()
    return token


def test_a_workers_tokens_start_with_its_index() -> None:
    h = worker(Registry(), FakePorts(), worker=0x0102)
    first, second = reserve_on(h, "192.0.2.10:5000"), reserve_on(h, "192.0.2.11:5000")
    assert first[:2] == second[:2] == b"\x01\x02"
    assert first[2:] != second[2:]


def test_a_token_made_by_one_worker_is_taken_on_another() -> None:
    registry, one, two = two_workers()
    token = reserve_on(one)
    reserved = max(one.ports.open)
    assert one.ports.open == {reserved - 1: V4, reserved: V4}

    rtcp = two.client("192.0.2.10:5001")
    request = send_allocate(rtcp, with_token(token))
    assert two.take() == [FetchReservation(token)]  # held: no answer yet
    # Retransmissions while the reservation is on its way start no second fetch.
    two.server.handle_client_datagram(request, rtcp.flow, two.now)
    assert two.take() == []

    hand_over(two, [one, two], token)
    commands = two.take()
    (response,) = answers(commands)
    assert relayed(response) == [TransportAddr(PUBLIC_V4, reserved)]
    opened = [(c.flow, c.relay_port) for c in commands if isinstance(c, AllocationOpened)]
    assert opened == [(rtcp.flow, reserved)]
    # The port's sockets moved with the reservation: none opened or closed on either side.
    assert two.ports.open == {reserved: V4}
    assert one.ports.open == {reserved - 1: V4}
    assert one.take() == []
    assert reserved in one.ports.free  # the maker's chooser no longer holds it
    assert registry.live == {reserved - 1: V4, reserved: V4}
    # Neither side keeps the reservation's 30 s: only the allocations' expiries remain.
    assert one.server.get_timer() == two.server.get_timer() == T0 + 600
    # A retransmission now gets the same answer.
    two.server.handle_client_datagram(request, rtcp.flow, two.now)
    (again,) = answers(two.take())
    assert again.transaction_id == response.transaction_id
    assert relayed(again) == [TransportAddr(PUBLIC_V4, reserved)]


def test_the_token_allocate_may_come_over_tcp_to_another_worker() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    rtcp = two.client("192.0.2.10:6000", transport=Transport.TCP)
    send_allocate(rtcp, with_token(token))
    assert two.take() == [FetchReservation(token)]
    hand_over(two, [one, two], token)
    (response,) = answers(two.take())
    assert relayed(response) == [TransportAddr(PUBLIC_V4, max(two.ports.open))]


def test_a_token_is_single_use_across_workers() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    send_allocate(two.client("192.0.2.10:5001"), with_token(token))
    two.take()
    hand_over(two, [one, two], token)
    assert answers(two.take())[0].cls == MessageClass.SUCCESS
    # Presented again, on its maker: it is no longer there, nor on the worker that used it.
    for h in (one, two):
        send_allocate(h.client("192.0.2.20:7000"), with_token(token))
        assert h.take() == [FetchReservation(token)]
        assert two.server.give_up_reservation(token, two.now) is None
        h.server.handle_fetched_reservation(token, None, h.now)
        (refused,) = answers(h.take())
        assert error_code(refused) == 508


def test_an_expired_reservation_is_not_given_up_and_its_token_is_508() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    reserved = max(one.ports.open)
    one.now = two.now = T0 + RESERVATION_LIFETIME  # its timer has not run yet
    assert one.server.give_up_reservation(token, one.now) is None
    send_allocate(two.client("192.0.2.10:5001"), with_token(token))
    assert two.take() == [FetchReservation(token)]
    hand_over(two, [one, two], token)
    (refused,) = answers(two.take())
    assert error_code(refused) == 508
    assert reserved not in two.ports.open
    one.advance(0)
    assert reserved not in one.ports.open  # closed by its maker's timer


def test_a_reservation_taken_over_expires_when_it_would_have_on_its_maker() -> None:
    # DF it cannot give: 420 after the hand-over; the reservation stays on the worker that
    # fetched it, for what was left of its 30 s, and the token still works there meanwhile.
    _, one, two = two_workers()
    token = reserve_on(one)
    reserved = max(one.ports.open)
    for h in (one, two):
        h.advance(20)
    rtcp = two.client("192.0.2.10:5001")
    send_allocate(rtcp, with_token(token), DF)
    two.take()
    hand_over(two, [one, two], token)
    (refused,) = answers(two.take())
    assert error_code(refused) == 420
    assert two.ports.open == {reserved: V4}
    assert two.server.get_timer() == T0 + RESERVATION_LIFETIME
    two.advance(RESERVATION_LIFETIME - 20)
    assert two.ports.open == {}  # closed at T0 + 30, not 30 s after the hand-over
    assert reserved in two.ports.free and reserved in one.ports.free


def test_a_reservation_held_after_a_refusal_is_used_by_the_retry_without_a_fetch() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    reserved = max(one.ports.open)
    rtcp = two.client("192.0.2.10:5001")
    send_allocate(rtcp, with_token(token), DF)
    two.take()
    hand_over(two, [one, two], token)
    assert error_code(answers(two.take())[0]) == 420
    # The retry without DF, as the RFC has the client do, finds the reservation here.
    response = rtcp.allocate(with_token(token))
    assert relayed(response) == [TransportAddr(PUBLIC_V4, reserved)]


def test_adopted_reservations_expire_in_order_with_local_ones() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    for h in (one, two):
        h.advance(10)
    reserve_on(two, "192.0.2.30:5000")  # expires at T0 + 40, its own
    # The first one comes over with 20 s left, and expires first.
    rtcp = two.client("192.0.2.10:5001")
    send_allocate(rtcp, with_token(token), DF)
    two.take()
    hand_over(two, [one, two], token)
    two.take()
    assert two.server.get_timer() == T0 + RESERVATION_LIFETIME


def test_a_fetch_unanswered_in_time_is_508_and_the_late_reservation_waits_for_the_retry() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    reserved = max(one.ports.open)
    rtcp = two.client("192.0.2.10:5001")
    send_allocate(rtcp, with_token(token))
    assert two.take() == [FetchReservation(token)]
    assert two.server.get_timer() == T0 + FETCH_TIMEOUT
    (refused,) = answers(two.advance(FETCH_TIMEOUT))
    assert error_code(refused) == 508
    hand_over(two, [one, two], token)  # late: no Allocate waits for it any more
    assert two.take() == []
    assert two.ports.open == {reserved: V4}
    assert relayed(rtcp.allocate(with_token(token))) == [TransportAddr(PUBLIC_V4, reserved)]


def test_a_held_allocate_whose_connection_closes_is_not_answered() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    rtcp = two.client("192.0.2.10:6000", transport=Transport.TCP)
    send_allocate(rtcp, with_token(token))
    two.take()
    two.server.handle_flow_closed(rtcp.flow, two.now)
    hand_over(two, [one, two], token)
    assert two.take() == []
    assert two.server.allocations() == []
    assert two.server.get_timer() == T0 + RESERVATION_LIFETIME  # held for another try


def test_a_second_allocate_with_a_token_being_fetched_is_508() -> None:
    _, one, two = two_workers()
    token = reserve_on(one)
    send_allocate(two.client("192.0.2.10:5001"), with_token(token))
    assert two.take() == [FetchReservation(token)]
    send_allocate(two.client("192.0.2.10:5002"), with_token(token))
    (refused,) = answers(two.take())
    assert error_code(refused) == 508


def test_fetches_are_bounded() -> None:
    _, _, two = two_workers()
    # One client IP each: answers to unauthenticated requests are rate-limited per IP.
    for n in range(MAX_FETCHES):
        client = two.client(f"10.0.{n // 250}.{n % 250 + 1}:5000")
        send_allocate(client, with_token(n.to_bytes(8, "big")))
    assert len(two.take()) == MAX_FETCHES
    send_allocate(two.client("10.1.0.1:5000"), with_token(b"\xff" * 8))
    (refused,) = answers(two.take())
    assert error_code(refused) == 508


def test_a_single_process_never_fetches() -> None:
    h = worker(Registry(), FakePorts())  # `worker` None: the only core
    assert h.server.config.worker is None
    response = h.client().allocate(with_token(bytes(8)))
    assert error_code(response) == 508
    assert not [c for c in h.take() if isinstance(c, FetchReservation)]


def test_a_core_refuses_a_worker_index_a_token_cannot_carry() -> None:
    assert worker(Registry(), FakePorts(), worker=0xFFFF).server.config.worker == 0xFFFF
    with pytest.raises(ValueError, match="65536"):
        worker(Registry(), FakePorts(), worker=0x10000)
