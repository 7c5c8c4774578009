"""State-machine tests for the TURN server: every method and error path, time stepped by hand."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz.invariants import max_unauthenticated_answer
from tests.proto.harness import (
    PEER,
    PEER_V6,
    PUBLIC_V4,
    PUBLIC_V6,
    REALM,
    SECRET,
    T0,
    Client,
    FakePorts,
    Harness,
    addr,
    error_code,
    flow_of,
    routes,
)
from xdpturn.proto import stun
from xdpturn.proto.addr import Family, PeerAddr, Transport, TransportAddr
from xdpturn.proto.auth import Authenticator, mint_rest_credentials
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn.proto.commands import (
    AllocationClosed,
    AllocationOpened,
    ChannelRoute,
    InstallChannel,
    OpenRelayPort,
    PortResult,
    RemoveChannel,
    SendToClient,
    SendToPeer,
)
from xdpturn.proto.server import (
    CHANNEL_COOLDOWN,
    CHANNEL_LIFETIME,
    DEFAULT_ALLOCATION_LIFETIME,
    MAX_ALLOCATION_LIFETIME,
    PERMISSION_LIFETIME,
    ServerConfig,
)
from xdpturn.proto.stats import Drop, Route
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method


@pytest.fixture
def h() -> Harness:
    return Harness()


# Binding and authentication


def test_binding_reports_the_client_address(h: Harness) -> None:
    flow = flow_of("192.0.2.10:5000")
    request = Message(Method.BINDING, MessageClass.REQUEST, b"\x01" * 12)
    response = h.exchange(flow, request)
    assert response.cls == MessageClass.SUCCESS
    mapped = response.get(AttrType.XOR_MAPPED_ADDRESS)
    assert mapped is not None
    assert stun.decode_xor_address(mapped, response.transaction_id) == flow.client


def test_unauthenticated_allocate_is_challenged_with_realm_and_nonce(h: Harness) -> None:
    client = h.client()
    msg = client.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    response = h.exchange(client.flow, msg)
    assert error_code(response) == 401
    assert response.get(AttrType.REALM) == REALM.encode()
    assert response.get(AttrType.NONCE)
    assert h.server.stats.auth_failures == 1
    assert h.ports.open == {}


def test_wrong_password_is_401_and_allocates_nothing(h: Harness) -> None:
    client = h.client()
    client.password = "not-it"
    assert error_code(client.allocate()) == 401
    assert h.ports.open == {}


def test_stale_nonce_is_438_with_a_fresh_nonce_that_works(h: Harness) -> None:
    client = h.client()
    allocated = client.allocate((AttrType.LIFETIME, stun.encode_u32(3600)))
    assert allocated.cls == MessageClass.SUCCESS
    h.advance(700)  # nonces last 600 s
    response = client.send(client.message(Method.REFRESH), renew_nonce=False)
    assert error_code(response) == 438
    fresh = response.get(AttrType.NONCE)
    assert fresh and fresh != client.nonce
    client.nonce = fresh
    assert client.refresh().cls == MessageClass.SUCCESS


def test_rest_api_credentials_and_secret_rotation() -> None:
    config = ServerConfig(
        realm=REALM,
        public_ipv4=PUBLIC_V4,
        auth=Authenticator(secrets=["old", "new"]),
    )
    h = Harness(config=config)
    for i, secret in enumerate(["old", "new"]):
        creds = mint_rest_credentials(secret, now=h.now, ttl=600, user_id="bob")
        client = Client(h, flow_of(f"192.0.2.{20 + i}:5000"), creds.username, creds.password)
        assert client.allocate().cls == MessageClass.SUCCESS
    expired = mint_rest_credentials("new", now=h.now - 1000, ttl=600, user_id="bob")
    client = Client(h, flow_of("192.0.2.30:5000"), expired.username, expired.password)
    assert error_code(client.allocate()) == 401


def test_sha256_integrity_is_answered_in_kind(h: Harness) -> None:
    client = h.client()
    client.sha256 = True
    client.allocate()
    response = client.refresh()  # exchange() checks the integrity with the client's key
    assert response.get(AttrType.MESSAGE_INTEGRITY_SHA256) is not None
    assert response.get(AttrType.MESSAGE_INTEGRITY) is None


# Allocate


def test_allocate_grants_a_relayed_address_and_default_lifetime(h: Harness) -> None:
    client = h.client()
    response = client.allocate()
    assert response.cls == MessageClass.SUCCESS
    relayed = response.get(AttrType.XOR_RELAYED_ADDRESS)
    assert relayed is not None
    address = stun.decode_xor_address(relayed, response.transaction_id)
    assert address.ip == PUBLIC_V4
    assert h.ports.open == {address.port: frozenset({Family.IPV4})}
    lifetime = response.get(AttrType.LIFETIME)
    assert lifetime is not None and stun.decode_u32(lifetime) == DEFAULT_ALLOCATION_LIFETIME
    mapped = response.get(AttrType.XOR_MAPPED_ADDRESS)
    assert mapped is not None
    assert stun.decode_xor_address(mapped, response.transaction_id) == client.flow.client
    opened = [c for c in h.take() if isinstance(c, AllocationOpened)]
    assert [(o.relay_port, o.username) for o in opened] == [(address.port, "alice")]


@pytest.mark.parametrize(
    ("requested", "granted"),
    [(100, DEFAULT_ALLOCATION_LIFETIME), (1200, 1200), (100_000, MAX_ALLOCATION_LIFETIME)],
)
def test_allocate_lifetime_is_clamped(h: Harness, requested: int, granted: int) -> None:
    response = h.client().allocate((AttrType.LIFETIME, stun.encode_u32(requested)))
    lifetime = response.get(AttrType.LIFETIME)
    assert lifetime is not None and stun.decode_u32(lifetime) == granted


def test_retransmitted_allocate_gets_the_same_answer_and_a_new_one_437(h: Harness) -> None:
    client = h.client()
    client.allocate()
    msg = client.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    first = client.signed(msg)
    h.server.handle_client_datagram(first, client.flow, h.now)
    answer = [c for c in h.commands() if isinstance(c, SendToClient)]
    assert error_code(stun.decode(answer[0].data)) == 437

    client2 = h.client("192.0.2.99:2")
    assert error_code(client2.request(Method.REFRESH)) == 437  # learns the nonce
    msg = client2.message(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
    )
    data = client2.signed(msg)
    h.server.handle_client_datagram(data, client2.flow, h.now)
    original = [c.data for c in h.commands() if isinstance(c, SendToClient)]
    h.server.handle_client_datagram(data, client2.flow, h.now + 0.5)
    again = [c.data for c in h.commands() if isinstance(c, SendToClient)]
    assert original == again
    assert stun.decode(original[0]).cls == MessageClass.SUCCESS
    assert len(h.server.allocations()) == 2


def test_allocate_without_requested_transport_is_400_and_tcp_is_442(h: Harness) -> None:
    client = h.client()
    assert error_code(client.request(Method.ALLOCATE)) == 400
    response = client.request(
        Method.ALLOCATE, (AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(6))
    )
    assert error_code(response) == 442
    assert h.ports.open == {}


def test_allocate_ipv6_and_dual_stack(h: Harness) -> None:
    v6 = h.client("192.0.2.10:5000").allocate(
        (AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
    )
    relayed = [
        stun.decode_xor_address(v, v6.transaction_id)
        for a, v in v6.attributes
        if a == AttrType.XOR_RELAYED_ADDRESS
    ]
    assert [r.ip for r in relayed] == [PUBLIC_V6]
    dual = h.client("192.0.2.11:5000").allocate(
        (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
    )
    relayed = [
        stun.decode_xor_address(v, dual.transaction_id)
        for a, v in dual.attributes
        if a == AttrType.XOR_RELAYED_ADDRESS
    ]
    assert {r.ip for r in relayed} == {PUBLIC_V4, PUBLIC_V6}
    assert len({r.port for r in relayed}) == 1


def test_address_family_errors() -> None:
    h = Harness(
        config=ServerConfig(
            realm=REALM, public_ipv4=PUBLIC_V4, auth=Authenticator(users={"alice": "wonderland"})
        )
    )
    client = h.client()
    both = client.allocate(
        (AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV4)),
        (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6)),
    )
    assert error_code(both) == 400
    unsupported = client.allocate(
        (AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
    )
    assert error_code(unsupported) == 440
    bogus = client.allocate((AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(3)))
    assert error_code(bogus) == 440
    # Dual stack on an IPv4-only relay: IPv4 granted, IPv6 refused in ADDRESS-ERROR-CODE.
    dual = client.allocate(
        (AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6))
    )
    assert dual.cls == MessageClass.SUCCESS
    assert dual.get(AttrType.ADDRESS_ERROR_CODE) is not None


def test_dont_fragment_is_accepted(h: Harness) -> None:
    assert h.client().allocate((AttrType.DONT_FRAGMENT, b"")).cls == MessageClass.SUCCESS


def test_unknown_comprehension_required_attribute_is_420(h: Harness) -> None:
    response = h.client().allocate((0x0077, b"\x00\x00\x00\x00"))
    assert error_code(response) == 420
    unknown = response.get(AttrType.UNKNOWN_ATTRIBUTES)
    assert unknown is not None and stun.decode_unknown_attributes(unknown) == [0x0077]
    # Comprehension-optional ones are ignored.
    assert h.client().allocate((0x8077, b"\x00\x00")).cls == MessageClass.SUCCESS


def test_quotas_per_user_per_ip_and_total() -> None:
    config = ServerConfig(
        realm=REALM,
        public_ipv4=PUBLIC_V4,
        auth=Authenticator(users={"alice": "wonderland", "bob": "builder"}),
        max_allocations=3,
        max_allocations_per_user=2,
        max_allocations_per_ip=2,
    )
    h = Harness(config=config)
    assert h.client("192.0.2.1:1").allocate().cls == MessageClass.SUCCESS
    assert h.client("192.0.2.2:1").allocate().cls == MessageClass.SUCCESS
    assert error_code(h.client("192.0.2.3:1").allocate()) == 486  # alice has 2
    bob = h.client("192.0.2.1:2", user="alice")
    bob.username, bob.password = "bob", "builder"
    assert bob.allocate().cls == MessageClass.SUCCESS  # 192.0.2.1 now has 2
    bob2 = h.client("192.0.2.1:3")
    bob2.username, bob2.password = "bob", "builder"
    assert error_code(bob2.allocate()) == 508  # total 3 reached before the IP check


def test_quota_per_ip_counts_every_user_and_frees_on_delete() -> None:
    config = ServerConfig(
        realm=REALM,
        public_ipv4=PUBLIC_V4,
        auth=Authenticator(users={"alice": "wonderland", "bob": "builder"}),
        max_allocations_per_ip=2,
    )
    h = Harness(config=config)
    alice = h.client("192.0.2.1:1")
    assert alice.allocate().cls == MessageClass.SUCCESS
    bob = h.client("192.0.2.1:2")
    bob.username, bob.password = "bob", "builder"
    assert bob.allocate().cls == MessageClass.SUCCESS
    bob2 = h.client("192.0.2.1:3")
    bob2.username, bob2.password = "bob", "builder"
    assert error_code(bob2.allocate()) == 486  # 192.0.2.1 has 2
    assert alice.refresh(0).cls == MessageClass.SUCCESS
    assert bob2.allocate().cls == MessageClass.SUCCESS  # alice's went, so did its count


def test_port_exhaustion_is_508() -> None:
    h = Harness(ports=FakePorts(50000, 50000))
    assert h.client("192.0.2.1:1").allocate().cls == MessageClass.SUCCESS
    assert error_code(h.client("192.0.2.2:1").allocate()) == 508


def test_ports_the_runtime_cannot_open_are_skipped_then_508() -> None:
    h = Harness(ports=FakePorts(50000, 50002))
    h.ports.refused = {50000, 50001}  # held by other programs
    client = h.client("192.0.2.1:1")
    assert client.allocate().cls == MessageClass.SUCCESS and client.relay_port == 50002
    assert error_code(h.client("192.0.2.2:1").allocate()) == 508
    assert list(h.ports.open) == [50002]  # the refused ones were given back


def test_a_runtime_out_of_resources_gets_one_attempt_then_508() -> None:
    # Out of file descriptors, every port would fail alike: one attempt, not the whole range.
    h = Harness(ports=FakePorts(50000, 50999))
    h.ports.exhausted = True
    response = h.client("192.0.2.1:1").allocate()
    assert error_code(response) == 508
    assert h.ports.attempts == 1
    assert h.ports.open == {} and len(h.ports.free) == 1000  # everything given back
    h.ports.exhausted = False  # descriptors freed: the next Allocate succeeds
    assert h.client("192.0.2.2:1").allocate().cls == MessageClass.SUCCESS


def test_a_pair_out_of_resources_closes_its_open_half() -> None:
    h = Harness(ports=FakePorts(50000, 50999))
    client = h.client("192.0.2.1:1")
    opened = h.ports.opened

    def second_port_exhausted(command: OpenRelayPort) -> PortResult:
        h.ports.exhausted = command.relay_port % 2 == 1  # the pair's N + 1 fails
        return opened(command)

    h.ports.opened = second_port_exhausted  # type: ignore[method-assign]
    even_port_reserve = (AttrType.EVEN_PORT, stun.encode_even_port(True))
    assert error_code(client.allocate(even_port_reserve)) == 508
    assert h.ports.open == {} and h.ports.attempts == 2


# Refresh and expiry


def test_refresh_lifetime_zero_deletes_and_releases(h: Harness) -> None:
    client = h.client()
    client.allocate()
    client.permit(PEER)
    client.bind(0x4000, PEER)
    h.take()
    response = client.refresh(0)
    lifetime = response.get(AttrType.LIFETIME)
    assert lifetime is not None and stun.decode_u32(lifetime) == 0
    commands = h.take()
    assert routes(commands, RemoveChannel) == {
        ChannelRoute(client.flow.client, 0x4000, client.relay_port, PEER)
    }
    assert any(isinstance(c, AllocationClosed) and c.reason == "refresh" for c in commands)
    assert h.ports.open == {}
    assert error_code(client.refresh()) == 437


def test_refresh_extends_and_expiry_deletes(h: Harness) -> None:
    client = h.client()
    client.allocate()
    assert h.server.get_timer() == T0 + DEFAULT_ALLOCATION_LIFETIME
    h.advance(500)
    client.refresh(1200)
    commands = h.advance(1199)
    assert not any(isinstance(c, AllocationClosed) for c in commands)
    commands = h.advance(2)
    assert [c.reason for c in commands if isinstance(c, AllocationClosed)] == ["expired"]
    assert h.ports.open == {}
    assert h.server.get_timer() is None


def test_refresh_by_another_user_is_441(h: Harness) -> None:
    client = h.client()
    client.allocate()
    intruder = h.client()
    intruder.username = f"{int(h.now) + 100}:mallory"
    intruder.password = Authenticator(secrets=[SECRET]).passwords(intruder.username, h.now)[0]
    assert error_code(intruder.refresh()) == 441


def test_refresh_with_other_family_is_443(h: Harness) -> None:
    client = h.client()
    client.allocate()
    response = client.request(
        Method.REFRESH,
        (AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6)),
    )
    assert error_code(response) == 443


def test_requests_without_allocation_are_437(h: Harness) -> None:
    client = h.client()
    assert error_code(client.refresh()) == 437
    assert error_code(client.permit(PEER)) == 437
    assert error_code(client.bind(0x4000, PEER)) == 437


# Permissions


def test_create_permission_policy_and_family(h: Harness) -> None:
    client = h.client()
    client.allocate()
    assert client.permit(PEER).cls == MessageClass.SUCCESS
    assert error_code(client.permit(PeerAddr(addr("10.1.2.3:80")))) == 403
    assert error_code(client.permit(PeerAddr(addr("127.0.0.1:80")))) == 403
    assert error_code(client.permit(PEER_V6)) == 443
    # All or nothing: one forbidden peer fails the whole request.
    other = PeerAddr(addr("198.51.100.8:1"))
    assert error_code(client.permit(other, PeerAddr(addr("192.168.1.1:1")))) == 403
    h.server.handle_peer_datagram(b"x", client.relay_port, other, h.now)
    assert h.server.stats.drops[Drop.NO_PERMISSION] == 1


def test_allow_peer_opens_a_private_range() -> None:
    config = ServerConfig(
        realm=REALM,
        public_ipv4=PUBLIC_V4,
        auth=Authenticator(users={"alice": "wonderland"}),
        allow_peers=[ipaddress.IPv4Network("10.0.0.0/8")],
    )
    h = Harness(config=config)
    client = h.client()
    client.allocate()
    assert client.permit(PeerAddr(addr("10.1.2.3:80"))).cls == MessageClass.SUCCESS


def test_permission_expires_after_300s_unless_refreshed(h: Harness) -> None:
    client = h.client()
    client.allocate((AttrType.LIFETIME, stun.encode_u32(3600)))
    client.permit(PEER)
    h.advance(PERMISSION_LIFETIME - 10)
    h.server.handle_peer_datagram(b"hi", client.relay_port, PEER, h.now)
    assert any(isinstance(c, SendToClient) for c in h.take())
    client.permit(PEER)  # refresh
    h.advance(PERMISSION_LIFETIME - 10)
    h.server.handle_peer_datagram(b"hi", client.relay_port, PEER, h.now)
    assert any(isinstance(c, SendToClient) for c in h.take())
    h.advance(20)
    h.server.handle_peer_datagram(b"hi", client.relay_port, PEER, h.now)
    assert not any(isinstance(c, SendToClient) for c in h.take())
    assert h.server.stats.drops[Drop.NO_PERMISSION] == 1


# Channels


def test_channel_bind_installs_a_route_and_relays_both_ways(h: Harness) -> None:
    client = h.client()
    client.allocate()
    h.take()
    assert client.bind(0x4001, PEER).cls == MessageClass.SUCCESS
    route = ChannelRoute(client.flow.client, 0x4001, client.relay_port, PEER)
    assert routes(h.take(), InstallChannel) == {route}
    # Client -> peer: the length field decides the payload; padding is ignored.
    data = encode_channel_data(0x4001, b"hello") + b"\x00\x00\x00"
    h.server.handle_client_datagram(data, client.flow, h.now)
    assert h.take() == [SendToPeer(client.relay_port, PEER, b"hello")]
    # Peer -> client: ChannelData on the bound channel.
    h.server.handle_peer_datagram(b"world", client.relay_port, PEER, h.now)
    (sent,) = h.take()
    assert isinstance(sent, SendToClient) and sent.flow == client.flow
    assert decode_channel_data(sent.data) == (0x4001, b"world")


@pytest.mark.parametrize("number", [0x3FFF, 0x8000, 0xFFFF])
def test_channel_number_out_of_range_is_400(h: Harness, number: int) -> None:
    client = h.client()
    client.allocate()
    assert error_code(client.bind(number, PEER)) == 400


def test_rfc5766_channel_numbers_are_accepted(h: Harness) -> None:
    client = h.client()
    client.allocate()
    assert client.bind(0x7FFF, PEER).cls == MessageClass.SUCCESS
    h.take()
    h.server.handle_client_datagram(encode_channel_data(0x7FFF, b"legacy"), client.flow, h.now)
    assert h.take() == [SendToPeer(client.relay_port, PEER, b"legacy")]


def test_channel_rebinding_rules(h: Harness) -> None:
    client = h.client()
    client.allocate()
    other = PeerAddr(addr("198.51.100.8:4000"))
    assert client.bind(0x4000, PEER).cls == MessageClass.SUCCESS
    assert error_code(client.bind(0x4000, other)) == 400  # number taken by another peer
    assert error_code(client.bind(0x4001, PEER)) == 400  # peer has another number
    assert client.bind(0x4000, PEER).cls == MessageClass.SUCCESS  # same pair refreshes


def test_channel_reservation_cooldown() -> None:
    h = Harness()
    client = h.client()
    client.allocate((AttrType.LIFETIME, stun.encode_u32(3600)))
    other = PeerAddr(addr("198.51.100.8:4000"))
    client.bind(0x4000, PEER)
    h.take()
    commands = h.advance(CHANNEL_LIFETIME + 1)
    assert routes(commands, RemoveChannel) == {
        ChannelRoute(client.flow.client, 0x4000, client.relay_port, PEER)
    }
    client.refresh(3600)
    assert error_code(client.bind(0x4000, other)) == 400
    h.advance(CHANNEL_COOLDOWN)
    assert client.bind(0x4000, other).cls == MessageClass.SUCCESS


def test_channel_route_follows_the_permission(h: Harness) -> None:
    client = h.client()
    client.allocate()
    client.bind(0x4000, PEER)
    route = ChannelRoute(client.flow.client, 0x4000, client.relay_port, PEER)
    assert routes(h.take(), InstallChannel) == {route}
    # The permission (300 s) lapses before the channel (600 s): the route goes.
    commands = h.advance(PERMISSION_LIFETIME + 1)
    assert routes(commands, RemoveChannel) == {route}
    h.server.handle_client_datagram(encode_channel_data(0x4000, b"x"), client.flow, h.now)
    assert h.take() == []
    assert h.server.stats.drops[Drop.NO_PERMISSION] == 1
    # A new permission brings it back.
    client.permit(PEER)
    assert routes(h.take(), InstallChannel) == {route}


def test_tcp_clients_get_padded_channel_data_and_no_fast_path_route(h: Harness) -> None:
    client = h.client(transport=Transport.TCP)
    client.allocate()
    client.bind(0x4000, PEER)
    commands = h.take()
    assert routes(commands, InstallChannel) == set()
    h.server.handle_peer_datagram(b"abcde", client.relay_port, PEER, h.now)
    (sent,) = h.take()
    assert isinstance(sent, SendToClient)
    assert len(sent.data) == 12 and decode_channel_data(sent.data) == (0x4000, b"abcde")


def test_unbound_channel_data_is_dropped_and_counted(h: Harness) -> None:
    client = h.client()
    client.allocate()
    h.take()
    h.server.handle_client_datagram(encode_channel_data(0x4005, b"x"), client.flow, h.now)
    assert h.take() == []
    assert h.server.stats.drops[Drop.NO_CHANNEL] == 1
    stranger = flow_of("192.0.2.77:1")
    h.server.handle_client_datagram(encode_channel_data(0x4005, b"x"), stranger, h.now)
    assert h.server.stats.drops[Drop.NO_ALLOCATION] == 1


# Indications


def test_send_and_data_indications(h: Harness) -> None:
    client = h.client()
    client.allocate()
    h.take()
    client.send_indication(PEER, b"before permission")
    assert h.take() == []
    assert h.server.stats.drops[Drop.NO_PERMISSION] == 1
    client.permit(PEER)
    h.take()
    client.send_indication(PEER, b"ping")
    assert h.take() == [SendToPeer(client.relay_port, PEER, b"ping")]
    h.server.handle_peer_datagram(b"pong", client.relay_port, PEER, h.now)
    (sent,) = h.take()
    assert isinstance(sent, SendToClient)
    indication = stun.decode(sent.data)
    assert (indication.method, indication.cls) == (Method.DATA, MessageClass.INDICATION)
    peer = indication.get(AttrType.XOR_PEER_ADDRESS)
    assert peer is not None
    assert stun.decode_xor_address(peer, indication.transaction_id) == PEER
    assert indication.get(AttrType.DATA) == b"pong"


def test_ipv6_client_relays_to_ipv4_peer(h: Harness) -> None:
    client = h.client("[2001:db8:1::10]:5000")
    client.allocate()
    client.bind(0x4000, PEER)
    h.take()
    h.server.handle_client_datagram(encode_channel_data(0x4000, b"x"), client.flow, h.now)
    assert h.take() == [SendToPeer(client.relay_port, PEER, b"x")]


# Packets to itself


def two_clients(h: Harness, extra: tuple[tuple[int, bytes], ...] = ()) -> tuple[Client, Client]:
    a = h.client("192.0.2.10:5000")
    b = h.client("[2001:db8:3::20]:6000")
    a.allocate(*extra)
    b.allocate(*extra)
    h.take()
    return a, b


def test_packets_to_itself_through_channels(h: Harness) -> None:
    a, b = two_clients(h)
    a.bind(0x4000, b.relayed_v4)
    b.bind(0x4001, a.relayed_v4)
    commands = h.take()
    # Both halves of the hairpin are in the fast path.
    assert routes(commands, InstallChannel) == {
        ChannelRoute(a.flow.client, 0x4000, a.relay_port, b.relayed_v4),
        ChannelRoute(b.flow.client, 0x4001, b.relay_port, a.relayed_v4),
    }
    h.server.handle_client_datagram(encode_channel_data(0x4000, b"to b"), a.flow, h.now)
    (sent,) = h.take()  # never a SendToPeer
    assert isinstance(sent, SendToClient) and sent.flow == b.flow
    assert decode_channel_data(sent.data) == (0x4001, b"to b")
    h.server.handle_client_datagram(encode_channel_data(0x4001, b"to a"), b.flow, h.now)
    (sent,) = h.take()
    assert isinstance(sent, SendToClient) and sent.flow == a.flow
    assert decode_channel_data(sent.data) == (0x4000, b"to a")
    assert h.server.stats.relayed[Route.LOOPBACK].packets == 2


def test_packets_to_itself_through_indications(h: Harness) -> None:
    a, b = two_clients(h)
    a.permit(b.relayed_v4)
    b.permit(a.relayed_v4)
    h.take()
    a.send_indication(b.relayed_v4, b"hello b")
    (sent,) = h.take()
    assert isinstance(sent, SendToClient) and sent.flow == b.flow
    indication = stun.decode(sent.data)
    peer = indication.get(AttrType.XOR_PEER_ADDRESS)
    assert peer is not None
    assert stun.decode_xor_address(peer, indication.transaction_id) == a.relayed_v4
    assert indication.get(AttrType.DATA) == b"hello b"


def test_packets_to_itself_across_families(h: Harness) -> None:
    dual = ((AttrType.ADDITIONAL_ADDRESS_FAMILY, stun.encode_address_family(Family.IPV6)),)
    a, b = two_clients(h, dual)
    a.bind(0x4000, b.relayed_v6)
    b.bind(0x4002, a.relayed_v6)
    h.take()
    h.server.handle_client_datagram(encode_channel_data(0x4000, b"v6 hop"), a.flow, h.now)
    (sent,) = h.take()
    assert isinstance(sent, SendToClient) and sent.flow == b.flow
    assert decode_channel_data(sent.data) == (0x4002, b"v6 hop")


def test_packets_to_own_address_but_no_allocation_are_refused(h: Harness) -> None:
    a, _ = two_clients(h)
    sshd = PeerAddr(TransportAddr(PUBLIC_V4, 22))
    assert error_code(a.bind(0x4000, sshd)) == 403
    a.permit(sshd)  # permissions are per IP; the port is checked when sending
    h.take()
    a.send_indication(sshd, b"SSH-2.0")
    assert h.take() == []
    assert h.server.stats.drops[Drop.SELF_NOT_ALLOCATION] == 1


# Robustness


def test_malformed_input_is_dropped_and_counted(h: Harness) -> None:
    client = h.client()
    client.allocate()
    h.take()
    valid = stun.encode(Message(Method.BINDING, MessageClass.REQUEST, b"\x02" * 12))
    bad_cookie = valid[:4] + b"\xde\xad\xbe\xef" + valid[8:]
    for junk in (b"", b"\x00", valid[:19], valid + b"\x00", bad_cookie, b"\xff" * 40):
        h.server.handle_client_datagram(junk, client.flow, h.now)
    assert h.take() == []
    assert h.server.stats.drops.total() == 6
    # Oversized: a whole 64 KiB datagram of attributes no one knows is answered, not choked on.
    oversized = bytearray(valid[:20] + bytes(65_000))
    oversized[2:4] = (65_000).to_bytes(2, "big")
    response = h.exchange(client.flow, bytes(oversized))
    assert error_code(response) == 420
    # Still serving.
    assert client.refresh().cls == MessageClass.SUCCESS


def test_wrong_integrity_is_401(h: Harness) -> None:
    client = h.client()
    client.allocate()
    data = bytearray(client.signed(client.message(Method.REFRESH), fingerprint=False))
    data[-1] ^= 0xFF  # the last byte of the MESSAGE-INTEGRITY value
    assert error_code(h.exchange(client.flow, bytes(data))) == 401


@settings(max_examples=300, deadline=None)
@given(
    junk=st.binary(max_size=200),
    prefix=st.sampled_from([b"", b"\x40\x00", b"\x7f\xff"]),
    # A STUN header that frames the junk: Binding, Allocate, Refresh, CreatePermission and
    # ChannelBind requests, a Send indication, a response.
    stun_type=st.none() | st.sampled_from([0x001, 0x003, 0x004, 0x008, 0x009, 0x016, 0x103]),
    transport=st.sampled_from([Transport.UDP, Transport.TCP]),
)
def test_junk_gets_at_most_a_bounded_unsigned_answer_and_changes_nothing(
    junk: bytes, prefix: bytes, stun_type: int | None, transport: Transport
) -> None:
    h = Harness()
    owner = h.client()
    owner.allocate()
    owner.bind(0x4000, PEER)
    h.take()
    before = h.server.allocations()
    if stun_type is None:
        data = prefix + junk
    else:
        junk += bytes(-len(junk) % 4)
        data = struct.pack("!HHI", stun_type, len(junk), stun.MAGIC_COOKIE) + bytes(12) + junk
    stranger = flow_of("192.0.2.99:7000", transport)
    h.server.handle_client_datagram(data, stranger, h.now)
    h.server.handle_peer_datagram(data, owner.relay_port, PeerAddr(addr("198.51.100.99:1")), h.now)
    h.server.handle_peer_datagram(data, owner.relay_port + 1, PEER, h.now)
    commands = h.commands()
    # Only a STUN request is answered (Binding, or a challenge), unsigned, to its sender.
    assert all(isinstance(c, SendToClient) and c.flow == stranger for c in commands)
    assert len(commands) <= 1
    for command in commands:
        assert isinstance(command, SendToClient)
        answer = stun.decode(command.data)
        assert answer.cls in (MessageClass.SUCCESS, MessageClass.ERROR)
        assert answer.get(AttrType.MESSAGE_INTEGRITY) is None
        assert len(command.data) <= max_unauthenticated_answer(REALM)
        assert stun.decode(data).cls == MessageClass.REQUEST
    assert h.server.allocations() == before
    assert h.ports.open.keys() == {owner.relay_port}


def test_close_releases_everything(h: Harness) -> None:
    a, b = two_clients(h)
    a.bind(0x4000, b.relayed_v4)
    h.take()
    h.server.close(h.now)
    commands = h.take()
    assert len(routes(commands, RemoveChannel)) == 1
    assert len([c for c in commands if isinstance(c, AllocationClosed)]) == 2
    assert h.ports.open == {}
    assert h.server.allocations() == []
