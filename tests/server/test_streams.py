"""TURN over TCP and TLS in the runtime: aioice as a client no one here wrote, certificate
reload, connection loss and garbage on the stream."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aioice.turn import create_turn_endpoint

from tests.server.helpers import (
    SECRET,
    TIMEOUT,
    local,
    loopback_config,
    recv,
    rest_credentials,
    run,
    sockaddr,
    udp,
)
from tests.tls_support import (
    Certificate,
    common_name,
    make_certificate,
    stream_config,
)
from xdpturn.client import StreamTransport, TurnClient, open_tcp, open_tls
from xdpturn.client.turn import ClientOptions, TransportOpener
from xdpturn.config import ConfigError, load_serve_config
from xdpturn.proto.addr import Transport, TransportAddr
from xdpturn.server import RelayServer, StartError
from xdpturn.server.lifecycle import serve
from xdpturn.tls import client_context

OPTIONS = ClientOptions(reliable_timeout=TIMEOUT)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"), "relay")


async def connect(server: TransportAddr, opener: TransportOpener) -> TurnClient:
    username, password = rest_credentials("stream")
    return await TurnClient.connect(server, username, password, options=OPTIONS, opener=opener)


async def until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait for a condition the relay reaches on its own (a connection's loss being noticed),
    checking between loop iterations; bounded."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def round_trip(client: TurnClient, payload: bytes) -> None:
    """One datagram each way between `client`'s allocation and a fresh loopback peer."""
    (relayed,) = client.relayed
    with udp("127.0.0.1") as peer_sock:
        peer = local(peer_sock)
        inside = TransportAddr(ipaddress.ip_address("127.0.0.1"), relayed.port)
        await client.bind_channel(peer)
        client.send(peer, payload)
        assert await recv(peer_sock) == (payload, inside)
        peer_sock.sendto(payload + b"?", sockaddr(inside))
        assert await asyncio.wait_for(client.recv(), TIMEOUT) == (peer, payload + b"?")


# aioice


class PeerQueue(asyncio.DatagramProtocol):
    """What aioice's TURN transport delivers: datagrams from peers."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))


@pytest.mark.interop
@pytest.mark.parametrize("kind", [Transport.TCP, Transport.TLS])
def test_aioice_allocates_and_relays(certificate: Certificate, kind: Transport) -> None:
    async def main() -> None:
        async with RelayServer(stream_config(certificate)) as server:
            listen = server.streams.addresses(kind)[0]
            username, password = rest_credentials("stream")
            tls = client_context(certificate.cert) if kind is Transport.TLS else None
            transport, protocol = await asyncio.wait_for(
                create_turn_endpoint(
                    PeerQueue,
                    server_addr=(str(listen.ip), listen.port),
                    username=username,
                    password=password,
                    ssl=tls,
                    transport="tcp",
                ),
                TIMEOUT,
            )
            try:
                relayed_host, relayed_port = transport.get_extra_info("sockname")
                assert relayed_host == "203.0.113.1"
                (allocation,) = server.allocations()
                assert allocation.flow.transport is kind
                inside = TransportAddr(ipaddress.ip_address("127.0.0.1"), relayed_port)
                with udp("127.0.0.1") as peer_sock:
                    peer = local(peer_sock)
                    for payload in (b"ping", b"odd", b"x" * 1001):
                        transport.sendto(payload, sockaddr(peer))
                        assert await recv(peer_sock) == (payload, inside)
                        peer_sock.sendto(payload[::-1], sockaddr(inside))
                        data, addr = await asyncio.wait_for(protocol.queue.get(), TIMEOUT)
                        assert (data, addr[:2]) == (payload[::-1], sockaddr(peer))
            finally:
                transport.close()
            await until(lambda: not server.allocations())

    run(main())


# Certificate reload


def install(certificate: Certificate, live: Path) -> Certificate:
    """Copy a certificate to the paths the relay was given, as an operator's renewal does."""
    shutil.copyfile(certificate.cert, live / "live.crt")
    shutil.copyfile(certificate.key, live / "live.key")
    return Certificate(live / "live.crt", live / "live.key", certificate.name)


