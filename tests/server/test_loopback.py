"""The real TurnServer behind the runtime, over loopback UDP, spoken to in raw STUN.

Each test is one client socket and plain UDP peer sockets; nothing but the relay sits between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import Callable

import pytest

from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn.proto.meter import DirectionTraffic
from xdpturn.proto.server import PERMISSION_LIFETIME
from xdpturn.proto.stats import Drop, Route
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method
from xdpturn.server import RelayServer

from .helpers import (
    PUBLIC_V4,
    PUBLIC_V6,
    TIMEOUT,
    behind_nat_config,
    local,
    loopback_config,
    recv,
    rest_credentials,
    run,
    sockaddr,
    udp,
)

REALM = "test.example"


class StunClient:
    """A minimal TURN client over one non-blocking UDP socket."""

    def __init__(self, sock: socket.socket, server: TransportAddr) -> None:
        self.sock = sock
        self.server = server
        self.username, self.password = rest_credentials()
        self.nonce: bytes | None = None
        self.key = stun.long_term_key(self.username, REALM, self.password)

    def message(self, method: Method, cls: MessageClass = MessageClass.REQUEST) -> Message:
        return Message(method, cls, os.urandom(12))

    async def exchange(self, msg: Message, *, sign: bool = True) -> Message:
        if sign:
            assert self.nonce is not None
            msg.add(AttrType.USERNAME, self.username.encode())
            msg.add(AttrType.REALM, REALM.encode())
            msg.add(AttrType.NONCE, self.nonce)
            data = stun.encode(msg, integrity_key=self.key, fingerprint=True)
        else:
            data = stun.encode(msg, fingerprint=True)
        self.sock.sendto(data, sockaddr(self.server))
        while True:
            raw, source = await recv(self.sock)
            assert source == self.server
            reply = stun.decode(raw)
            if reply.transaction_id == msg.transaction_id:
                if sign and reply.cls is MessageClass.SUCCESS:
                    assert stun.verify_integrity(raw, self.key)
                return reply

    async def allocate(self, family: Family = Family.IPV4) -> TransportAddr:
        def request() -> Message:
            msg = self.message(Method.ALLOCATE)
            msg.add(AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
            msg.add(AttrType.REQUESTED_ADDRESS_FAMILY, stun.encode_address_family(family))
            return msg

        challenge = await self.exchange(request(), sign=False)
        assert challenge.cls is MessageClass.ERROR
        error = challenge.get(AttrType.ERROR_CODE)
        assert error is not None and stun.decode_error_code(error)[0] == 401
        assert challenge.get(AttrType.REALM) == REALM.encode()
        self.nonce = challenge.get(AttrType.NONCE)
        response = await self.exchange(request())
        assert response.cls is MessageClass.SUCCESS, response
        relayed = response.get(AttrType.XOR_RELAYED_ADDRESS)
        assert relayed is not None
        return stun.decode_xor_address(relayed, response.transaction_id)

    async def permit(self, peer: TransportAddr) -> None:
        msg = self.message(Method.CREATE_PERMISSION)
        msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, msg.transaction_id))
        assert (await self.exchange(msg)).cls is MessageClass.SUCCESS

    async def bind(self, channel: int, peer: TransportAddr) -> None:
        msg = self.message(Method.CHANNEL_BIND)
        msg.add(AttrType.CHANNEL_NUMBER, stun.encode_channel_number(channel))
        msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, msg.transaction_id))
        assert (await self.exchange(msg)).cls is MessageClass.SUCCESS

    async def refresh(self, lifetime: int) -> None:
        msg = self.message(Method.REFRESH)
        msg.add(AttrType.LIFETIME, stun.encode_u32(lifetime))
        assert (await self.exchange(msg)).cls is MessageClass.SUCCESS

    def send_indication(self, peer: TransportAddr, data: bytes) -> None:
        msg = self.message(Method.SEND, MessageClass.INDICATION)
        msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, msg.transaction_id))
        msg.add(AttrType.DATA, data)
        self.sock.sendto(stun.encode(msg), sockaddr(self.server))

    async def data_indication(self) -> tuple[TransportAddr, bytes]:
        raw, _ = await recv(self.sock)
        msg = stun.decode(raw)
        assert (msg.method, msg.cls) == (Method.DATA, MessageClass.INDICATION)
        peer, data = msg.get(AttrType.XOR_PEER_ADDRESS), msg.get(AttrType.DATA)
        assert peer is not None and data is not None
        return stun.decode_xor_address(peer, msg.transaction_id), data


def test_binding_request_is_answered_with_the_mapped_address() -> None:
    async def main() -> None:
        async with RelayServer(loopback_config()) as server:
            for listen, host in zip(server.listen_addresses, ("127.0.0.1", "::1"), strict=True):
                with udp(host) as sock:
                    client = StunClient(sock, listen)
                    reply = await client.exchange(client.message(Method.BINDING), sign=False)
                    assert reply.cls is MessageClass.SUCCESS
                    mapped = reply.get(AttrType.XOR_MAPPED_ADDRESS)
                    assert mapped is not None
                    assert stun.decode_xor_address(mapped, reply.transaction_id) == local(sock)

    run(main(), "uvloop")


CASES = {
    "ipv4": ("127.0.0.1", Family.IPV4, "127.0.0.1"),
    "ipv6": ("::1", Family.IPV6, "::1"),
    "ipv6-client-to-ipv4-peer": ("::1", Family.IPV4, "127.0.0.1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_allocate_and_relay_both_ways(case: str) -> None:
    client_host, family, peer_host = CASES[case]
    config = behind_nat_config()

    async def main() -> None:
        async with RelayServer(config) as server:
            listen = next(a for a in server.listen_addresses if str(a.ip) == client_host)
            with udp(client_host) as sock, udp(peer_host) as peer_sock:
                client = StunClient(sock, listen)
                relayed = await client.allocate(family)
                public = PUBLIC_V4 if family is Family.IPV4 else PUBLIC_V6
                assert relayed.ip == public and relayed.port in config.ports
                assert [a.relay_port for a in server.allocations()] == [relayed.port]
                # Where the relay socket really is (the NAT's inside address).
                inside = TransportAddr(ipaddress.ip_address(peer_host), relayed.port)
                await relay_both_ways(client, listen, peer_sock, inside)
            await server.stop()
            assert server.relay_port_count == 0

    run(main(), "uvloop")


def test_relay_on_its_public_loopback_address_reaches_another_loopback_peer() -> None:
    """The `make serve` set-up: public address 127.0.0.1, a peer on 127.0.0.2 (also loopback)."""

    async def main() -> None:
        async with RelayServer(loopback_config()) as server:
            listen = server.listen_addresses[0]
            with udp("127.0.0.1") as sock, udp("127.0.0.2") as peer_sock:
                client = StunClient(sock, listen)
                relayed = await client.allocate(Family.IPV4)
                assert str(relayed.ip) == "127.0.0.1"
                await relay_both_ways(client, listen, peer_sock, relayed)

    run(main())


async def relay_both_ways(
    client: StunClient, listen: TransportAddr, peer_sock: socket.socket, relay: TransportAddr
) -> None:
    """Send/Data indications, then a channel, each way between `client` and a UDP peer."""
    peer = local(peer_sock)
    await client.permit(peer)
    client.send_indication(peer, b"to peer")
    assert await recv(peer_sock) == (b"to peer", relay)
    peer_sock.sendto(b"to client", sockaddr(relay))
    assert await client.data_indication() == (peer, b"to client")

    await client.bind(0x4001, peer)
    client.sock.sendto(encode_channel_data(0x4001, b"chan out"), sockaddr(listen))
    assert await recv(peer_sock) == (b"chan out", relay)
    peer_sock.sendto(b"chan in", sockaddr(relay))
    raw, _ = await recv(client.sock)
    assert tuple(decode_channel_data(raw)) == (0x4001, b"chan in")


def test_allocate_with_a_wrong_password_is_refused_and_binds_no_port() -> None:
    async def main() -> None:
        async with RelayServer(loopback_config()) as server:
            with udp() as sock:
                client = StunClient(sock, server.listen_addresses[0])
                client.key = stun.long_term_key(client.username, REALM, "wrong")
                request = client.message(Method.ALLOCATE)
                request.add(AttrType.REQUESTED_TRANSPORT, stun.encode_requested_transport(17))
                challenge = await client.exchange(request, sign=False)
                client.nonce = challenge.get(AttrType.NONCE)
                request.transaction_id = os.urandom(12)
                refused = await client.exchange(request)
                assert refused.cls is MessageClass.ERROR
                error = refused.get(AttrType.ERROR_CODE)
                assert error is not None and stun.decode_error_code(error)[0] == 401
            assert server.relay_port_count == 0 and server.allocations() == []

    run(main())


# Bound channels relayed on the core's paths (xdpturn.proto.paths), without the core per datagram


class SteppedClock:
    """The relay's clock, stepped by the test. The event loop's timers keep real time, so the
    core's sweeps do not run meanwhile: only the clock can stop a channel."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def bound_channel(
    server: RelayServer, sock: socket.socket, peer_sock: socket.socket
) -> tuple[StunClient, TransportAddr]:
    """A client of `server` on `sock` with channel 0x4001 to `peer_sock`, relayed once each way
    (so both paths are in the runtime's hands); the client and the relay socket's address."""
    listen = server.listen_addresses[0]
    client = StunClient(sock, listen)
    relayed = await client.allocate()
    peer = local(peer_sock)
    await client.bind(0x4001, peer)
    relay = TransportAddr(peer.ip, relayed.port)
    await exchange_on_channel(client, peer_sock, relay, b"warm")
    return client, relay


