"""TurnClient over TCP and TLS against our relay on loopback, with a plain UDP peer."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.server.helpers import TIMEOUT, local, recv, rest_credentials, run, sockaddr, udp
from tests.tls_support import Certificate, common_name, make_certificate, stream_config
from xdpturn.client import StreamTransport, TurnClient, TurnClientError, open_tcp, open_tls
from xdpturn.client.turn import ClientOptions, TransportOpener
from xdpturn.proto.addr import Transport, TransportAddr
from xdpturn.proto.channel_data import encode_channel_data
from xdpturn.server import RelayServer

OPTIONS = ClientOptions(reliable_timeout=TIMEOUT)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"), "relay")


async def connect(server: TransportAddr, opener: TransportOpener) -> TurnClient:
    username, password = rest_credentials("stream")
    return await TurnClient.connect(server, username, password, options=OPTIONS, opener=opener)


async def relay_both_ways(client: TurnClient, peer_host: str) -> None:
    """Send indication, Data indication, then ChannelData both ways (odd sizes: padding)."""
    (relayed,) = await client.allocate()
    with udp(peer_host) as peer_sock:
        peer = local(peer_sock)
        inside = TransportAddr(ipaddress.ip_address(peer_host), relayed.port)
        await client.create_permission(peer)

        client.send(peer, b"via indication")
        data, source = await recv(peer_sock)
        assert (data, source) == (b"via indication", inside)
        peer_sock.sendto(b"back by indication", sockaddr(inside))
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == (peer, b"back by indication")

        await client.bind_channel(peer)
        for size in (1, 2, 3, 4, 5, 1200):
            payload = bytes([size % 256]) * size
            client.send(peer, payload)
            assert await recv(peer_sock) == (payload, inside)
            peer_sock.sendto(payload[::-1] + b"!", sockaddr(inside))
            reply = await asyncio.wait_for(client.recv(), TIMEOUT)
            assert reply == (peer, payload[::-1] + b"!")
    assert client.dropped == 0


Scenario = Callable[[RelayServer], Awaitable[None]]


def with_relay(certificate: Certificate, scenario: Scenario, loop: str = "asyncio") -> None:
    async def main() -> None:
        async with RelayServer(stream_config(certificate)) as server:
            await scenario(server)

    run(main(), loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tcp_allocate_and_relay(certificate: Certificate, loop: str) -> None:
    async def scenario(server: RelayServer) -> None:
        tcp = server.streams.addresses(Transport.TCP)
        assert {a.ip.version for a in tcp} == {4, 6}
        for listen in tcp:  # an IPv4 and an IPv6 client, both relaying to an IPv4 peer
            async with await connect(listen, open_tcp) as client:
                await relay_both_ways(client, "127.0.0.1")
                (allocation,) = server.allocations()
                assert allocation.flow.transport is Transport.TCP
                assert allocation.flow.client.ip == listen.ip
            # close() deleted the allocation with a Refresh, then closed the connection.
            assert server.allocations() == []

    with_relay(certificate, scenario, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tls_allocate_and_relay(certificate: Certificate, loop: str) -> None:
    async def scenario(server: RelayServer) -> None:
        (listen,) = server.streams.addresses(Transport.TLS)
        async with await connect(listen, open_tls(cafile=certificate.cert)) as client:
            transport = client._transport
            assert isinstance(transport, StreamTransport)
            assert common_name(transport.peer_certificate) == certificate.name
            await relay_both_ways(client, "127.0.0.1")
            assert [a.flow.transport for a in server.allocations()] == [Transport.TLS]

    with_relay(certificate, scenario, loop)


def test_tls_refuses_a_certificate_it_does_not_trust(
    certificate: Certificate, tmp_path: Path
) -> None:
    stranger = make_certificate(tmp_path, "stranger")

    async def scenario(server: RelayServer) -> None:
        (listen,) = server.streams.addresses(Transport.TLS)
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(listen, open_tls(cafile=stranger.cert))
        # The right CA but the wrong name is refused too.
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(listen, open_tls("turn.example.org", cafile=certificate.cert))

    with_relay(certificate, scenario)


def test_open_tls_takes_a_context_or_a_cafile(certificate: Certificate) -> None:
    with pytest.raises(ValueError):
        open_tls(cafile=certificate.cert, context=ssl.create_default_context())


def test_stream_transport_pads_and_frames_split_messages() -> None:
    """Against a raw TCP server: what the client writes is padded, and messages the server
    writes in odd pieces come out whole."""

    async def main() -> None:
        received: list[bytes] = []
        got = asyncio.Event()
        lost: list[Exception | None] = []
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        accepted = asyncio.Queue()

        async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put((r, w))

        server = await asyncio.start_server(on_client, "127.0.0.1", 0)
        async with server:
            host, port = server.sockets[0].getsockname()[:2]
            addr = TransportAddr(ipaddress.ip_address(host), port)

            def receiver(data: bytes) -> None:
                received.append(data)
                got.set()

            transport = await open_tcp(addr, receiver, lost.append)
            reader, writer = await asyncio.wait_for(accepted.get(), TIMEOUT)
            transport.send(encode_channel_data(0x4000, b"abc"))
            assert await asyncio.wait_for(reader.readexactly(8), TIMEOUT) == (
                encode_channel_data(0x4000, b"abc", pad=True)
            )
            frame = encode_channel_data(0x4001, b"hello", pad=True)
            for i in range(len(frame)):
                writer.write(frame[i : i + 1])
                await writer.drain()
            await asyncio.wait_for(got.wait(), TIMEOUT)
            assert received == [frame]
            # A stream the client cannot frame is dropped, and the loss reported.
            writer.write(b"\xff\xff\xff\xff")
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            assert len(lost) == 1 and lost[0] is not None
            writer.close()

    run(main())


def test_requests_fail_when_the_connection_closes(certificate: Certificate) -> None:
    async def scenario(server: RelayServer) -> None:
        listen = server.streams.addresses(Transport.TCP)[0]
        client = await connect(listen, open_tcp)
        await client.allocate()
        server.streams.close()  # the relay drops every connection
        with pytest.raises(TurnClientError):
            await asyncio.wait_for(client.refresh(), TIMEOUT)
        await client.close()

    with_relay(certificate, scenario)
