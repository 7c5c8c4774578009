"""The core tells its runtime which peer addresses may send to which allocation port (for the
kernel's view: datagrams no permission admits are dropped before Python, issue 12)."""

from __future__ import annotations

from tests.proto.harness import PEER, Harness, addr
from xdpturn.proto.addr import PeerAddr, Transport
from xdpturn.proto.commands import AddPermission, Command, RemovePermission
from xdpturn.proto.server import PERMISSION_LIFETIME


def permissions(commands: list[Command]) -> list[Command]:
    return [c for c in commands if isinstance(c, AddPermission | RemovePermission)]


def test_create_permission_announces_each_peer_address_once() -> None:
    h = Harness()
    client = h.client()
    client.allocate()
    h.take()
    other_port = PeerAddr(addr("198.51.100.7:5000"))  # same address: one permission
    client.permit(PEER, other_port)
    assert permissions(h.take()) == [AddPermission(client.relay_port, PEER.ip)]
    client.permit(PEER)  # a refresh changes nothing the runtime must know
    client.bind(0x4000, PEER)
    assert permissions(h.take()) == []


def test_an_expired_permission_is_withdrawn() -> None:
    h = Harness()
    client = h.client()
    client.allocate()
    client.permit(PEER)
    h.take()
    assert permissions(h.advance(PERMISSION_LIFETIME + 1)) == [
        RemovePermission(client.relay_port, PEER.ip)
    ]


def test_closing_the_allocation_withdraws_its_permissions() -> None:
    h = Harness()
    client = h.client()
    client.allocate()
    client.permit(PEER)
    client.bind(0x4001, PeerAddr(addr("198.51.100.9:4000")))
    h.take()
    client.refresh(0)
    withdrawn = set(permissions(h.take()))
    assert withdrawn == {
        RemovePermission(client.relay_port, PEER.ip),
        RemovePermission(client.relay_port, addr("198.51.100.9:1").ip),
    }


def test_tcp_allocations_announce_permissions_too() -> None:
    """Peers reach every allocation over UDP, whatever the client's transport."""
    h = Harness()
    client = h.client(transport=Transport.TCP)
    client.allocate()
    h.take()
    client.permit(PEER)
    assert permissions(h.take()) == [AddPermission(client.relay_port, PEER.ip)]
