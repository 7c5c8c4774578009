"""TURN over TCP and TLS between client and relay (RFC 8656 section 3.1); peers stay on UDP.

Each accepted connection is its own flow: `ClientFlow(client, listener=<connection id>,
transport=TCP|TLS)`, so the core's 5-tuple is the connection and `SendToClient` finds its way
back by the id. Bytes are split into frames by `StreamDecoder`; a stream that cannot be framed is
closed (counted in the runtime's stats), never a traceback. When a connection goes, the core is
told (`handle_flow_closed`) and decides what that means for the allocation.

Connections are bounded, so silent or stalled ones cannot pile up: beyond
--max-stream-connections new ones are closed at once, and one that completes no message within
--stream-idle-timeout is closed, unless it has an allocation (then it lives as long as the
allocation) and is not stalled in the middle of a message.

TLS certificates can be replaced while running: the listener's context has an SNI callback, which
OpenSSL calls for every ClientHello (with or without SNI) and which hands the handshake the
context built from the files most recently loaded. Existing connections keep theirs.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from xdpturn.config import ServeConfig
from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, Transport, TransportAddr
from xdpturn.proto.framing import FramingError, StreamDecoder
from xdpturn.server.sockets import bound_address, from_sockaddr, to_sockaddr
from xdpturn.tls import server_context

log = logging.getLogger("xdpturn.server")

# Bytes queued for one client before further messages to it are dropped, as a router drops when
# its queue is full: a client that does not read must not grow the relay's memory.
MAX_WRITE_BUFFER = 512 * 1024
BACKLOG = 1024
# A client that connects but never finishes the TLS handshake holds a socket only this long.
TLS_HANDSHAKE_TIMEOUT = 10.0

FramesSink = Callable[[ClientFlow, list[bytes]], None]
ClosedSink = Callable[[ClientFlow], None]


class StreamBindError(Exception):
    """A --listen-tcp/--listen-tls address could not be bound; `str()` names the option."""


def open_tcp_listener(addr: TransportAddr, *, reuse_port: bool = False) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; IPv6 ones are IPv6-only (as for UDP).
    `reuse_port`: one of a group on the same address (one per worker) that the kernel spreads
    new connections over (SO_REUSEPORT)."""
    family = socket.AF_INET if addr.family is Family.IPV4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restarted relay must rebind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind(to_sockaddr(addr))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class StreamListeners:
    """The TCP and TLS listeners of one relay and their connections."""

    def __init__(self, stats: Counter[str], on_frames: FramesSink, on_closed: ClosedSink) -> None:
        self._stats = stats
        self._on_frames = on_frames
        self._on_closed = on_closed
        self._servers: list[tuple[Transport, asyncio.Server]] = []
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._tls_files: tuple[Path, Path] | None = None
        self._tls_current: ssl.SSLContext | None = None
        self._closing = False
        self.max_connections = 10000  # --max-stream-connections
        self.idle_timeout = 30.0  # --stream-idle-timeout
        self._full_logged = False

    async def start(self, config: ServeConfig, bound: Sequence[socket.socket] = ()) -> None:
        """Bind every --listen-tcp and --listen-tls address; raises StreamBindError. `bound`:
        listening sockets already bound to them, in that order (a worker's, see workers.py)."""
        loop = asyncio.get_running_loop()
        self.max_connections = config.max_stream_connections
        self.idle_timeout = config.stream_idle_timeout
        listener_context: ssl.SSLContext | None = None
        if config.listen_tls:
            assert config.tls_cert is not None and config.tls_key is not None  # ServeConfig checked
            self._tls_files = (config.tls_cert, config.tls_key)
            self._tls_current = server_context(*self._tls_files)
            listener_context = server_context(*self._tls_files)
            listener_context.sni_callback = self._select_context
        wanted = [(Transport.TCP, a) for a in config.listen_tcp]
        wanted += [(Transport.TLS, a) for a in config.listen_tls]
        for index, (kind, addr) in enumerate(wanted):
            try:
                sock = bound[index] if bound else open_tcp_listener(addr)
            except OSError as e:
                self.close()
                raise StreamBindError(
                    f"--listen-{kind.value}: cannot bind {addr}: {e.strerror or e}"
                ) from e
            server = await loop.create_server(
                functools.partial(_Connection, self, kind),
                sock=sock,
                backlog=BACKLOG,
                ssl=listener_context if kind is Transport.TLS else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if kind is Transport.TLS else None,
            )
            self._servers.append((kind, server))
        if self._servers:
            log.info(
                "listening on streams",
                extra={kind.value: [str(a) for a in self.addresses(kind)] for kind, _ in wanted},
            )

    def addresses(self, kind: Transport) -> list[TransportAddr]:
        """The bound addresses of the TCP or TLS listeners (port 0 becomes the real port)."""
        return [
            bound_address(sock)
            for k, server in self._servers
            if k is kind
            for sock in server.sockets
        ]

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def send(self, flow: ClientFlow, data: bytes) -> None:
        connection = self._connections.get(flow.listener)
        if connection is None or connection.flow != flow:
            self._stats["client_send_unroutable"] += 1
            return
        connection.write(data)

    def allocation_changed(self, flow: ClientFlow, allocated: bool) -> None:
        """The core opened or deleted `flow`'s allocation. While it lives the connection is not
        closed for being idle; once it is gone (expired, refreshed to 0) the idle timeout runs
        again, rather than closing at once, so the client may allocate again on it."""
        connection = self._connections.get(flow.listener)
        if connection is not None and connection.flow == flow:
            connection.set_allocated(allocated)

    def reload_tls(self) -> bool:
        """Load the certificate and key files again for new handshakes. On failure the
        current ones stay in use and False is returned (logged, counted)."""
        if self._tls_files is None:
            return False
        cert, key = self._tls_files
        try:
            context = server_context(cert, key)
        except (OSError, ValueError) as e:
            self._stats["tls_reload_errors"] += 1
            log.error(
                "TLS reload failed; keeping the current certificate",
                extra={"tls_cert": str(cert), "tls_key": str(key), "error": str(e)},
            )
            return False
        self._tls_current = context
        self._stats["tls_reloads"] += 1
        log.info("TLS certificate reloaded", extra={"tls_cert": str(cert)})
        return True

    def close(self) -> None:
        """Stop listening and drop every connection, without telling the core (it is closing
        and has deleted the allocations itself)."""
        self._closing = True
        for _, server in self._servers:
            server.close()
        self._servers.clear()
        for connection in list(self._connections.values()):
            connection.abort()
        self._connections.clear()

    # Connection callbacks

    def _select_context(
        self, sslobj: ssl.SSLObject, server_name: str | None, listener: ssl.SSLContext
    ) -> None:
        if self._tls_current is not None and self._tls_current is not listener:
            sslobj.context = self._tls_current

    def _opened(
        self, connection: _Connection, client: TransportAddr, kind: Transport
    ) -> ClientFlow | None:
        """The new connection's flow, or None when it is over --max-stream-connections."""
        if len(self._connections) >= self.max_connections:
            self._stats[f"{kind.value}_connections_refused"] += 1
            if not self._full_logged:  # once per episode of being full, not per connection
                self._full_logged = True
                log.warning(
                    "refusing TCP/TLS connections: --max-stream-connections reached",
                    extra={"max_stream_connections": self.max_connections},
                )
            return None
        self._full_logged = False
        flow = ClientFlow(ClientAddr(client), next(self._ids), kind)
        self._connections[flow.listener] = connection
        self._stats[f"{kind.value}_connections_opened"] += 1
        return flow

    def _frames(self, flow: ClientFlow, frames: list[bytes]) -> None:
        if not self._closing:
            self._on_frames(flow, frames)

    def _malformed(self, flow: ClientFlow, error: FramingError) -> None:
        self._stats[f"{flow.transport.value}_malformed_frames"] += 1
        log.debug(
            "closing a connection that is not TURN",
            extra={"client": str(flow.client), "error": str(error)},
        )

    def _timed_out(self, flow: ClientFlow, partial: bool) -> None:
        reason = "partial_frame_timeouts" if partial else "idle_timeouts"
        self._stats[f"{flow.transport.value}_{reason}"] += 1
        log.debug(
            "closing an idle connection",
            extra={"client": str(flow.client), "partial_frame": partial},
        )

    def _lost(self, flow: ClientFlow) -> None:
        if self._connections.pop(flow.listener, None) is None:
            return
        self._stats[f"{flow.transport.value}_connections_closed"] += 1
        if not self._closing:
            self._on_closed(flow)

    def _send_dropped(self) -> None:
        self._stats["client_send_dropped"] += 1


