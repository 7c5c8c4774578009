"""Two cores of one relay, as two worker processes run them: what they share is injected
(`SiblingAllocations`, `Quotas`, the nonce key), and these tests step both by hand."""

from __future__ import annotations

import random
from dataclasses import replace

from xdpturn.proto import stun
from xdpturn.proto.addr import Family, PeerAddr, Transport, TransportAddr
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.proto.commands import SendToClient, SendToPeer
from xdpturn.proto.quotas import LocalQuotas
from xdpturn.proto.server import TurnServer
from xdpturn.proto.stats import Drop, Route
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

from .harness import PUBLIC_V4, Client, FakePorts, Harness, error_code

# Where a sibling's allocation sockets listen, as the supervisor would tell (behind 1:1 NAT the
# bind address, not the public one).
REACH_V4 = TransportAddr.parse("10.0.0.5:0").ip


class Registry:
    """The shared table of live allocation ports (server.workers.LivePorts and Siblings)."""

    def __init__(self) -> None:
        self.live: dict[int, frozenset[Family]] = {}

    def opened(self, port: int, families: frozenset[Family]) -> None:
        self.live[port] = families

    def closed(self, port: int) -> None:
        del self.live[port]

    def route(self, port: int, family: Family) -> PeerAddr | None:
        if family is not Family.IPV4 or family not in self.live.get(port, frozenset()):
            return None
        return PeerAddr(TransportAddr(REACH_V4, port))


def worker(
    registry: Registry, ports: FakePorts, quotas: LocalQuotas | None = None, **config: object
) -> Harness:
    h = Harness(ports=ports)
    h.config = replace(h.config, nonce_key=b"k" * 16, **config)  # type: ignore[arg-type]
    h.server = TurnServer(
        h.config,
        ports,
        random.Random(1),
        wall_clock=lambda: h.now,
        quotas=quotas,
        siblings=registry,
    )
    return h


def allocate_request(client: Client) -> Message:
    transport = (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    return client.message(Method.ALLOCATE, transport)


def test_a_packet_to_another_workers_allocation_goes_through_its_socket() -> None:
    registry = Registry()
    one = worker(registry, FakePorts(50000, 50099))
    two = worker(registry, FakePorts(50100, 50199))
    a, b = one.client("192.0.2.10:5000"), two.client("192.0.2.20:6000")
    assert a.allocate().cls == b.allocate().cls == MessageClass.SUCCESS
    assert registry.live == {a.relay_port: {Family.IPV4}, b.relay_port: {Family.IPV4}}
    # Without the registry this would be 403: the port is not one of this core's.
    assert a.bind(0x4000, b.relayed_v4).cls == MessageClass.SUCCESS
    assert b.permit(a.relayed_v4).cls == MessageClass.SUCCESS
    one.take()
    one.server.handle_client_datagram(encode_channel_data(0x4000, b"to b"), a.flow, one.now)
    (sent,) = one.take()
    assert sent == SendToPeer(
        a.relay_port, PeerAddr(TransportAddr(REACH_V4, b.relay_port)), b"to b"
    )
    # The other worker gets it from the relay's public address (the runtime puts it back).
    two.take()
    source = PeerAddr(TransportAddr(PUBLIC_V4, a.relay_port))
    two.server.handle_peer_datagram(b"to b", b.relay_port, source, two.now)
    (delivered,) = two.take()
    assert isinstance(delivered, SendToClient) and delivered.flow == b.flow
    assert one.server.stats.relayed[Route.CLIENT_TO_PEER].packets == 1
    assert two.server.stats.relayed[Route.PEER_TO_CLIENT].packets == 1


def test_closed_allocations_leave_the_registry_and_stay_refused() -> None:
    registry = Registry()
    one = worker(registry, FakePorts(50000, 50099))
    two = worker(registry, FakePorts(50100, 50199))
    a, b = one.client("192.0.2.10:5000"), two.client("192.0.2.20:6000")
    a.allocate()
    b.allocate()
    assert b.refresh(0).cls == MessageClass.SUCCESS
    assert registry.live == {a.relay_port: {Family.IPV4}}
    assert error_code(a.bind(0x4000, b.relayed_v4)) == 403
    assert a.permit(b.relayed_v4).cls == MessageClass.SUCCESS
    one.take()
    a.send_indication(b.relayed_v4, b"nobody")
    assert one.take() == []
    assert one.server.stats.drops[Drop.SELF_NOT_ALLOCATION] == 1


def test_quotas_and_nonces_are_shared_by_the_cores() -> None:
    registry, quotas = Registry(), LocalQuotas(per_ip=1)
    one = worker(registry, FakePorts(50000, 50099), quotas, max_allocations_per_ip=1)
    two = worker(registry, FakePorts(50100, 50199), quotas, max_allocations_per_ip=1)
    a = one.client("192.0.2.10:5000")
    assert a.allocate().cls == MessageClass.SUCCESS
    # The same client address over TCP (another 5-tuple) on the other worker: with a's nonce,
    # no challenge (a nonce is bound to the client's IP and port, not to the transport).
    b = two.client("192.0.2.10:5000", transport=Transport.TCP)
    b.nonce = a.nonce
    response = b.send(allocate_request(b), renew_nonce=False)
    assert error_code(response) == 486
    assert a.refresh(0).cls == MessageClass.SUCCESS
    response = b.send(allocate_request(b), renew_nonce=False)
    assert response.cls == MessageClass.SUCCESS
    assert quotas.per_ip == {a.flow.client.ip: 1}