async def exchange_on_channel(
    client: StunClient, peer_sock: socket.socket, relay: TransportAddr, data: bytes
) -> None:
    client.sock.sendto(encode_channel_data(0x4001, data), sockaddr(client.server))
    assert await recv(peer_sock) == (data, relay)
    peer_sock.sendto(data, sockaddr(relay))
    raw, _ = await recv(client.sock)
    assert tuple(decode_channel_data(raw)) == (0x4001, data)


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


def assert_nothing_queued(*socks: socket.socket) -> None:
    for sock in socks:
        with pytest.raises(BlockingIOError):
            sock.recvfrom(65535)


def test_a_channel_stops_both_ways_the_moment_its_permission_expires() -> None:
    clock = SteppedClock()

    async def main() -> None:
        async with RelayServer(behind_nat_config(), clock=clock) as server:
            with udp() as sock, udp() as peer_sock:
                client, relay = await bound_channel(server, sock, peer_sock)
                clock.now += PERMISSION_LIFETIME  # no timer ran: no RemoveChannel either
                sock.sendto(encode_channel_data(0x4001, b"late"), sockaddr(client.server))
                peer_sock.sendto(b"late", sockaddr(relay))
                drops = server.core.stats.drops
                await wait_until(lambda: drops[Drop.NO_PERMISSION] == 2)
                assert_nothing_queued(sock, peer_sock)
                # A new permission: relayed again.
                await client.permit(local(peer_sock))
                await exchange_on_channel(client, peer_sock, relay, b"again")

    run(main(), "uvloop")