class _Connection(asyncio.Protocol):
    """One client connection: frames in, messages out."""

    def __init__(self, owner: StreamListeners, kind: Transport) -> None:
        self._owner = owner
        self._kind = kind
        self._decoder = StreamDecoder()
        self._transport: asyncio.Transport | None = None
        self.flow: ClientFlow | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._allocated = False
        # When the current idle period began: a message must complete within the idle timeout
        # of it. None while the connection has an allocation and no partly received message.
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        host, port = transport.get_extra_info("peername")[:2]
        self.flow = self._owner._opened(self, from_sockaddr(host, port), self._kind)
        if self.flow is None:  # over the cap; never registered, so the core never hears of it
            self._transport.abort()
            return
        self._loop = asyncio.get_running_loop()
        self._restart_idle()

    def data_received(self, data: bytes) -> None:
        if self.flow is None or self._decoder.failed:
            return
        try:
            frames = self._decoder.feed(data)
        except FramingError as e:
            # Once one frame boundary is lost the rest of the stream is noise: close it.
            self._owner._malformed(self.flow, e)
            self.abort()
            return
        if frames:
            self._owner._frames(self.flow, frames)  # may open or delete this flow's allocation
            self._restart_idle()
        elif self._idle_since is None:
            # An allocated connection, idle until now, began a message: it must finish it.
            self._restart_idle()
        # Otherwise bytes that complete nothing do not extend the deadline: a peer trickling
        # a frame header announcing a large frame (or an HTTP request) still times out.

    def set_allocated(self, allocated: bool) -> None:
        self._allocated = allocated
        self._restart_idle()

    def _restart_idle(self) -> None:
        if self._allocated and not self._decoder.buffered:
            self._idle_since = None  # it lives as long as its allocation
            return
        assert self._loop is not None
        self._idle_since = self._loop.time()
        # One timer per idle period at most: it is not moved on every message, but re-armed
        # for what is left when it fires (see _check_idle).
        if self._timer is None:
            self._timer = self._loop.call_later(self._owner.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        if self._idle_since is None or self.flow is None or self._loop is None:
            return
        remaining = self._idle_since + self._owner.idle_timeout - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check_idle)
            return
        self._owner._timed_out(self.flow, partial=self._decoder.buffered > 0)
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.flow is not None:
            self._owner._lost(self.flow)

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self._owner._stats["client_send_unroutable"] += 1
            return
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._owner._send_dropped()
            return
        transport.write(data)

    def abort(self) -> None:
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["MAX_WRITE_BUFFER", "StreamBindError", "StreamListeners", "open_tcp_listener"]