def test_reload_keeps_tls_allocations_and_new_handshakes_get_the_new_certificate(
    tmp_path: Path,
) -> None:
    first = make_certificate(tmp_path / "certs", "first")
    second = make_certificate(tmp_path / "certs", "second")
    live = install(first, tmp_path)
    bundle = tmp_path / "bundle.pem"  # clients trust both, so either may be served
    bundle.write_bytes(first.cert.read_bytes() + second.cert.read_bytes())

    async def main() -> None:
        async with RelayServer(stream_config(live)) as server:
            (listen,) = server.streams.addresses(Transport.TLS)
            old = await connect(listen, open_tls(cafile=bundle))
            await old.allocate()
            assert server_name(old) == "first"

            install(second, tmp_path)
            assert server.reload_tls()
            new = await connect(listen, open_tls(cafile=bundle))
            await new.allocate()
            assert server_name(new) == "second"
            # The connection made before the reload kept its session and its allocation.
            assert len(server.allocations()) == 2
            await round_trip(old, b"still here")
            await round_trip(new, b"new one")

            # A broken renewal is refused; the certificate in use stays.
            (tmp_path / "live.crt").write_text("not a certificate")
            assert not server.reload_tls()
            assert server.stats["tls_reload_errors"] == 1
            third = await connect(listen, open_tls(cafile=bundle))
            assert server_name(third) == "second"
            for client in (old, new, third):
                await client.close()

    run(main())


def server_name(client: TurnClient) -> str | None:
    transport = client._transport
    assert isinstance(transport, StreamTransport)
    return common_name(transport.peer_certificate)


def test_sighup_reloads_the_certificate(tmp_path: Path) -> None:
    first = make_certificate(tmp_path / "certs", "first")
    second = make_certificate(tmp_path / "certs", "second")
    live = install(first, tmp_path)
    config = stream_config(live)

    async def main() -> None:
        server = RelayServer(config)
        serving = asyncio.create_task(serve(config, server))
        try:
            await until(lambda: server.running and bool(server.streams.addresses(Transport.TLS)))
            install(second, tmp_path)
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: server.stats["tls_reloads"] == 1)
            (listen,) = server.streams.addresses(Transport.TLS)
            client = await connect(listen, open_tls(cafile=second.cert))
            assert server_name(client) == "second"
            await client.close()
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # serve() handles it: stop now
            await asyncio.wait_for(serving, TIMEOUT)

    run(main())


# Connections going away


@pytest.mark.parametrize("kind", [Transport.TCP, Transport.TLS])
def test_losing_the_connection_deletes_its_allocation(
    certificate: Certificate, kind: Transport
) -> None:
    async def main() -> None:
        async with RelayServer(stream_config(certificate)) as server:
            listen = server.streams.addresses(kind)[0]
            opener = open_tcp if kind is Transport.TCP else open_tls(cafile=certificate.cert)
            client = await connect(listen, opener)
            await client.allocate()
            assert server.relay_port_count == 1
            transport = client._transport
            assert transport is not None
            transport.close()  # no Refresh: the connection just goes
            await until(lambda: not server.allocations())
            assert server.relay_port_count == 0
            assert server.streams.connection_count == 0
            assert server.stats[f"{kind.value}_connections_closed"] == 1
            await client.close()

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 64,  # neither STUN nor ChannelData
        b"\x00\x01\x00\x08\xde\xad\xbe\xef" + bytes(20),  # STUN-like, no magic cookie
        b"\x80\x00\x00\x04abcd",  # first bits 10: neither STUN nor ChannelData
    ],
)
def test_garbage_closes_only_that_connection(certificate: Certificate, garbage: bytes) -> None:
    async def main() -> None:
        async with RelayServer(stream_config(certificate)) as server:
            listen = server.streams.addresses(Transport.TCP)[0]
            healthy = await connect(listen, open_tcp)
            await healthy.allocate()
            doomed = await connect(listen, open_tcp)
            await doomed.allocate()

            # A raw connection sending noise is closed by the relay.
            reader, writer = await asyncio.open_connection(str(listen.ip), listen.port)
            writer.write(garbage)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            writer.close()

            # Noise after valid traffic closes that client's connection and allocation.
            transport = doomed._transport
            assert isinstance(transport, StreamTransport)
            transport._transport.write(b"\x80\0\0\0")
            await until(lambda: len(server.allocations()) == 1)
            assert server.stats["tcp_malformed_frames"] == 2

            await round_trip(healthy, b"unaffected")
            await healthy.close()
            await doomed.close()

    run(main())


# Bounds: idle timeout and connection cap

IDLE = 0.3  # a short --stream-idle-timeout, so the tests wait for it rather than for 30 s


