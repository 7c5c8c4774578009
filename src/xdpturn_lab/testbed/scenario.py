"""End-to-end scenarios on a testbed: the real `xdpturn serve` in a relay namespace, TURN endpoints
in site namespaces, numbered datagrams between them. Used by tests/e2e, the demo and benchmarks.

    from xdpturn_lab.testbed import Relay, Site, Testbed, Topology
    from xdpturn_lab.testbed import scenario

    with Testbed(Topology([Relay("relay")], [Site("client"), Site("gateway")])) as tb:
        with scenario.RelayProcess(tb, "relay", fastpath=True) as relay:   # waits for "listening"
            async def main() -> tuple[scenario.Report, scenario.Report]:
                async with scenario.pair(
                    scenario.EndpointSpec(tb, "client", relay.server(Family.IPV4), relay.secret),
                    scenario.EndpointSpec(tb, "gateway", relay.server(Family.IPV6), relay.secret),
                ) as (client, gateway):  # allocated, relayed addresses swapped, channels bound
                    return await scenario.exchange(client, gateway, 10_000)
            to_gateway, to_client = asyncio.run(main())
            relay.counters().routes["ipv4_channel_to_ipv6_channel"]   # the XDP program's counters
        # leaving the block: SIGTERM, wait, and check that no XDP program is left on eth0

Endpoints run in the caller's event loop and thread: only their sockets live in the site's
namespace (created there, then used from anywhere), so both ends of an exchange share one loop and
the sender can pace itself on what the receiver has seen. Sending is windowed (at most `window`
datagrams in flight per direction), so an unloaded testbed loses nothing to queue overflow.
Every wait is bounded; nothing sleeps for luck.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from xdpturn.client.turn import (
    LostHandler,
    Receiver,
    TurnClient,
    UdpTransport,
)
from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.auth import mint_rest_credentials
from xdpturn_lab.testbed import netns
from xdpturn_lab.testbed.testbed import NodeRef, RelayNode, Testbed

DEFAULT_SECRET = "xdpturn-testbed-secret"
TURN_PORT = 3478
# Above the kernel's ephemeral range (32768-60999), so no local socket can take an allocation port.
RELAY_PORTS = "61000-65000"
START_TIMEOUT = 15.0  # seconds until "listening" (loading the BPF object takes a moment)
STOP_TIMEOUT = 10.0  # seconds from SIGTERM to exit, before SIGINT and then SIGKILL
STEP_TIMEOUT = 10.0  # seconds for one TURN set-up step or a stalled exchange
RECEIVE_BUFFER = 4 << 20  # bytes, for every endpoint socket (see _grow_receive_buffer)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

# An internet host for plain UDP peers: on the internet router's loopback, in the prefixes the
# topology leaves free for tests (see topology).
INTERNET_HOST_IPV4 = ipaddress.IPv4Address("192.0.2.10")
INTERNET_HOST_IPV6 = ipaddress.IPv6Address("2001:db8:ff::10")


# --- the relay process ---------------------------------------------------------------------------


def xdp_attached(tb: Testbed, node: NodeRef, ifname: str) -> bool:
    """Whether any XDP program is attached to `ifname` in the node's namespace (`ip -j link`)."""
    out = subprocess.run(
        ["ip", "-j", "-n", tb.netns_of(node), "link", "show", "dev", ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    links: list[dict[str, Any]] = json.loads(out)
    return any("xdp" in link for link in links)


class RelayProcess:
    """`xdpturn serve` in a relay's namespace, listening on the relay's local addresses (both
    families) and telling clients its public ones, with the fast path on its interface or off.

    `start()` returns once the relay logged "listening" (its record is `listening`); `stop()`
    sends SIGTERM, waits for the exit and raises AssertionError if an XDP program is still
    attached to the relay's interface. Both run on entering and leaving a `with` block. The JSON
    log records are collected in `records`.

    One worker unless `workers` says otherwise (not the CPUs, serve's default): with two workers
    on two CPUs sending into the same veth, the testbed's hops reorder a few datagrams in 10,000
    (seen with Python relaying hairpin traffic between two workers), which the exchanges here
    count against the relay.
    """

    def __init__(
        self,
        tb: Testbed,
        relay: str | RelayNode,
        *,
        fastpath: bool,
        secret: str = DEFAULT_SECRET,
        extra_args: Sequence[str] = (),
        workers: int = 1,
    ) -> None:
        self.tb = tb
        self.relay = relay if isinstance(relay, RelayNode) else tb.relay(relay)
        self.fastpath = fastpath
        self.secret = secret
        self.extra_args = list(extra_args)
        self.workers = workers
        self.records: list[dict[str, Any]] = []
        self.listening: dict[str, Any] = {}
        self.returncode: int | None = None
        self.stopped_by: str | None = None  # the signal that ended it: SIGTERM unless it hung
        self._changed = threading.Condition()  # records appended, or the log ended
        self._ended = False
        self._proc: subprocess.Popen[str] | None = None

    def argv(self) -> list[str]:
        r = self.relay
        args = [sys.executable, "-m", "xdpturn", "serve"]
        args += [
            "--listen",
            f"{r.local_ipv4}:{TURN_PORT}",
            "--listen",
            f"[{r.local_ipv6}]:{TURN_PORT}",
        ]
        args += ["--public-ipv4", str(r.public_ipv4), "--public-ipv6", str(r.public_ipv6)]
        args += ["--ports", RELAY_PORTS, "--auth-secret", self.secret, "--log-format", "json"]
        args += ["--workers", str(self.workers)]
        # These scenarios check delivery, not delay: both directions' windows (2 x 256 small
        # datagrams in flight, all through the listener when hairpinning) must fit the relay's
        # queues while it is briefly descheduled on a busy machine; 20 ms holds 1,200.
        args += ["--receive-queue-delay", "20"]
        if self.fastpath:
            args += ["--fastpath", "auto", "--interface", r.interface]
        else:
            args += ["--fastpath", "off"]
        return [*args, *self.extra_args]

    def start(self) -> dict[str, Any]:
        """Start and wait for the "listening" record (returned)."""
        if self._proc is not None:
            raise RuntimeError("already started")
        self._proc = self.tb.popen(
            self.relay,
            self.argv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, name="serve-log", daemon=True).start()
        self.listening = self.wait_for("listening", timeout=START_TIMEOUT)
        return self.listening

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            try:
                record: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                record = {"message": line.rstrip("\n"), "level": "RAW"}  # e.g. a traceback
            with self._changed:
                self.records.append(record)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(
        self,
        message: str,
        *,
        timeout: float = STEP_TIMEOUT,
        where: Callable[[dict[str, Any]], bool] = lambda _: True,
    ) -> dict[str, Any]:
        """The first log record, logged so far or within `timeout`, with this message for which
        `where` holds. The log is read by a thread, so a record can lag behind what it reports
        (e.g. an Allocate response): wait for it rather than look once."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for record in self.records[checked:]:
                    if record.get("message") == message and where(record):
                        return record
                checked = len(self.records)
                if self._ended:
                    raise AssertionError(f"xdpturn serve exited before {message!r}: {self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {message!r} log record within {timeout} s: {self.tail()}"
                    )
                self._changed.wait(left)

    def tail(self, n: int = 10) -> str:
        return "\n".join(json.dumps(r) for r in self.records[-n:])

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("not started")
        return self._proc.pid

    @property
    def fastpath_mode(self) -> str:
        """As logged on start: "native", "generic" or "off"."""
        return str(self.listening.get("fastpath"))

    def server(self, family: Family = Family.IPV4) -> TransportAddr:
        """The TURN server address clients use (the public address of that family)."""
        r = self.relay
        ip = r.public_ipv4 if family is Family.IPV4 else r.public_ipv6
        return TransportAddr(ip, TURN_PORT)

    def counters(self) -> FastPathCounters:
        """The XDP program's counters, read from its maps (empty with the fast path off)."""
        if self.fastpath_mode == "off":
            return FastPathCounters()
        from xdpturn.fastpath.xdp import attached_counters

        return self.tb.call(self.relay, attached_counters, self.relay.interface)

    def stop(self) -> int:
        """SIGTERM (drain: allocations still open keep it running up to --drain-timeout, so
        close endpoints first), then SIGINT and SIGKILL if it overstays; returns the exit status
        and asserts that no XDP program is left on the relay's interface."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("not started")
        if self.returncode is None:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                self.stopped_by = sig.name
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    continue
            self.returncode = proc.wait(timeout=STOP_TIMEOUT)
        if xdp_attached(self.tb, self.relay, self.relay.interface):
            raise AssertionError(f"an XDP program is still attached to {self.relay.interface}")
        return self.returncode

    def interrupt(self) -> int:
        """SIGINT and wait for the exit; returns the exit status. With --state-dir that is a stop
        for a restart, so an XDP program may stay attached (nothing is asserted about it)."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("not started")
        proc.send_signal(signal.SIGINT)
        self.stopped_by = signal.SIGINT.name
        self.returncode = proc.wait(timeout=STOP_TIMEOUT)
        return self.returncode

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
            return
        with suppress(AssertionError):  # the body's failure is the one to report
            self.stop()


# --- sockets inside a namespace ------------------------------------------------------------------


def _grow_receive_buffer(sock: socket.socket) -> None:
    # Frames a veth delivers after XDP_TX are charged a whole page each, so the default buffer
    # (about 200 kB) overflows with a window of a few hundred small datagrams in flight.
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)  # root: above rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


def netns_socket(ns: str, family: int, bind: tuple[str, int] | None = None) -> socket.socket:
    """A non-blocking UDP socket created (and bound) inside namespace `ns`; it stays there."""
    with netns.entered(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            _grow_receive_buffer(sock)
            if bind is not None:
                sock.bind(bind)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: Callable[[bytes, Any], None], lost: LostHandler) -> None:
        self._receiver = receiver
        self._lost = lost

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._receiver(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: retransmissions and the exchange's accounting cope

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)


def netns_udp_opener(
    ns: str,
) -> Callable[[TransportAddr, Receiver, LostHandler], Awaitable[UdpTransport]]:
    """A `TurnClient.connect(opener=...)` whose UDP socket lives in namespace `ns`."""

    async def opener(server: TransportAddr, receiver: Receiver, lost: LostHandler) -> UdpTransport:
        family = socket.AF_INET6 if server.ip.version == 6 else socket.AF_INET
        sock = netns_socket(ns, family)
        try:
            # Connected (routing decided inside `ns`, where the socket lives), so only the
            # server's datagrams arrive.
            sock.connect((str(server.ip), server.port))
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(lambda data, _addr: receiver(data), lost), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return UdpTransport(transport)

    return opener


# --- numbered datagrams --------------------------------------------------------------------------

_HEADER = struct.Struct("!4sI")  # magic, sequence number
_MAGIC = b"xtb1"


def datagram(seq: int, size: int) -> bytes:
    """Datagram `seq`: header, then bytes derived from `seq`, so corruption anywhere shows."""
    body_len = max(0, size - _HEADER.size)
    seed = hashlib.blake2b(seq.to_bytes(4, "big"), digest_size=32).digest()
    body = (seed * (body_len // len(seed) + 1))[:body_len]
    return _HEADER.pack(_MAGIC, seq) + body


def sequence_of(data: bytes) -> int | None:
    """The sequence number if `data` is a datagram of `datagram()`'s form, else None."""
    if len(data) < _HEADER.size:
        return None
    magic, seq = _HEADER.unpack_from(data)
    return int(seq) if magic == _MAGIC else None


class Endpoint(Protocol):
    """One end of an exchange: sends to, and receives from, its partner only."""

    name: str

    def send(self, data: bytes) -> None: ...

    async def recv(self) -> bytes: ...


@dataclass
class Report:
    """One direction of an exchange."""

    sender: str
    receiver: str
    sent: int = 0
    delivered: int = 0  # distinct, intact datagrams
    corrupted: int = 0  # arrived with a known sequence number but wrong bytes, or unparseable
    duplicates: int = 0
    reordered: int = 0  # arrived after a higher-numbered one
    elapsed: float = 0.0
    stalls: int = 0  # times the window gave up waiting on in-flight datagrams

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    @property
    def ok(self) -> bool:
        return self.sent == self.delivered and not (self.corrupted or self.duplicates)

    def __str__(self) -> str:
        return (
            f"{self.sender}->{self.receiver}: sent {self.sent} delivered {self.delivered} "
            f"lost {self.lost} reordered {self.reordered} corrupted {self.corrupted} "
            f"duplicates {self.duplicates} in {self.elapsed:.2f} s"
        )


@dataclass
class _Direction:
    report: Report
    count: int
    size: int
    seen: set[int] = field(default_factory=set)
    highest: int = -1
    written_off: int = 0  # in-flight datagrams given up on after a stall
    progress: asyncio.Event = field(default_factory=asyncio.Event)

    def in_flight(self) -> int:
        r = self.report
        return r.sent - r.delivered - r.corrupted - self.written_off

    def take(self, data: bytes) -> None:
        r = self.report
        seq = sequence_of(data)
        if seq is None or seq >= self.count:
            r.corrupted += 1
        elif seq in self.seen:
            r.duplicates += 1
        elif data != datagram(seq, self.size):
            r.corrupted += 1
            self.seen.add(seq)
        else:
            self.seen.add(seq)
            r.delivered += 1
            if seq < self.highest:
                r.reordered += 1
            self.highest = max(self.highest, seq)
        self.progress.set()

    def complete(self) -> bool:
        return len(self.seen) >= self.count


async def _send_windowed(
    src: Endpoint, d: _Direction, window: int, stall_timeout: float, deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    for seq in range(d.count):
        while d.in_flight() >= window:
            d.progress.clear()
            left = deadline - loop.time()
            try:
                await asyncio.wait_for(d.progress.wait(), min(stall_timeout, max(0.0, left)))
            except TimeoutError:
                # Nothing arrived for a while: count what is in flight as lost and go on, so one
                # lost window cannot hold the rest of the exchange.
                d.report.stalls += 1
                d.written_off += d.in_flight()
                if loop.time() >= deadline:
                    return
        src.send(datagram(seq, d.size))
        d.report.sent += 1
        if seq % 64 == 63:
            await asyncio.sleep(0)  # let receivers run between bursts


async def _receive(dst: Endpoint, d: _Direction) -> None:
    while not d.complete():
        d.take(await dst.recv())


async def exchange(
    a: Endpoint,
    b: Endpoint,
    count: int,
    *,
    size: int = 100,
    window: int = 256,
    stall_timeout: float = 2.0,
    timeout: float = 60.0,
    both_ways: bool = True,
) -> tuple[Report, Report]:
    """Send `count` numbered datagrams of `size` bytes a -> b and (with `both_ways`) b -> a at the
    same time, at most `window` in flight per direction. Returns (a -> b, b -> a) reports; the
    second is empty without `both_ways`. Waits at most `timeout` seconds in all."""
    if size < _HEADER.size:
        raise ValueError(f"size must be at least {_HEADER.size}")
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    forward = _Direction(Report(a.name, b.name), count, size)
    backward = _Direction(Report(b.name, a.name), count if both_ways else 0, size)
    directions = [(a, b, forward), (b, a, backward)] if both_ways else [(a, b, forward)]
    receivers = [loop.create_task(_receive(dst, d)) for _, dst, d in directions]
    senders = [
        loop.create_task(_send_windowed(src, d, window, stall_timeout, deadline))
        for src, _, d in directions
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*senders), max(0.0, deadline - loop.time()))
        # The tail of each direction: done when complete, or after a quiet stall_timeout.
        for task, (_, _, d) in zip(receivers, directions, strict=True):
            while not task.done():
                d.progress.clear()
                left = min(stall_timeout, deadline - loop.time())
                if left <= 0:
                    break
                done, _ = await asyncio.wait([task], timeout=left)
                if not done and not d.progress.is_set():
                    break
    except TimeoutError:
        pass  # the reports say how far it got
    finally:
        for task in [*senders, *receivers]:
            task.cancel()
        await asyncio.gather(*senders, *receivers, return_exceptions=True)
    elapsed = loop.time() - start
    for _, _, d in directions:
        d.report.elapsed = elapsed
    return forward.report, backward.report


# --- TURN endpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointSpec:
    """A TURN endpoint to open: in `site`'s namespace, on `server`, relayed addresses of
    `family` (plus `additional_family` for a dual-stack allocation), REST credentials minted with
    `secret`. `peer_family` picks which of the partner's relayed addresses to bind a channel to
    (default: the first, `family`'s)."""

    tb: Testbed
    site: str
    server: TransportAddr
    secret: str = DEFAULT_SECRET
    family: Family = Family.IPV4
    additional_family: Family | None = None
    peer_family: Family | None = None


class TurnEndpoint:
    """A TurnClient in a site's namespace with one allocation; `peer` is where it sends."""

    def __init__(
        self, name: str, client: TurnClient, transport: UdpTransport | None = None
    ) -> None:
        self.name = name
        self.client = client
        self._transport = transport
        self.peer: TransportAddr | None = None
        self.channel: int | None = None

    @classmethod
    async def open(cls, spec: EndpointSpec) -> TurnEndpoint:
        """Connect from the site's namespace and allocate."""
        creds = mint_rest_credentials(spec.secret, now=time.time(), ttl=3600, user_id=spec.site)
        ns = spec.tb.netns_of(spec.site)
        opener = netns_udp_opener(ns)
        opened: list[UdpTransport] = []

        async def keep(
            server: TransportAddr, receiver: Receiver, lost: LostHandler
        ) -> UdpTransport:
            opened.append(await opener(server, receiver, lost))
            return opened[-1]

        client = await TurnClient.connect(spec.server, creds.username, creds.password, opener=keep)
        try:
            await asyncio.wait_for(
                client.allocate(spec.family, spec.additional_family), STEP_TIMEOUT
            )
        except BaseException:
            await client.close()
            raise
        return cls(spec.site, client, opened[0])

    @property
    def relayed(self) -> list[TransportAddr]:
        return list(self.client.relayed)

    def relayed_of(self, family: Family) -> TransportAddr:
        for addr in self.client.relayed:
            if addr.family is family:
                return addr
        raise LookupError(f"{self.name} has no relayed address of {family.name}")

    @property
    def mapped(self) -> TransportAddr | None:
        """XOR-MAPPED-ADDRESS from the Allocate response: this endpoint as the relay sees it."""
        return self.client.mapped

    async def connect_to(self, peer: TransportAddr) -> int:
        """Permission and channel for `peer`; from then on `send` goes there as ChannelData."""
        await asyncio.wait_for(self.client.create_permission(peer), STEP_TIMEOUT)
        self.channel = await asyncio.wait_for(self.client.bind_channel(peer), STEP_TIMEOUT)
        self.peer = peer
        return self.channel

    def send(self, data: bytes) -> None:
        if self.peer is None:
            raise RuntimeError(f"{self.name}: connect_to() first")
        self.client.send(self.peer, data)

    async def recv(self) -> bytes:
        """The next datagram from `peer` (others are dropped)."""
        while True:
            source, data = await self.client.recv()
            if source == self.peer:
                return data

    async def close(self) -> None:
        """Delete the allocation (bounded), then the socket."""
        await self.client.close()

    def abandon(self) -> None:
        """Close the socket without deleting the allocation, as a client that vanished."""
        if self._transport is not None:
            self._transport.close()


async def connect_pair(
    a: TurnEndpoint, a_spec: EndpointSpec, b: TurnEndpoint, b_spec: EndpointSpec
) -> None:
    """Swap relayed addresses: each binds a channel to the other's relayed address (so the peer
    is a relay: the same one for a hairpin, or another)."""
    a_peer = b.relayed_of(a_spec.peer_family or b_spec.family)
    b_peer = a.relayed_of(b_spec.peer_family or a_spec.family)
    await asyncio.gather(a.connect_to(a_peer), b.connect_to(b_peer))


@asynccontextmanager
async def pair(
    a: EndpointSpec, b: EndpointSpec
) -> AsyncIterator[tuple[TurnEndpoint, TurnEndpoint]]:
    """Two allocated TURN endpoints with channels bound to each other's relayed addresses;
    both allocations are deleted on exit."""
    opened = await asyncio.gather(
        TurnEndpoint.open(a), TurnEndpoint.open(b), return_exceptions=True
    )
    endpoints = [e for e in opened if isinstance(e, TurnEndpoint)]
    try:
        for e in opened:
            if isinstance(e, BaseException):
                raise e
        ea, eb = endpoints
        await connect_pair(ea, a, eb, b)
        yield ea, eb
    finally:
        await asyncio.gather(*(e.close() for e in endpoints), return_exceptions=True)


# --- plain UDP peers -----------------------------------------------------------------------------


def add_internet_host(tb: Testbed) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """Give the internet router a host address of each family (idempotent), for plain peers."""
    lines = (
        f"addr replace {INTERNET_HOST_IPV4}/32 dev lo\n"
        f"addr replace {INTERNET_HOST_IPV6}/128 dev lo nodad\n"
    )
    subprocess.run(["ip", "-n", tb.inet_netns, "-batch", "-"], input=lines, text=True, check=True)
    return INTERNET_HOST_IPV4, INTERNET_HOST_IPV6


class UdpPeer:
    """A plain UDP socket in a namespace that talks to one TURN relayed address (`target`)."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self._sock = sock
        self.target: TransportAddr | None = None
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(
        cls, name: str, ns: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> UdpPeer:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        peer = cls(name, netns_socket(ns, family, (str(ip), 0)))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(peer._on_datagram, lambda _exc: None), sock=peer._sock
        )
        peer._transport = transport
        return peer

    @property
    def address(self) -> TransportAddr:
        host, port = self._sock.getsockname()[:2]
        return TransportAddr(ipaddress.ip_address(host), port)

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        if self.target is not None and (ipaddress.ip_address(addr[0]), addr[1]) == (
            self.target.ip,
            self.target.port,
        ):
            self._inbox.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self._transport is not None and self.target is not None
        self._transport.sendto(data, (str(self.target.ip), self.target.port))

    async def recv(self) -> bytes:
        return await self._inbox.get()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# --- running a coroutine inside a namespace ------------------------------------------------------


def run_in_netns(ns: str, main: Callable[[], Any], *, name: str = "netns-loop") -> threading.Thread:
    """Start a thread that enters `ns` and runs `asyncio.run(main())` there, so every socket the
    coroutine's libraries create (e.g. aioice's) lives in `ns`. Join it; results and errors go
    through whatever `main` closes over."""

    def body() -> None:
        with netns.entered(ns):
            asyncio.run(main())

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread


__all__ = [
    "DEFAULT_SECRET",
    "INTERNET_HOST_IPV4",
    "INTERNET_HOST_IPV6",
    "Endpoint",
    "EndpointSpec",
    "RelayProcess",
    "Report",
    "TurnEndpoint",
    "UdpPeer",
    "add_internet_host",
    "connect_pair",
    "datagram",
    "exchange",
    "netns_socket",
    "netns_udp_opener",
    "pair",
    "run_in_netns",
    "sequence_of",
    "xdp_attached",
]
