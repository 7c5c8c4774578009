"""One connected UDP socket per allocated client on the listening port: the kernel sorts known
clients from everyone else.

A listener and these sockets share the port through SO_REUSEPORT (only sockets of the same user
may join). For a datagram the kernel prefers the socket connected to its exact source, so an
allocated client's datagrams queue on that client's own socket and the listener carries only
newcomers and junk. Each socket is read by the event loop on its own, so a flood that fills the
listener's queue overflows there, not in a client's queue.

The sockets only receive; replies still go out through the listener. They are read through
datagram transports, not readers on the file descriptor: an ICMP error for something sent to the
client (port unreachable once it is gone) is reported on its connected socket, and uvloop stops
polling a descriptor that reports an error, which would silently leave the client's last
datagrams (its Refresh with lifetime 0) unread; a transport hands the error to `error_received`
and keeps reading. Datagrams that reached a new socket between its bind() and connect() came from
anyone; they are handed on with their real source, so nothing is misattributed. When a socket
cannot be opened (no file descriptors left, a wildcard listener whose route picks another source
address), the client's datagrams simply keep arriving on the listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from xdpturn.proto.addr import ClientFlow, Family, Transport
from xdpturn.server.sockets import receive_drops, set_receive_buffer, to_sockaddr

log = logging.getLogger("xdpturn.server")

# (data, source address as recvfrom gives it, listener index)
Deliver = Callable[[bytes, Any, int], None]


def enable_port_sharing(sock: socket.socket) -> None:
    """Let connected client sockets bind the listener's port (call before bind())."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, deliver: Deliver, listener: int, stats: Counter[str]) -> None:
        self._deliver = deliver
        self._listener = listener
        self._stats = stats

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._deliver(data, addr, self._listener)

    def error_received(self, exc: Exception) -> None:
        # ICMP for what was sent to the client (e.g. port unreachable once it has gone).
        self._stats["client_socket_icmp_errors"] += 1


class _ClientSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None
        self.opening: asyncio.Task[Any] | None = None

    def close(self) -> None:
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        if self.transport is not None:
            self.transport.close()
        else:
            self.sock.close()


class ClientSockets:
    """Opens a connected socket for each UDP flow that gets an allocation, closes it with the
    allocation. `deliver(data, addr, listener)` is the runtime's handler of one datagram."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: list[socket.socket],
        deliver: Deliver,
        stats: Counter[str],
        receive_buffer: int,
    ) -> None:
        self._loop = loop
        self._listeners = listeners
        self._deliver = deliver
        self._stats = stats
        # Sized by time like every UDP socket's (sockets.receive_buffer_for).
        self._receive_buffer = receive_buffer
        self._sockets: dict[ClientFlow, _ClientSocket] = {}
        self._closed_drops = 0  # receive_drops of the sockets already closed

    def open(self, flow: ClientFlow) -> None:
        if flow.transport is not Transport.UDP or flow in self._sockets:
            return
        if flow.listener >= len(self._listeners):
            return
        listener = self._listeners[flow.listener]
        family = socket.AF_INET if flow.client.family is Family.IPV4 else socket.AF_INET6
        if listener.family != family:
            return
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as e:
            self._failed(flow, e)
            return
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            enable_port_sharing(sock)
            set_receive_buffer(sock, self._receive_buffer)
            sock.setblocking(False)
            sock.bind(listener.getsockname())
            sock.connect(to_sockaddr(flow.client))
        except OSError as e:
            sock.close()
            self._failed(flow, e)
            return
        entry = self._sockets[flow] = _ClientSocket(sock)
        # The socket already sorts the client's datagrams; they queue until the transport reads.
        receiver = _Receiver(self._deliver, flow.listener, self._stats)
        entry.opening = self._loop.create_task(
            self._loop.create_datagram_endpoint(lambda: receiver, sock=sock)
        )
        entry.opening.add_done_callback(lambda task: self._opened(flow, entry, task))

    def _opened(self, flow: ClientFlow, entry: _ClientSocket, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            if self._sockets.get(flow) is entry:
                del self._sockets[flow]
            entry.sock.close()
            self._failed(flow, error)
            return
        transport, _ = task.result()
        if self._sockets.get(flow) is not entry:  # closed meanwhile
            transport.close()
            return
        entry.transport = transport

    def close(self, flow: ClientFlow) -> None:
        entry = self._sockets.pop(flow, None)
        if entry is not None:
            self._close(entry)

    def close_all(self) -> None:
        for entry in self._sockets.values():
            self._close(entry)
        self._sockets.clear()

    def _close(self, entry: _ClientSocket) -> None:
        if entry.sock.fileno() >= 0:
            self._closed_drops += receive_drops(entry.sock)
        entry.close()

    def receive_drops(self) -> int:
        """Datagrams dropped at full receive queues of client sockets, closed ones too."""
        open_drops = sum(
            receive_drops(e.sock) for e in self._sockets.values() if e.sock.fileno() >= 0
        )
        return self._closed_drops + open_drops

    def __len__(self) -> int:
        return len(self._sockets)

    def _failed(self, flow: ClientFlow, error: BaseException) -> None:
        self._stats["client_socket_errors"] += 1
        log.debug(
            "no connected socket for a client; its datagrams stay on the listener",
            extra={"client": str(flow.client), "error": str(error)},
        )