async def raw_connection(
    listen: TransportAddr, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(str(listen.ip), listen.port, ssl=tls)


async def closed_by_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Wait (bounded) for the relay to close the connection: EOF, or a reset for TLS, where
    the relay's abort sends no close_notify."""
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()


@pytest.mark.parametrize("kind", [Transport.TCP, Transport.TLS])
def test_a_silent_connection_is_closed_after_the_idle_timeout(
    certificate: Certificate, kind: Transport
) -> None:
    async def main() -> None:
        config = stream_config(certificate, stream_idle_timeout=IDLE)
        async with RelayServer(config) as server:
            listen = server.streams.addresses(kind)[0]
            tls = client_context(certificate.cert) if kind is Transport.TLS else None
            opened = time.monotonic()
            await closed_by_relay(*await raw_connection(listen, tls))
            assert time.monotonic() - opened >= IDLE * 0.9  # not closed early (loop clock)
            await until(lambda: server.streams.connection_count == 0)
            assert server.stats[f"{kind.value}_idle_timeouts"] == 1
            assert server.stats[f"{kind.value}_connections_closed"] == 1

    run(main())


def test_a_stalled_partial_frame_is_closed_even_with_an_allocation(
    certificate: Certificate,
) -> None:
    async def main() -> None:
        config = stream_config(certificate, stream_idle_timeout=IDLE)
        async with RelayServer(config) as server:
            listen = server.streams.addresses(Transport.TCP)[0]
            # "GET " frames as ChannelData on channel 0x4745 announcing 21,536 bytes that never
            # come. Bytes trickling in (one per third of the timeout) do not extend the
            # deadline: the relay closes long before the trickle would end.
            reader, writer = await raw_connection(listen)
            writer.write(b"GET ")
            rest = b"/ HTTP/1.1\r\nHost: relay.example\r\n"

            async def trickle() -> None:
                for byte in rest:
                    await asyncio.sleep(IDLE / 3)
                    if writer.is_closing() or reader.at_eof():
                        return
                    writer.write(bytes([byte]))

            trickling = asyncio.create_task(trickle())
            await closed_by_relay(reader, writer)
            assert not trickling.done()  # 0.3 s in, with about 3 s of trickle left
            trickling.cancel()
            assert server.stats["tcp_partial_frame_timeouts"] == 1

            # An allocated client that starts a message and stalls loses the connection, and
            # so its allocation.
            client = await connect(listen, open_tcp)
            await client.allocate()
            transport = client._transport
            assert isinstance(transport, StreamTransport)
            transport._transport.write(b"\x00\x01\x00\x08")  # half a STUN header
            await until(lambda: not server.allocations())
            assert server.stats["tcp_partial_frame_timeouts"] == 2
            assert server.stats["tcp_idle_timeouts"] == 0
            await client.close()

    run(main())


def test_a_connection_with_an_allocation_outlives_the_idle_timeout(
    certificate: Certificate,
) -> None:
    async def main() -> None:
        config = stream_config(certificate, stream_idle_timeout=IDLE)
        async with RelayServer(config) as server:
            listen = server.streams.addresses(Transport.TCP)[0]
            client = await connect(listen, open_tcp)
            await client.allocate()
            # A silent connection opened after the allocation's last message is the clock:
            # once it is closed, the allocated connection has been silent longer than that.
            await closed_by_relay(*await raw_connection(listen))
            await until(lambda: server.stats["tcp_idle_timeouts"] == 1)
            assert len(server.allocations()) == 1
            assert server.streams.connection_count == 1
            await round_trip(client, b"still allocated")

            # Once the allocation is deleted (Refresh 0), the idle timeout applies again.
            await client.refresh(0)
            assert not server.allocations()
            await until(lambda: server.streams.connection_count == 0)
            assert server.stats["tcp_idle_timeouts"] == 2
            await client.close()

    run(main())


def test_connections_beyond_the_cap_are_refused_and_the_others_keep_working(
    certificate: Certificate,
) -> None:
    async def main() -> None:
        async with RelayServer(stream_config(certificate, max_stream_connections=2)) as server:
            listen = server.streams.addresses(Transport.TCP)[0]
            first = await connect(listen, open_tcp)
            await first.allocate()
            tls_listen = server.streams.addresses(Transport.TLS)[0]
            second = await connect(tls_listen, open_tls(cafile=certificate.cert))
            await second.allocate()
            # The cap counts TCP and TLS together.
            await closed_by_relay(*await raw_connection(listen))
            assert server.stats["tcp_connections_refused"] == 1
            assert server.stats["tcp_connections_opened"] == 1  # the refused one is not counted
            assert server.streams.connection_count == 2
            await round_trip(first, b"first")
            await round_trip(second, b"second")

            # Room again once a connection goes.
            await second.close()
            await until(lambda: server.streams.connection_count == 1)
            third = await connect(listen, open_tcp)
            await third.allocate()
            await round_trip(third, b"third")
            for client in (first, third):
                await client.close()

    run(main())


def test_a_busy_tcp_address_is_a_start_error_naming_the_option(certificate: Certificate) -> None:
    async def main() -> None:
        async with RelayServer(stream_config(certificate)) as first:
            taken = first.streams.addresses(Transport.TCP)[0]
            second = RelayServer(stream_config(certificate, listen_tcp=[taken]))
            with pytest.raises(StartError, match="--listen-tcp: cannot bind"):
                await second.start()
            assert not second.running

    run(main())


# Configuration


def test_stream_options_from_flags_and_environment(certificate: Certificate) -> None:
    given: dict[str, Any] = {
        "public_ipv4": "203.0.113.1",
        "auth_secret": [SECRET],
        "listen_tls": ["0.0.0.0:443", "[::]:443"],
        "tls_cert": str(certificate.cert),
        "tls_key": str(certificate.key),
    }
    env = {"XDPTURN_LISTEN_TCP": "0.0.0.0:3478, [::]:3478"}
    config = load_serve_config(given, env)
    assert [str(a) for a in config.listen_tcp] == ["0.0.0.0:3478", "[::]:3478"]
    assert [str(a) for a in config.listen_tls] == ["0.0.0.0:443", "[::]:443"]
    assert (config.tls_cert, config.tls_key) == (certificate.cert, certificate.key)
    defaults = load_serve_config({"public_ipv4": "203.0.113.1", "auth_secret": [SECRET]})
    assert defaults.listen_tcp == [] and defaults.listen_tls == []
    assert defaults.max_stream_connections == 10000 and defaults.stream_idle_timeout == 30
    bounds = {"XDPTURN_MAX_STREAM_CONNECTIONS": "500", "XDPTURN_STREAM_IDLE_TIMEOUT": "2.5"}
    bounded = load_serve_config({"public_ipv4": "203.0.113.1", "auth_secret": [SECRET]}, bounds)
    assert bounded.max_stream_connections == 500 and bounded.stream_idle_timeout == 2.5


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"listen_tcp": ["127.0.0.1"]}, "--listen-tcp"),
        ({"listen_tls": ["127.0.0.1:5349"]}, "--tls-cert"),
        ({"listen_tls": ["127.0.0.1:5349"], "tls_cert": "CERT"}, "--tls-key"),
        ({"tls_key": "/nonexistent/key.pem"}, "--tls-key"),
        ({"listen_tls": ["127.0.0.1:5349"], "tls_cert": "KEY", "tls_key": "KEY"}, "--tls-cert"),
        ({"listen_tcp": ["127.0.0.1:3478", "127.0.0.1:3478"]}, "--listen-tcp"),
        ({"max_stream_connections": "0"}, "--max-stream-connections"),
        ({"stream_idle_timeout": "0"}, "--stream-idle-timeout"),
        ({"stream_idle_timeout": "soon"}, "--stream-idle-timeout"),
        (
            {
                "listen_tcp": ["127.0.0.1:443"],
                "listen_tls": ["127.0.0.1:443"],
                "tls_cert": "CERT",
                "tls_key": "KEY",
            },
            "--listen-tls",
        ),
    ],
)
def test_bad_stream_options_name_the_option(
    certificate: Certificate, change: dict[str, Any], option: str
) -> None:
    paths = {"CERT": str(certificate.cert), "KEY": str(certificate.key)}
    given: dict[str, Any] = {"public_ipv4": "203.0.113.1", "auth_secret": [SECRET]}
    for name, value in change.items():
        given[name] = paths.get(value, value) if isinstance(value, str) else value
    with pytest.raises(ConfigError) as caught:
        load_serve_config(given)
    assert caught.value.option.startswith(option), caught.value


def test_loopback_config_has_no_stream_listeners() -> None:
    # The UDP-only tests keep their layout: streams are opt-in.
    config = loopback_config()
    assert config.listen_tcp == [] and config.listen_tls == []
