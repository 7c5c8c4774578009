"""Allocated UDP clients get their own connected socket on the listening port, so junk that fills
the listener's queue cannot bury their datagrams (issue 12, Python path)."""

from __future__ import annotations

import asyncio
import os
import socket

from xdpturn.proto import stun
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.channel_data import decode_channel_data, encode_channel_data
from xdpturn.proto.stun import AttrType, MessageClass, Method
from xdpturn.server import RelayServer

from .helpers import behind_nat_config, local, recv, run, sockaddr, udp
from .test_loopback import StunClient

# Far more than the listener's receive buffer holds (4 MiB, or what rmem_max allows), then
# small datagrams to fill what room a big one could not.
BIG_JUNK, BIG_JUNK_SIZE = 200, 65000
SMALL_JUNK, SMALL_JUNK_SIZE = 2000, 40


def udp_rcvbuf_errors() -> int:
    with open("/proc/net/snmp") as f:
        lines = [line.split() for line in f if line.startswith("Udp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:], strict=True))["RcvbufErrors"])


def test_a_full_listener_queue_does_not_drop_an_allocated_clients_datagrams() -> None:
    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            listen = server.listen_addresses[0]
            with udp() as sock, udp() as peer_sock, udp() as junk:
                client = StunClient(sock, listen)
                relayed = await client.allocate(Family.IPV4)
                assert server.client_socket_count == 1
                peer = local(peer_sock)
                await client.permit(peer)
                await client.bind(0x4001, peer)
                # The relay's socket is on loopback; clients are told the public address.
                inside = TransportAddr(listen.ip, relayed.port)

                # No await in between: the relay reads nothing until the listener has overflowed.
                before = udp_rcvbuf_errors()
                for count, size in ((BIG_JUNK, BIG_JUNK_SIZE), (SMALL_JUNK, SMALL_JUNK_SIZE)):
                    payload = os.urandom(size)
                    for _ in range(count):
                        junk.sendto(payload, sockaddr(listen))
                sock.sendto(encode_channel_data(0x4001, b"through the flood"), sockaddr(listen))
                assert udp_rcvbuf_errors() > before, "the junk never filled the listener's queue"

                assert await recv(peer_sock) == (b"through the flood", inside)
                peer_sock.sendto(b"and back", sockaddr(inside))
                raw, _ = await recv(sock)
                assert tuple(decode_channel_data(raw)) == (0x4001, b"and back")

                # Releasing the allocation closes the client's socket.
                refresh = client.message(Method.REFRESH)
                refresh.add(AttrType.LIFETIME, stun.encode_u32(0))
                assert (await client.exchange(refresh)).cls is MessageClass.SUCCESS
                assert server.client_socket_count == 0
                # Later datagrams of the same client reach the listener again: a new allocation.
                await client.allocate(Family.IPV4)
                assert server.client_socket_count == 1

    run(main(), "uvloop")


def test_the_relay_answers_on_the_listener_for_clients_without_an_allocation() -> None:
    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            listen = server.listen_addresses[0]
            with udp() as sock:
                client = StunClient(sock, listen)
                reply = await client.exchange(client.message(Method.BINDING), sign=False)
                assert reply.cls is MessageClass.SUCCESS
                assert server.client_socket_count == 0

    run(main())


def test_ipv6_clients_get_a_socket_too() -> None:
    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            listen = next(a for a in server.listen_addresses if a.family is Family.IPV6)
            with udp("::1") as sock:
                client = StunClient(sock, listen)
                await client.allocate(Family.IPV6)
                assert server.client_socket_count == 1
            await server.stop()
            assert server.client_socket_count == 0

    run(main())


def test_the_listening_port_is_shared_only_with_the_relays_own_sockets() -> None:
    """SO_REUSEPORT admits sockets of the same user only; a socket without it cannot bind."""

    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            listen = server.listen_addresses[0]
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                try:
                    other.bind(sockaddr(listen))
                except OSError:
                    pass
                else:
                    raise AssertionError("a plain socket bound the relay's listening port")
            finally:
                other.close()

    run(main())


def test_an_icmp_error_on_a_clients_socket_does_not_stop_its_reading() -> None:
    """Port unreachable for something sent to a client is reported on the client's connected
    socket (uvloop stops polling a descriptor that reports an error): the relay still reads
    what the client sends next, e.g. the Refresh that releases its allocation."""

    async def main() -> None:
        async with RelayServer(behind_nat_config()) as server:
            listen = server.listen_addresses[0]
            with udp() as sock:
                client = StunClient(sock, listen)
                await client.allocate(Family.IPV4)
                port = local(sock).port
            # The client's socket is gone; something from the relay's address reaches its port.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as relay_side:
                relay_side.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                relay_side.bind(sockaddr(listen))
                relay_side.sendto(b"to a closed port", ("127.0.0.1", port))
            await asyncio.sleep(0.05)  # the relay's loop sees the error
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as back:
                back.setblocking(False)
                back.bind(("127.0.0.1", port))
                client.sock = back
                refresh = client.message(Method.REFRESH)
                refresh.add(AttrType.LIFETIME, stun.encode_u32(0))
                assert (await client.exchange(refresh)).cls is MessageClass.SUCCESS
            assert server.allocations() == [] and server.client_socket_count == 0
            assert server.stats["client_socket_icmp_errors"] >= 1

    run(main(), "uvloop")
