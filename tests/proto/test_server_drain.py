"""Draining the TURN core: no new allocations (300 Try Alternate or 508), the rest unchanged."""

from __future__ import annotations

from tests.proto.harness import PEER, Harness, addr, error_code
from xdpturn.proto import stun
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn.proto.commands import AllocationClosed, AllocationOpened, SendToClient, SendToPeer
from xdpturn.proto.server import DEFAULT_ALLOCATION_LIFETIME
from xdpturn.proto.stun import AttrType, MessageClass, Method

ALTERNATE = addr("192.0.2.200:3478")
ALTERNATE_V6 = addr("[2001:db8::200]:3478")


def test_draining_allocate_is_300_with_the_alternate_server_and_integrity() -> None:
    for alternate in (ALTERNATE, ALTERNATE_V6):
        h = Harness()
        assert not h.server.draining
        h.server.drain(alternate)
        assert h.server.draining
        client = h.client()
        response = client.allocate()  # Client.send checks MESSAGE-INTEGRITY with the key
        assert error_code(response) == 300
        assert response.get(AttrType.MESSAGE_INTEGRITY) is not None
        value = response.get(AttrType.ALTERNATE_SERVER)
        assert value is not None and stun.decode_address(value) == alternate
        assert h.ports.open == {} and h.server.allocations() == []
        assert not any(isinstance(c, AllocationOpened) for c in h.take())
        assert h.server.stats.errors[Method.ALLOCATE, 300] == 1


def test_draining_without_an_alternate_is_508() -> None:
    h = Harness()
    h.server.drain(None)
    response = h.client().allocate()
    assert error_code(response) == 508
    assert response.get(AttrType.ALTERNATE_SERVER) is None
    assert h.ports.open == {}


def test_unauthenticated_allocate_is_still_challenged_first() -> None:
    """The redirect is only given to a client that proved its credentials."""
    h = Harness()
    h.server.drain(ALTERNATE)
    client = h.client()
    msg = client.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    challenge = h.exchange(client.flow, msg)
    assert error_code(challenge) == 401 and challenge.get(AttrType.ALTERNATE_SERVER) is None


def test_existing_allocations_keep_working_until_they_expire() -> None:
    h = Harness()
    client = h.client()
    assert client.allocate().cls is MessageClass.SUCCESS
    h.take()
    h.server.drain(ALTERNATE)
    # Permissions, channels and refreshes are still granted to the allocation made before.
    assert client.permit(PEER).cls is MessageClass.SUCCESS
    assert client.bind(0x4001, PEER).cls is MessageClass.SUCCESS
    h.take()
    h.server.handle_client_datagram(encode_channel_data(0x4001, b"out"), client.flow, h.now)
    assert h.take() == [SendToPeer(client.relay_port, PEER, b"out")]
    h.server.handle_peer_datagram(b"in", client.relay_port, PEER, h.now)
    (sent,) = h.take()
    assert isinstance(sent, SendToClient) and decode_channel_data(sent.data) == (0x4001, b"in")
    h.advance(DEFAULT_ALLOCATION_LIFETIME - 10)
    assert client.refresh().cls is MessageClass.SUCCESS
    # A second allocation from another client is redirected meanwhile.
    assert error_code(h.client("192.0.2.11:5000").allocate()) == 300
    commands = h.advance(DEFAULT_ALLOCATION_LIFETIME + 1)
    assert [c.reason for c in commands if isinstance(c, AllocationClosed)] == ["expired"]
    assert h.server.allocations() == [] and h.ports.open == {}


def test_a_retransmitted_allocate_from_before_the_drain_gets_its_original_answer() -> None:
    h = Harness()
    client = h.client()
    assert error_code(client.refresh()) == 437  # learns the nonce, allocates nothing
    msg = client.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    data = client.signed(msg)
    h.server.handle_client_datagram(data, client.flow, h.now)
    original = [c.data for c in h.commands() if isinstance(c, SendToClient)]
    h.server.drain(ALTERNATE)
    h.server.handle_client_datagram(data, client.flow, h.now + 0.5)
    again = [c.data for c in h.commands() if isinstance(c, SendToClient)]
    assert again == original and stun.decode(again[0]).cls is MessageClass.SUCCESS