def test_a_channel_stops_the_moment_its_allocation_is_deleted() -> None:
    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            with udp() as sock, udp() as peer_sock:
                client, _ = await bound_channel(server, sock, peer_sock)
                await client.refresh(0)
                sock.sendto(encode_channel_data(0x4001, b"late"), sockaddr(client.server))
                drops = server.core.stats.drops
                await wait_until(lambda: drops[Drop.NO_ALLOCATION] == 1)
                assert_nothing_queued(peer_sock)

    run(main(), "uvloop")


def test_metering_counts_what_the_channel_relayed_both_ways() -> None:
    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            with udp() as sock, udp() as peer_sock:
                client, relay = await bound_channel(server, sock, peer_sock)
                for size in range(1, 21):
                    await exchange_on_channel(client, peer_sock, relay, b"m" * size)
                sent = len(b"warm") + sum(range(1, 21))
                (metered,) = server.metered_allocations()
                for direction in (metered.traffic.client_to_peer, metered.traffic.peer_to_client):
                    assert (direction.packets, direction.bytes) == (21, sent)
                relayed = server.core.stats.relayed
                assert relayed[Route.CLIENT_TO_PEER].bytes == sent
                assert relayed[Route.PEER_TO_CLIENT].bytes == sent
                await client.refresh(0)
                (user,) = server.metering.by_user([]).values()
                assert user.client_to_peer.bytes == user.peer_to_client.bytes == sent

    run(main(), "uvloop")


def test_a_channel_is_held_to_the_allocation_rate_limit() -> None:
    size = 100
    clock = SteppedClock()  # stands still: no more than the burst passes
    # A quarter second's worth at once: 2,500 bytes.
    config = behind_nat_config(max_bps_per_allocation=80_000)

    async def main() -> None:
        async with RelayServer(config, clock=clock) as server:
            with udp() as sock, udp() as peer_sock:
                client, _ = await bound_channel(server, sock, peer_sock)
                for _ in range(40):
                    sock.sendto(encode_channel_data(0x4001, b"r" * size), sockaddr(client.server))

                def client_to_peer() -> DirectionTraffic:
                    (metered,) = server.metered_allocations()
                    return metered.traffic.client_to_peer

                def offered() -> int:
                    out = client_to_peer()
                    return out.packets + out.dropped_packets

                await wait_until(lambda: offered() == 41)
                out = client_to_peer()
                received = 0
                while True:
                    try:
                        peer_sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    received += 1
                # The 4-byte warm-up and 24 of 100 bytes fit in the burst.
                assert received == out.packets - 1 == 24
                assert out.dropped_packets == 16 and out.dropped_bytes == 16 * size
                assert server.core.stats.drops[Drop.ALLOCATION_RATE] == 16

    run(main(), "uvloop")
