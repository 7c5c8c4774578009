"""The peer policy through the server, for every way a peer address enters and for UDP, TCP and
TLS clients alike: a refused peer gets 403 (or, in a Send indication, a counted drop) and changes
nothing."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from tests.proto.harness import PUBLIC_V4, Client, Harness, error_code
from tests.proto.peer_cases import DANGEROUS, REGISTRY_SAMPLES
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, PeerAddr, Transport, TransportAddr
from xdpturn.proto.commands import SendToClient, SendToPeer
from xdpturn.proto.stats import Drop
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

PORT = 4000


def dual_stack_client(h: Harness, transport: Transport) -> Client:
    client = h.client(transport=transport)
    allocated = client.allocate(
        (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
    )
    assert allocated.cls == MessageClass.SUCCESS
    h.take()
    return client


def permit(client: Client, peer: PeerAddr) -> Message:
    return client.permit(peer)


def bind(client: Client, peer: PeerAddr) -> Message:
    return client.bind(0x4000, peer)


def refresh_naming_a_peer(client: Client, peer: PeerAddr) -> Message:
    """XOR-PEER-ADDRESS where the method has no use for it is judged all the same."""
    txid = client.harness.rng.randbytes(12)
    msg = Message(Method.REFRESH, MessageClass.REQUEST, txid)
    msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, txid))
    return client.send(msg)


def permit_second_of_two(client: Client, peer: PeerAddr) -> Message:
    """A refused peer after an allowed one fails the whole request."""
    return client.permit(PeerAddr(TransportAddr(ipaddress.ip_address("198.51.100.9"), 1)), peer)


REQUESTS: dict[str, Callable[[Client, PeerAddr], Message]] = {
    "create_permission": permit,
    "create_permission_second_peer": permit_second_of_two,
    "channel_bind": bind,
    "refresh_with_peer": refresh_naming_a_peer,
}
WAYS = [*REQUESTS, "send_indication"]
TRANSPORTS = [Transport.UDP, Transport.TCP, Transport.TLS]


def peer_of(text: str) -> PeerAddr:
    return PeerAddr(TransportAddr(ipaddress.ip_address(text), PORT))


def assert_refused(h: Harness, client: Client, way: str, peer: PeerAddr) -> None:
    h.advance(1)  # a refresh that went through would move the expiry
    before = h.server.allocations()
    if way == "send_indication":
        client.send_indication(peer, b"x")
        assert h.take() == []
        assert h.server.stats.drops[Drop.PEER_DENIED] == 1
    else:
        assert error_code(REQUESTS[way](client, peer)) == 403
        assert h.take() == []  # no InstallChannel, no allocation change
    assert h.server.allocations() == before


def assert_accepted(h: Harness, client: Client, way: str, peer: PeerAddr) -> None:
    if way == "send_indication":
        client.permit(peer)
        h.take()
        client.send_indication(peer, b"x")
        assert [c for c in h.take() if isinstance(c, SendToPeer)] == [
            SendToPeer(client.relay_port, peer, b"x")
        ]
    else:
        assert REQUESTS[way](client, peer).cls == MessageClass.SUCCESS


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("spelling", DANGEROUS)
def test_dangerous_spelling_is_refused(spelling: str, way: str, transport: Transport) -> None:
    h = Harness()
    assert_refused(h, dual_stack_client(h, transport), way, peer_of(spelling))


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("row", "sample", "relayed"), REGISTRY_SAMPLES, ids=lambda v: str(v))
def test_registry_row(row: str, sample: str, relayed: bool, way: str, transport: Transport) -> None:
    h = Harness()
    client = dual_stack_client(h, transport)
    if relayed:
        assert_accepted(h, client, way, peer_of(sample))
    else:
        assert_refused(h, client, way, peer_of(sample))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    "spelling", ["::ffff:203.0.113.1", "64:ff9b::cb00:7101", "2002:cb00:7101::1", "::203.0.113.1"]
)
def test_the_relays_own_address_in_another_spelling_is_refused(spelling: str, way: str) -> None:
    h = Harness()
    assert_refused(h, dual_stack_client(h, Transport.UDP), way, peer_of(spelling))


def test_the_relays_own_address_still_reaches_its_allocations() -> None:
    h = Harness()
    a, b = dual_stack_client(h, Transport.UDP), h.client("192.0.2.11:5000")
    b.allocate()
    assert a.permit(b.relayed_v4).cls == MessageClass.SUCCESS
    assert b.permit(PeerAddr(TransportAddr(PUBLIC_V4, a.relay_port))).cls == MessageClass.SUCCESS
    h.take()
    a.send_indication(b.relayed_v4, b"hello")
    delivered = [c for c in h.take() if isinstance(c, SendToClient)]
    assert [c.flow for c in delivered] == [b.flow]
