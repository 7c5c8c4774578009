"""UDP sockets for listeners and allocations."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import socket
import struct
from collections.abc import Callable, Mapping

from xdpturn.proto.addr import Family, IPAddress, TransportAddr
from xdpturn.proto.commands import PortResult

log = logging.getLogger("xdpturn.server")

# Errors that say the process, not the port, is the problem: no other port would open either.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

MAX_DATAGRAM = 65535

# Receive queues are sized by time, not bytes: under overload a deep queue only delays media
# (fixed 4 MiB queues held hundreds of ms of it before anything was dropped). A socket's queue
# holds what one worker relays in --receive-queue-delay; past that the kernel drops, and counts.
# WORKER_RATE: datagrams per second one worker's Python path relays (docs/performance.md:
# 55-65 k on the benchmark machine's core). DATAGRAM_TRUESIZE: what the kernel charges a queued
# datagram against the buffer, its buffer's true size and not its payload: 832 bytes for up to
# ~200 bytes on loopback, 2304 for 1200. Sizing with the smallest bounds the number of queued
# datagrams, so the delay, for any mix of sizes.
WORKER_RATE = 60_000
DATAGRAM_TRUESIZE = 832
# getsockopt(SO_MEMINFO) (Linux 3.x+): u32 counters, the ninth is the socket's drop count.
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_MEMINFO_DROPS = 8

# DONT-FRAGMENT: IPv4 datagrams with DF, never fragmented here (too big for the path: EMSGSIZE);
# IPv6 datagrams never fragmented. Linux's values where Python's socket module lacks them.
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)

SockAddr = tuple[str, int] | tuple[str, int, int, int]


def receive_buffer_for(delay: float) -> int:
    """The SO_RCVBUF for a receive queue of `delay` seconds at WORKER_RATE."""
    datagrams = max(1, round(WORKER_RATE * delay))
    # The kernel doubles the value it is given (the other half is for its bookkeeping) and
    # charges datagrams against the doubled one.
    return datagrams * DATAGRAM_TRUESIZE // 2


def open_udp_socket(
    addr: TransportAddr,
    receive_buffer: int,
    before_bind: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A bound, non-blocking UDP socket with SO_RCVBUF `receive_buffer`. IPv6 sockets are
    IPv6-only, so that 0.0.0.0:P and [::]:P can both be bound. `before_bind` may set options
    that must precede bind(). Raises OSError when the address cannot be bound."""
    family = socket.AF_INET if addr.family is Family.IPV4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if before_bind is not None:
            before_bind(sock)
        set_receive_buffer(sock, receive_buffer)
        sock.setblocking(False)
        sock.bind(to_sockaddr(addr))
    except BaseException:
        sock.close()
        raise
    return sock


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    # SO_RCVBUFFORCE passes rmem_max when we hold CAP_NET_ADMIN (a relay run as root); without
    # it, SO_RCVBUF gets what the sysctl allows.
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return
        except OSError:
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError as e:
        log.debug("cannot set the receive buffer", extra={"error": str(e)})


def set_dont_fragment(sock: socket.socket, family: Family) -> None:
    """What `sock` sends is never fragmented: DF set (IPv4), no fragment header (IPv6). A
    datagram too big for the path then fails with EMSGSIZE (counted as a send error)."""
    if family is Family.IPV4:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)


