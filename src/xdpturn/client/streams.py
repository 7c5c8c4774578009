"""TCP and TLS transports for `TurnClient` (RFC 8656 section 3.1): one connection to the server,
split into whole messages by the same framer the relay uses.

`open_tcp` is an opener like `open_udp`; `open_tls(...)` returns one:

    client = await TurnClient.connect(server, user, password, opener=open_tls("turn.example"))

Stream transports are `reliable`: requests are sent once (no retransmissions) and ChannelData is
padded to a multiple of 4 bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import cast

from xdpturn.client.turn import LostHandler, Receiver, TransportOpener
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.framing import FramingError, StreamDecoder
from xdpturn.tls import client_context

log = logging.getLogger(__name__)

TLS_HANDSHAKE_TIMEOUT = 10.0


class _StreamProtocol(asyncio.Protocol):
    def __init__(self, receiver: Receiver, lost: LostHandler) -> None:
        self._receiver = receiver
        self._lost = lost
        self._decoder = StreamDecoder()
        self._transport: asyncio.Transport | None = None
        self._error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._decoder.failed:
            return
        try:
            frames = self._decoder.feed(data)
        except FramingError as exc:
            # The server's stream is out of sync and cannot be trusted past this point.
            log.debug("malformed stream from server", extra={"error": str(exc)})
            self._error = exc
            if self._transport is not None:
                self._transport.abort()
            return
        for frame in frames:
            self._receiver(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc if exc is not None else self._error)


class StreamTransport:
    """A `MessageTransport` over one TCP (or TLS) connection."""

    reliable = True

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    @property
    def local(self) -> TransportAddr:
        host, port = self._transport.get_extra_info("sockname")[:2]
        return TransportAddr(ipaddress.ip_address(host), port)

    @property
    def peer_certificate(self) -> dict[str, object] | None:
        """The server's certificate as `ssl.SSLSocket.getpeercert()` gives it (TLS only)."""
        cert: dict[str, object] | None = self._transport.get_extra_info("peercert")
        return cert

    def send(self, data: bytes) -> None:
        # STUN lengths are multiples of 4, so only ChannelData can need padding (section 12.5).
        if len(data) % 4:
            data += bytes(-len(data) % 4)
        self._transport.write(data)

    def close(self) -> None:
        self._transport.close()


async def _connect(
    server: TransportAddr,
    receiver: Receiver,
    lost: LostHandler,
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> StreamTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(
        lambda: _StreamProtocol(receiver, lost),
        host=str(server.ip),
        port=server.port,
        ssl=context,
        server_hostname=server_hostname if context is not None else None,
        ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if context is not None else None,
    )
    return StreamTransport(transport)


async def open_tcp(server: TransportAddr, receiver: Receiver, lost: LostHandler) -> StreamTransport:
    """TURN over TCP, as a `TransportOpener`."""
    return await _connect(server, receiver, lost)


def open_tls(
    server_hostname: str | None = None,
    *,
    cafile: str | Path | None = None,
    context: ssl.SSLContext | None = None,
) -> TransportOpener:
    """An opener for TURN over TLS. The certificate is checked against `server_hostname`
    (default: the server's IP address) with `context`, else with the system's CAs or only
    `cafile`."""
    if context is not None and cafile is not None:
        raise ValueError("give cafile or context, not both")
    tls = context if context is not None else client_context(cafile)

    async def opener(
        server: TransportAddr, receiver: Receiver, lost: LostHandler
    ) -> StreamTransport:
        hostname = server_hostname if server_hostname is not None else str(server.ip)
        return await _connect(server, receiver, lost, tls, hostname)

    return opener


__all__ = ["StreamTransport", "open_tcp", "open_tls"]