def receive_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped at this socket, nearly all because its receive queue was
    full. Read when asked (a scrape), so receiving pays nothing for it."""
    try:
        meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * (_MEMINFO_DROPS + 1))
    except OSError:
        return 0
    if len(meminfo) < 4 * (_MEMINFO_DROPS + 1):
        return 0
    drops: int = struct.unpack_from("=I", meminfo, 4 * _MEMINFO_DROPS)[0]
    return drops


def to_sockaddr(addr: TransportAddr) -> SockAddr:
    if addr.ip.version == 6:
        return (str(addr.ip), addr.port, 0, 0)
    return (str(addr.ip), addr.port)


def from_sockaddr(host: str, port: int) -> TransportAddr:
    """The sender of a datagram or connection. The runtime keeps what this returns per sender
    (RelayServer's address caches), so it is not called per datagram."""
    return TransportAddr(ipaddress.ip_address(host), port)


def bound_address(sock: socket.socket) -> TransportAddr:
    host, port = sock.getsockname()[:2]
    return TransportAddr(ipaddress.ip_address(host), port)


Reader = Callable[[socket.socket, int, Family], None]


class RelaySockets:
    """The sockets of open allocation ports: one UDP socket per family, all bound to the same
    port number, read by `reader` from the event loop. Which port is the core's choice
    (OpenRelayPort); a port another program holds cannot be opened, and the core then tries
    another."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        bind: Mapping[Family, IPAddress],
        reader: Reader,
        receive_buffer: int,
    ) -> None:
        self._loop = loop
        self._bind = bind
        self._reader = reader
        self._receive_buffer = receive_buffer
        self._sockets: dict[int, dict[Family, socket.socket]] = {}
        self._closed_drops = 0  # receive_drops of the sockets already closed

    def open(
        self, port: int, families: frozenset[Family], dont_fragment: bool = False
    ) -> PortResult:
        """Bind `port` in every family of `families` (nothing stays bound unless all are).
        `dont_fragment`: see set_dont_fragment."""
        if port in self._sockets or not families or not families <= self._bind.keys():
            return PortResult.TAKEN
        socks: dict[Family, socket.socket] = {}
        for family in sorted(families):
            try:
                address = TransportAddr(self._bind[family], port)
                socks[family] = sock = open_udp_socket(address, self._receive_buffer)
                if dont_fragment:
                    set_dont_fragment(sock, family)
            except OSError as e:
                for sock in socks.values():
                    sock.close()
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    return PortResult.TAKEN
                log.warning("cannot bind a relay port", extra={"port": port, "error": str(e)})
                return PortResult.EXHAUSTED if e.errno in _EXHAUSTED else PortResult.TAKEN
        self._sockets[port] = socks
        for family, sock in socks.items():
            self._loop.add_reader(sock.fileno(), self._reader, sock, port, family)
        return PortResult.OPENED

    def close(self, port: int) -> None:
        for sock in self._sockets.pop(port, {}).values():
            self._loop.remove_reader(sock.fileno())
            self._closed_drops += receive_drops(sock)
            sock.close()

    def detach(self, port: int) -> dict[Family, socket.socket]:
        """Stop reading `port`'s sockets and hand them to the caller, open (a reservation
        given up to another worker process takes them along)."""
        socks = self._sockets.pop(port, {})
        for sock in socks.values():
            self._loop.remove_reader(sock.fileno())
        return socks

    def adopt(self, port: int, socks: Mapping[Family, socket.socket]) -> bool:
        """Read `socks`, the sockets of `port` that another worker process opened, as if they
        were opened here; False (and nothing taken) when they are not each a UDP socket of its
        family bound to that port on this relay's address, or `port` is open here already."""
        if port in self._sockets or not socks:
            return False
        for family, sock in socks.items():
            bind = self._bind.get(family)
            expected = socket.AF_INET if family is Family.IPV4 else socket.AF_INET6
            if (
                bind is None
                or sock.family != expected
                or sock.type != socket.SOCK_DGRAM
                or bound_address(sock) != TransportAddr(bind, port)
            ):
                return False
        self._sockets[port] = dict(socks)
        for family, sock in socks.items():
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._reader, sock, port, family)
        return True

    def receive_drops(self) -> int:
        """Datagrams dropped at full receive queues of allocation sockets, closed ones too."""
        open_drops = sum(
            receive_drops(s) for socks in self._sockets.values() for s in socks.values()
        )
        return self._closed_drops + open_drops

    def socket(self, port: int, family: Family) -> socket.socket | None:
        socks = self._sockets.get(port)  # per datagram: no throwaway {} as a default
        return socks.get(family) if socks is not None else None

    def __len__(self) -> int:
        return len(self._sockets)

    def close_all(self) -> None:
        for port in list(self._sockets):
            self.close(port)


# Descriptors an allocation may hold: a relay socket per family (two for a dual allocation) and
# its UDP client's connected socket; plus room for listeners, TCP clients and the rest.
FILES_PER_ALLOCATION = 3
FILES_HEADROOM = 4096


def raise_open_file_limit(relay_ports: int) -> tuple[int, int]:
    """Raise this process's open-file limit (RLIMIT_NOFILE) to what `relay_ports` allocations
    need, as far as it may: the hard limit too when privileged (to at most fs.nr_open), else
    the soft limit to the hard one. Returns (limit now, limit needed). Workers inherit it."""
    need = relay_ports * FILES_PER_ALLOCATION + FILES_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if hard != unlimited and hard < need:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, ceiling),) * 2)
        except (OSError, ValueError):
            pass  # not privileged: the hard limit stays
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != unlimited else need
    if soft != unlimited and soft < target:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (soft if soft != unlimited else need), need
