"""Several worker processes for one relay (--workers N, default: the CPUs it may run on).

The supervisor (the process `xdpturn serve` started) binds every listening address once per
worker with SO_REUSEPORT, so the kernel spreads clients over the workers by 4-tuple (once a
UDP client has an allocation, its own connected socket keeps its 5-tuple with that worker;
before, the pick can shift as the group's connected sockets come and go, which the shared nonce
key and quotas make harmless) and hands each TCP/TLS connection to one; it loads and
attaches the fast path once; then it forks the workers. Each worker runs the single-process relay
(`RelayServer` under `lifecycle.serve`) on its own sockets, with what the workers must agree on
shared:

- allocation ports: each worker binds its own allocations' sockets; a port bound by another
  worker is skipped as taken, so every port has one owner;
- `LivePorts`, one byte per port in shared memory, says which ports are live allocations and of
  which families (each core marks its own, see `Siblings`). A packet to the relay's own address
  on a port another worker holds goes
  through that worker's socket (`Siblings`) and arrives there as from a peer; the relay's own
  address on a port that is no allocation stays refused;
- quotas are counted by the supervisor, asked over a socket pair at Allocate time
  (`SupervisorQuotas`), because a client's several 5-tuples may land on different workers;
- reservations (EVEN-PORT with the R bit): for the same reason, a RESERVATION-TOKEN made by one
  worker may come to another, which fetches the reservation and its port's sockets from the
  first through the supervisor (xdpturn.server.reservations);
- the nonce key is made by the supervisor and the credentials come from the same config, so a
  nonce from one worker is valid on every other;
- the fast path's maps: the workers inherit the loaded program's file descriptors across fork and
  each installs and removes its own routes in them (`SharedFastPath`); the next hops of those
  routes are kept by the supervisor's one netlink watcher, told over the same socket pair
  (`NextHopsProxy`); the supervisor detaches the program after the last worker has gone.

With --state-dir, a restart keeps the workers' allocations (xdpturn.server.restart): the
supervisor reads the state file, adopts the pinned program and maps, and deals the allocations out
to its workers (`restart.partition`; their number may differ from the last run's), each of which
restores its share; once all have, the supervisor removes what the adopted maps hold beyond their
routes (`Restarts.settle`; the workers wait for that before they read a datagram, so nothing new
is installed meanwhile). SIGINT makes every worker export its state to the supervisor, which pins
the program and maps and writes one state file (`Restarts.keep`); if any worker's state is
missing, nothing is kept and the relay stops for good.

The supervisor forwards SIGTERM (drain), SIGINT (stop) and SIGHUP (reload the TLS certificate) to
every worker, serves --metrics and /status as one view summed over the workers' snapshots
(`WorkerPool`), and exits once every worker has exited: 0 if they all did cleanly. A worker that
dies on its own stops the others (the service manager restarts the relay). With one worker none
of this runs: `xdpturn serve` is the single process it always was.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import mmap
import os
import pickle
import random
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from xdpturn.config import ServeConfig
from xdpturn.fastpath import FastPath, FastPathCounters, NullFastPath
from xdpturn.proto.addr import ClientFlow, Family, IPAddress, PeerAddr, Transport, TransportAddr
from xdpturn.proto.commands import ChannelRoute
from xdpturn.proto.handover import CoreState, from_plain, to_plain
from xdpturn.proto.meter import AllocationTraffic
from xdpturn.proto.paths import ChannelPath
from xdpturn.proto.quotas import LocalQuotas, QuotaRefusal, Quotas
from xdpturn.proto.server import AllocationInfo, RelayPorts, ServerConfig, TurnServer
from xdpturn.proto.stats import CoreStats
from xdpturn.server import restart
from xdpturn.server.drain import Drainer
from xdpturn.server.lifecycle import HANDLED_SIGNALS, event_loop_factory, serve
from xdpturn.server.metering import MeteredAllocation, Metering
from xdpturn.server.metrics import OpsServer, Response
from xdpturn.server.relay import (
    Core,
    CoreFactory,
    RelayServer,
    StartError,
    bind_udp_listeners,
    open_kept_fastpath,
)
from xdpturn.server.reservations import ReservationChannel, ReservationRouter, channel_pair
from xdpturn.server.sockets import bound_address, receive_buffer_for
from xdpturn.server.streams import StreamBindError, open_tcp_listener
from xdpturn.server.traffic import ReceiveQueueDrops, error_counts, request_counts

if TYPE_CHECKING:
    from xdpturn.fastpath.xdp import KeptEntries, NextHopKeeper, XdpFastPath

log = logging.getLogger("xdpturn.server")

PORTS = 65536
# Bounds on talking to the supervisor. A quota question blocks the worker's loop (Allocates only).
QUOTA_TIMEOUT = 2.0
SNAPSHOT_TIMEOUT = 2.0
START_TIMEOUT = 30.0
START_POLL = 0.05
SNAPSHOT_REQUEST = b"?"
LENGTH = struct.Struct("!I")
PR_SET_PDEATHSIG = 1
# The longest line on a worker's channel: a worker's whole state at a stop for a restart.
MESSAGE_LIMIT = 1 << 28


# Shared state


class LivePorts:
    """Which allocation ports are live, and for which families: one byte per port (the Family
    values as bits) in memory shared by every worker. Only the worker that bound a port writes
    its byte, so single-byte stores need no lock."""

    def __init__(self) -> None:
        self._table = mmap.mmap(-1, PORTS)  # anonymous and MAP_SHARED: survives fork shared

    def mark(self, port: int, families: Iterable[Family]) -> None:
        bits = 0
        for family in families:
            bits |= family
        self._table[port] = bits

    def clear(self, port: int) -> None:
        self._table[port] = 0

    def has(self, port: int, family: Family) -> bool:
        return bool(self._table[port] & family)


def loopback(family: Family) -> IPAddress:
    return TransportAddr.parse("127.0.0.1:0" if family is Family.IPV4 else "[::1]:0").ip


def sibling_addresses(config: ServeConfig) -> dict[Family, IPAddress]:
    """Where a worker's allocation sockets of each family can be reached from this host: the
    address they are bound to, or loopback when that is the wildcard."""
    return {
        family: loopback(family) if bind.is_unspecified else bind
        for family, bind in config.relay_binds.items()
    }


class Siblings:
    """The core's `SiblingAllocations`: its allocations are marked in the shared table, and
    another worker's allocation is reached through the socket it is bound to."""

    def __init__(self, live: LivePorts, reach: dict[Family, IPAddress]) -> None:
        self._live = live
        self._reach = reach

    def opened(self, port: int, families: frozenset[Family]) -> None:
        self._live.mark(port, families)

    def closed(self, port: int) -> None:
        self._live.clear(port)

    def route(self, port: int, family: Family) -> PeerAddr | None:
        ip = self._reach.get(family)
        if ip is None or not self._live.has(port, family):
            return None
        return PeerAddr(TransportAddr(ip, port))


class WorkerCore(TurnServer):
    """A core whose allocations get datagrams of other workers' allocations from the address
    those are bound to (see `Siblings`) while clients know them by the public address (behind
    1:1 NAT, or bound to the wildcard): the source is put back to the public address, so that
    permissions and Data indications name the relay as the client knows it. Only used when the
    two addresses differ (behind 1:1 NAT, or bound to the wildcard); it costs a method call and a
    byte read per peer datagram."""

    def __init__(
        self,
        config: ServerConfig,
        ports: RelayPorts,
        rng: random.Random | None,
        *,
        quotas: Quotas | None,
        siblings: Siblings,
        live: LivePorts,
        public_of: dict[IPAddress, IPAddress],
    ) -> None:
        super().__init__(config, ports, rng, wall_clock=time.time, quotas=quotas, siblings=siblings)
        self._live = live
        self._public_of = public_of

    def handle_peer_datagram(
        self, data: bytes, relay_port: int, peer: PeerAddr, now: float
    ) -> None:
        super().handle_peer_datagram(data, relay_port, self._as_public(peer), now)

    def peer_path(self, relay_port: int, peer: PeerAddr, now: float) -> ChannelPath | None:
        return super().peer_path(relay_port, self._as_public(peer), now)

    def _as_public(self, peer: PeerAddr) -> PeerAddr:
        # The port first: one byte read, and most peers' ports are no allocation of ours.
        if self._live.has(peer.port, peer.family):
            public = self._public_of.get(peer.ip)
            if public is not None:
                return PeerAddr(TransportAddr(public, peer.port))
        return peer


class SupervisorQuotas:
    """A worker's `Quotas`: the supervisor counts for all workers. The question blocks this
    worker's loop for a round trip, once per Allocate; if the supervisor does not answer, the
    relay is treated as full (fail closed) rather than over its quotas."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        sock.settimeout(QUOTA_TIMEOUT)
        self._sock = sock
        self._broken = False

    def acquire(self, username: str, ip: IPAddress) -> QuotaRefusal | None:
        if self._broken:
            return QuotaRefusal.TOTAL
        question = {"op": "acquire", "user": username, "ip": str(ip)}
        try:
            reply = ask_supervisor(self._sock, question, QUOTA_TIMEOUT)
        except OSError as e:
            # A late answer would be taken for the next question's: stop asking.
            self._broken = True
            log.error("quota service failed; refusing allocations", extra={"error": str(e)})
            return QuotaRefusal.TOTAL
        refusal = reply["refusal"]
        return None if refusal is None else QuotaRefusal(refusal)

    def release(self, username: str, ip: IPAddress) -> None:
        if self._broken:
            return
        try:
            self._send({"op": "release", "user": username, "ip": str(ip)})
        except OSError as e:
            log.warning("quota release not sent", extra={"error": str(e)})

    def _send(self, message: dict[str, str]) -> None:
        self._sock.sendall(json.dumps(message).encode() + b"\n")


class NextHopsProxy:
    """A worker's `NextHopKeeper`: the destinations of its routes go to the supervisor, which
    keeps their next hops in the shared map for all workers (fastpath.nexthop)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock  # the quota channel's socket, blocking: messages are small

    def add(self, ip: IPAddress) -> None:
        self._send("next_hop_add", ip)

    def release(self, ip: IPAddress) -> None:
        self._send("next_hop_release", ip)

    def _send(self, op: str, ip: IPAddress) -> None:
        try:
            self._sock.sendall(json.dumps({"op": op, "ip": str(ip)}).encode() + b"\n")
        except OSError as e:  # the supervisor is gone; Python still relays
            log.warning("next hop not passed on", extra={"ip": str(ip), "error": str(e)})


def ask_supervisor(sock: socket.socket, message: dict[str, Any], timeout: float) -> Any:
    """Send `message` on a worker's channel and wait for its one-line answer (blocking: only
    while the worker's loop has nothing else to do, e.g. while it starts)."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                raise ConnectionError("the supervisor closed the channel")
            reply += chunk
    finally:
        sock.settimeout(previous)
    return json.loads(reply)


def tell_supervisor(sock: socket.socket, message: dict[str, Any], timeout: float) -> None:
    """Send `message` on a worker's channel; no answer comes."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
    finally:
        sock.settimeout(previous)


async def serve_worker(
    index: int,
    quotas: LocalQuotas,
    next_hops: NextHopKeeper | None,
    restarts: Restarts,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """The supervisor's side of worker `index`'s channel: quota questions (answered), next
    hops to keep (not answered), and its part in a restart (see Restarts)."""
    while line := await reader.readline():
        message = json.loads(line)
        op = message["op"]
        if op == "restored":
            restarts.report_restored(index, message, writer)
            continue
        if op == "state":
            restarts.receive_state(index, message)
            continue
        ip = TransportAddr.parse(f"[{message['ip']}]:0").ip
        if op == "acquire":
            refusal = quotas.acquire(message["user"], ip)
            reply = {"refusal": None if refusal is None else refusal.value}
            writer.write(json.dumps(reply).encode() + b"\n")
        elif op == "release":
            quotas.release(message["user"], ip)
        elif next_hops is not None:
            (next_hops.add if op == "next_hop_add" else next_hops.release)(ip)


class SharedFastPath:
    """A worker's handle on the fast path the supervisor loaded: routes go into the shared maps;
    closing, pinning and settling are the supervisor's (a worker's routes are removed as its
    allocations close). `channel`: the worker's channel to the supervisor."""

    def __init__(self, fastpath: FastPath, channel: socket.socket) -> None:
        self._fastpath = fastpath
        self._channel = channel

    @property
    def mode(self) -> str:
        return self._fastpath.mode

    def install(self, route: ChannelRoute) -> None:
        self._fastpath.install(route)

    def remove(self, route: ChannelRoute) -> None:
        self._fastpath.remove(route)

    def allocation_opened(self, flow: ClientFlow, relay_port: int) -> None:
        self._fastpath.allocation_opened(flow, relay_port)

    def allocation_closed(self, flow: ClientFlow, relay_port: int) -> None:
        self._fastpath.allocation_closed(flow, relay_port)

    def permit(self, relay_port: int, peer: IPAddress) -> None:
        self._fastpath.permit(relay_port, peer)

    def unpermit(self, relay_port: int, peer: IPAddress) -> None:
        self._fastpath.unpermit(relay_port, peer)

    def counters(self) -> FastPathCounters:
        return self._fastpath.counters()

    def open_allocation(self, relay_port: int) -> None:
        self._fastpath.open_allocation(relay_port)

    def close_allocation(self, relay_port: int) -> AllocationTraffic:
        return self._fastpath.close_allocation(relay_port)

    def allocation_traffic(self) -> dict[int, AllocationTraffic]:
        return self._fastpath.allocation_traffic()

    @property
    def routes(self) -> int:
        """Channel routes this worker installed."""
        xdp = _xdp(self._fastpath)
        return xdp.routes if xdp is not None else 0

    def problem(self) -> str | None:
        return self._fastpath.problem()

    def settle(self) -> None:
        pass  # the supervisor settles the maps for every worker (WorkerHandover.restored)

    def keep_for_restart(self) -> dict[str, Any] | None:
        """The ports this worker's routes and allocations use: the supervisor pins the maps."""
        xdp = _xdp(self._fastpath)
        return None if xdp is None else {"ports_in_use": sorted(xdp.ports_in_use)}

    def close(self) -> None:
        pass


# Restarts (--state-dir)


class WorkerHandover:
    """A worker's `restart.Handover`: its share of the saved state comes from the supervisor
    (dealt out before the fork), and its state goes back to the supervisor, which writes the
    one state file for all workers. `elsewhere`: the other workers' shares' flows."""

    def __init__(
        self,
        share: restart.SavedRelay | None,
        elsewhere: frozenset[ClientFlow],
        fastpath: FastPath,
        channel: socket.socket,
    ) -> None:
        self._share = share
        self._elsewhere = elsewhere
        self._fastpath = fastpath
        self._channel = channel

    def saved(self) -> restart.SavedRelay | None:
        return self._share

    def restored(self, allocations: int) -> None:
        """Tell the supervisor (with the map entries this worker needs, when the maps were
        adopted), and wait until every worker has: the supervisor then settles the maps for
        all and removes the state file. Nothing is read meanwhile, so no route is installed
        that the supervisor does not know of, and by the time any worker reads its listeners
        every restored client's connected socket is open."""
        self._share = None
        xdp = _xdp(self._fastpath)
        kept = xdp.kept_entries().to_plain() if xdp is not None and xdp.adopted else None
        message = {"op": "restored", "allocations": allocations, "kept": kept}
        try:
            ask_supervisor(self._channel, message, START_TIMEOUT)
        except (OSError, ValueError) as e:
            log.error("the supervisor did not confirm the restore", extra={"error": str(e)})

    def elsewhere(self) -> frozenset[ClientFlow]:
        return self._elsewhere

    def keep(self, core: CoreState, fastpath: dict[str, Any] | None, wall_now: float) -> str:
        ports = fastpath.get("ports_in_use", []) if fastpath is not None else []
        message = {"op": "state", "core": to_plain(core), "ports_in_use": ports}
        tell_supervisor(self._channel, message, START_TIMEOUT)
        return "the supervisor"

    def abandon(self) -> None:
        pass  # the supervisor pins, and decides


class Restarts:
    """The supervisor's side of --state-dir with workers: the settling of adopted maps at the
    start, the workers' states at a stop for a restart."""

    def __init__(
        self, config: ServeConfig, fastpath: FastPath, saved: restart.SavedRelay | None
    ) -> None:
        self.config = config
        self.saved = saved
        self.kept = False  # the kernel path and the state were kept: do not close the fast path
        self._fastpath = fastpath
        self._restored: dict[int, tuple[int, KeptEntries | None]] = {}
        self._waiting: list[asyncio.StreamWriter] = []
        self._reported = asyncio.Event()
        self._states: dict[int, tuple[CoreState, list[int]]] = {}

    def report_restored(
        self, index: int, message: dict[str, Any], writer: asyncio.StreamWriter
    ) -> None:
        """Worker `index` has restored its share: how many allocations it carries on with and,
        when the maps were adopted, the map entries it needs. Answered once every worker has
        (`settle`)."""
        from xdpturn.fastpath.xdp import KeptEntries

        entries = None
        try:
            kept = message["kept"]
            entries = None if kept is None else KeptEntries.from_plain(kept)
        except (KeyError, TypeError, ValueError) as e:
            log.error("malformed map entries from a worker", extra={"worker": index, "error": e})
        self._restored[index] = (int(message.get("allocations", 0)), entries)
        self._waiting.append(writer)
        self._reported.set()

    async def settle(self, workers: Sequence[Worker]) -> None:
        """Once every worker has restored its share (and reported the map entries it needs):
        remove what none of them needs from adopted maps, then let them all run. Not settled
        if a worker exits or does not report in time (the relay is then stopping)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not all(w.index in self._restored for w in workers):
            if any(w.exit_code is not None for w in workers) or loop.time() >= deadline:
                log.error(
                    "not every worker restored its share",
                    extra={"restored": sorted(self._restored), "workers": len(workers)},
                )
                break
            self._reported.clear()
            waits = [loop.create_task(self._reported.wait())]
            waits += [loop.create_task(w.exited.wait()) for w in workers]
            await asyncio.wait(
                waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            for task in waits:
                task.cancel()
        else:
            self._settle_maps()
            self._restored_all()
        for writer in self._waiting:
            writer.write(b'{"restored": true}\n')
        self._waiting.clear()

    def _settle_maps(self) -> None:
        """Adopted maps: remove what no worker's restored allocations need."""
        xdp = _xdp(self._fastpath)
        if xdp is None or not xdp.adopted:
            return
        kept = [k for _, k in self._restored.values() if k is not None]
        if len(kept) != len(self._restored):
            log.error("a worker's map entries are missing; the adopted maps are not settled")
            return
        try:
            xdp.settle_with(kept)
        except OSError as e:
            log.error("settling the adopted maps failed", extra={"error": str(e)})

    def _restored_all(self) -> None:
        """Every worker carries on with its share: the state file is spent."""
        assert self.saved is not None and self.config.state_dir is not None
        (self.config.state_dir / restart.STATE_FILE).unlink(missing_ok=True)
        log.info(
            "restored",
            extra={
                "allocations": sum(count for count, _ in self._restored.values()),
                "workers": len(self._restored),
                "stopped_for": round(time.time() - self.saved.saved_at, 3),
            },
        )

    def receive_state(self, index: int, message: dict[str, Any]) -> None:
        try:
            core = from_plain(message["core"])
            ports = [int(p) for p in message["ports_in_use"]]
        except (KeyError, TypeError, ValueError) as e:  # StateError is a ValueError
            log.error("malformed state from a worker", extra={"worker": index, "error": str(e)})
            return
        self._states[index] = (core, ports)

    async def keep(self, workers: Sequence[Worker]) -> None:
        """After a stop for a restart (every worker has exited): pin the program and maps and
        write one state file of every worker's allocations. Nothing is kept (the relay stops
        for good, the fast path is closed) unless every worker handed its state over."""
        # A worker's state may still be on its way through the channel when its exit is seen.
        channels = [task for w in workers for task in w.channel_tasks]
        if channels:
            await asyncio.wait(channels, timeout=SNAPSHOT_TIMEOUT)
        missing = [w.index for w in workers if w.index not in self._states]
        if missing:
            log.error("workers' states missing; stopping for good", extra={"workers": missing})
            return
        wall_now = time.time()

        def export() -> tuple[CoreState, dict[str, Any] | None]:
            states = [self._states[w.index] for w in workers]
            core = restart.merge([state for state, _ in states])
            xdp = _xdp(self._fastpath)
            if xdp is None:
                return core, self._fastpath.keep_for_restart()
            return core, xdp.keep_for_restart(p for _, ports in states for p in ports)

        self.kept = restart.keep(restart.StateFile(self.config), export, wall_now)


# Snapshots: what a worker tells the supervisor for --metrics and /status


@dataclass
class WorkerSnapshot:
    worker: int
    pid: int
    running: bool = False
    draining: bool = False
    allocations: list[AllocationInfo] = field(default_factory=list)
    core_stats: CoreStats = field(default_factory=CoreStats)
    runtime_stats: Counter[str] = field(default_factory=Counter)
    relay_ports: int = 0
    receive_queue_drops: ReceiveQueueDrops = field(default_factory=ReceiveQueueDrops)
    # Per-user totals of the worker's closed allocations and their bytes (server.metering).
    closed_users: dict[str, AllocationTraffic] = field(default_factory=dict)
    closed_bytes: int = 0
    throughput_bps: float | None = None
    fastpath_routes: int = 0


def take_snapshot(index: int, server: RelayServer) -> WorkerSnapshot:
    snapshot = WorkerSnapshot(index, os.getpid(), runtime_stats=Counter(server.stats))
    if not server.running:
        return snapshot
    core = server.core
    snapshot.running = True
    snapshot.draining = bool(getattr(core, "draining", False))
    snapshot.allocations = server.allocations()
    snapshot.core_stats = core.stats  # copied as it is pickled
    snapshot.relay_ports = server.relay_port_count
    snapshot.receive_queue_drops = server.receive_queue_drops()
    fastpath = server.fastpath
    snapshot.fastpath_routes = fastpath.routes if isinstance(fastpath, SharedFastPath) else 0
    snapshot.closed_users, snapshot.closed_bytes = server.metering.closed_totals()
    snapshot.throughput_bps = server.throughput_bps
    return snapshot


async def answer_snapshots(index: int, server: RelayServer, sock: socket.socket) -> None:
    """The worker's side of its control channel: a snapshot for every request."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await reader.readexactly(len(SNAPSHOT_REQUEST))
            body = pickle.dumps(take_snapshot(index, server))
            writer.write(LENGTH.pack(len(body)) + body)
            await writer.drain()


@dataclass
class _Stats:
    stats: CoreStats = field(default_factory=CoreStats)


def add_stats(total: CoreStats, more: CoreStats) -> None:
    """Add one worker's core counters to `total`."""
    total.requests.update(more.requests)
    total.errors.update(more.errors)
    total.auth_failures += more.auth_failures
    total.drops.update(more.drops)
    for route, traffic in more.relayed.items():
        total.relayed[route].packets += traffic.packets
        total.relayed[route].bytes += traffic.bytes


class WorkerPool:
    """The supervisor's view of its workers, read by --metrics and /status like a RelayServer:
    sums of the snapshots taken by the last `refresh()`; the fast path is the supervisor's own
    (its counters are the kernel's, for all workers at once)."""

    def __init__(
        self,
        config: ServeConfig,
        fastpath: FastPath,
        listen_addresses: list[TransportAddr],
        workers: Sequence[Worker],
    ) -> None:
        self.config = config
        self.stats: Counter[str] = Counter()
        self.workers = list(workers)
        self.snapshots: dict[int, WorkerSnapshot] = {}
        self._fastpath = fastpath
        self._listen = listen_addresses
        self._core = _Stats()
        self.metering = Metering()  # the workers' closed allocations, summed
        self.throughput_bps: float | None = None
        self.fastpath_routes = 0  # read by the fast path's health check, on its own thread

    async def refresh(self) -> None:
        live = [w for w in self.workers if w.exit_code is None]
        taken = await asyncio.gather(*(w.snapshot() for w in live))
        for worker, snapshot in zip(live, taken, strict=True):
            if snapshot is not None:
                self.snapshots[worker.index] = snapshot
        for worker in self.workers:
            if worker.exit_code is not None:
                self.snapshots.pop(worker.index, None)
        self._sum()

    def _sum(self) -> None:
        core = CoreStats()
        runtime: Counter[str] = Counter()
        metering = Metering()
        rates: list[float] = []
        for snapshot in self.snapshots.values():
            add_stats(core, snapshot.core_stats)
            runtime.update(snapshot.runtime_stats)
            metering.add_closed(snapshot.closed_users, snapshot.closed_bytes)
            if snapshot.throughput_bps is not None:
                rates.append(snapshot.throughput_bps)
        self._core.stats = core
        self.stats = runtime
        self.metering = metering
        self.throughput_bps = sum(rates) if rates else None
        self.fastpath_routes = sum(s.fastpath_routes for s in self.snapshots.values())

    @property
    def running(self) -> bool:
        return len(self.snapshots) == len(self.workers) and all(
            s.running for s in self.snapshots.values()
        )

    @property
    def fastpath(self) -> FastPath:
        return self._fastpath

    @property
    def core(self) -> _Stats:
        return self._core

    @property
    def listen_addresses(self) -> list[TransportAddr]:
        return list(self._listen)

    @property
    def relay_port_count(self) -> int:
        return sum(s.relay_ports for s in self.snapshots.values())

    def receive_queue_drops(self) -> ReceiveQueueDrops:
        """Summed over the workers: each has its own listeners and sockets."""
        drops = [s.receive_queue_drops for s in self.snapshots.values()]
        return ReceiveQueueDrops(
            listener=sum(d.listener for d in drops),
            client=sum(d.client for d in drops),
            relay=sum(d.relay for d in drops),
        )

    def allocations(self) -> list[AllocationInfo]:
        return [a for s in self.snapshots.values() for a in s.allocations]

    def metered_allocations(self) -> list[MeteredAllocation]:
        """Every worker's allocations: Python's counts from the snapshots, the kernel's read from
        the shared maps now."""
        return self.metering.allocations(self.allocations(), self._fastpath)

    def now(self) -> float:
        """The workers' cores' clock: CLOCK_MONOTONIC is one clock for every process."""
        return time.monotonic()

    def summary(self) -> list[dict[str, Any]]:
        """One row per worker for /status: how evenly clients spread over them."""
        rows = []
        for worker in self.workers:
            snapshot = self.snapshots.get(worker.index)
            stats = snapshot.core_stats if snapshot is not None else CoreStats()
            rows.append(
                {
                    "worker": worker.index,
                    "pid": worker.pid,
                    "running": snapshot is not None and snapshot.running,
                    "allocations": len(snapshot.allocations) if snapshot is not None else 0,
                    "requests": request_counts(stats),
                    "errors": {f"{m}:{code}": n for (m, code), n in error_counts(stats).items()},
                    "python_packets": sum(t.packets for t in stats.relayed.values()),
                }
            )
        return rows


class PoolDrainer(Drainer):
    """Draining every worker: each drains as a single relay does (SIGTERM), and exits when its
    allocations are gone or at its --drain-timeout; the supervisor follows the last one."""

    def __init__(self, pool: WorkerPool, *, timeout: float) -> None:
        super().__init__(pool, alternate=pool.config.alternate_server, timeout=timeout)
        self.pool = pool

    def start(self, reason: str) -> bool:
        if self._deadline is not None:
            return False
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.timeout
        self.reason = reason
        for worker in self.pool.workers:
            worker.signal(signal.SIGTERM)
        self._task = loop.create_task(self._confirm(reason))
        return True

    async def _confirm(self, reason: str) -> None:
        """Log "draining" once every worker refuses new allocations (or START_TIMEOUT)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            await self.pool.refresh()
            snapshots = self.pool.snapshots.values()
            if all(s.draining or not s.running for s in snapshots):
                break
            await asyncio.sleep(START_POLL)
        log.info(
            "draining",
            extra={
                "reason": reason,
                "allocations": len(self.pool.allocations()),
                "timeout": self.timeout,
                "workers": len(self.pool.workers),
            },
        )


class PoolOpsServer(OpsServer):
    """--metrics for the workers: each request is answered from fresh snapshots, and /status
    also lists the workers."""

    def __init__(self, pool: WorkerPool, drainer: Drainer, address: TransportAddr) -> None:
        super().__init__(pool, drainer, address)
        self.pool = pool

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.pool.refresh()
        await super()._handle(reader, writer)

    def respond(self, method: str, target: str, peer: object) -> Response:
        response = super().respond(method, target, peer)
        status, ctype, body, headers = response
        if urlsplit(target).path == "/status" and status is HTTPStatus.OK:
            value = json.loads(body)
            value["workers"] = self.pool.summary()
            body = json.dumps(value).encode() + b"\n"
        return status, ctype, body, headers


# Processes


@dataclass
class WorkerSockets:
    """What one worker gets from the supervisor: its listening sockets, its ends of the
    control, quota and reservation channels."""

    udp: list[socket.socket]
    streams: list[socket.socket]
    control: socket.socket
    quotas: socket.socket
    reservations: socket.socket

    def close(self) -> None:
        for sock in [*self.udp, *self.streams, self.control, self.quotas, self.reservations]:
            sock.close()


class Worker:
    """The supervisor's handle on one worker process."""

    def __init__(self, index: int, pid: int, control: socket.socket, quotas: socket.socket):
        self.index = index
        self.pid = pid
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self._control_sock = control
        self._quota_sock = quotas
        self._control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._quotas: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def attach(
        self, quotas: LocalQuotas, next_hops: NextHopKeeper | None, restarts: Restarts
    ) -> None:
        """Watch the process, open the control channel, serve its quota, next-hop and restart
        messages."""
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(self.pid)
        loop.add_reader(pidfd, self._reap, pidfd)
        self._control = await asyncio.open_unix_connection(sock=self._control_sock)
        self._quotas = await asyncio.open_unix_connection(
            sock=self._quota_sock, limit=MESSAGE_LIMIT
        )
        self._tasks.append(
            loop.create_task(serve_worker(self.index, quotas, next_hops, restarts, *self._quotas))
        )

    @property
    def channel_tasks(self) -> list[asyncio.Task[None]]:
        """What serves the worker's channel; done once the worker's end has closed."""
        return list(self._tasks)

    def _reap(self, pidfd: int) -> None:
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(self.pid, 0)
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.exited.set()

    def signal(self, sig: signal.Signals) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def snapshot(self) -> WorkerSnapshot | None:
        if self._control is None or self.exit_code is not None:
            return None
        reader, writer = self._control
        async with self._lock:
            try:
                async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                    writer.write(SNAPSHOT_REQUEST)
                    await writer.drain()
                    (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                    snapshot: WorkerSnapshot = pickle.loads(await reader.readexactly(size))
                    return snapshot
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
                log.warning("no snapshot from worker", extra={"worker": self.index, "error": e})
                # A late answer would be taken for the next request's: ask no more.
                writer.close()
                self._control = None
                return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for channel in (self._control, self._quotas):
            if channel is not None:
                channel[1].close()
        self._control_sock.close()
        self._quota_sock.close()


Listeners = tuple[list[socket.socket], list[socket.socket]]  # UDP; TCP and TLS


def bind_worker_listeners(config: ServeConfig, count: int) -> list[Listeners]:
    """For each worker, its UDP and its TCP/TLS listening sockets: one group per address, all
    with SO_REUSEPORT. The first worker's binds resolve port 0; the others join those ports.
    Raises StartError naming the option when an address cannot be bound."""
    groups: list[Listeners] = []
    receive_buffer = receive_buffer_for(config.receive_queue_delay / 1000)
    udp_addrs: list[TransportAddr] = list(config.listen)
    wanted = [(Transport.TCP, a) for a in config.listen_tcp]
    wanted += [(Transport.TLS, a) for a in config.listen_tls]
    try:
        for _ in range(count):
            udp = bind_udp_listeners(udp_addrs, receive_buffer)
            udp_addrs = [bound_address(s) for s in udp]  # the rest join exactly these
            streams: list[socket.socket] = []
            groups.append((udp, streams))
            for index, (kind, addr) in enumerate(wanted):
                try:
                    streams.append(open_tcp_listener(addr, reuse_port=True))
                except OSError as e:
                    raise StartError(
                        f"--listen-{kind.value}: cannot bind {addr}: {e.strerror or e}"
                    ) from e
                wanted[index] = (kind, bound_address(streams[-1]))
    except BaseException:
        for udp, streams in groups:
            for sock in [*udp, *streams]:
                sock.close()
        raise
    return groups


def _xdp(fastpath: FastPath) -> XdpFastPath | None:
    """The XDP fast path, if that is what runs (imported only then: it loads libbpf)."""
    if isinstance(fastpath, NullFastPath):
        return None
    from xdpturn.fastpath.xdp import XdpFastPath

    return fastpath if isinstance(fastpath, XdpFastPath) else None


def _die_with_parent(supervisor: int) -> None:
    # If the supervisor is killed outright, its workers stop (SIGINT: close allocations, remove
    # their routes) instead of relaying on unsupervised.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:  # it died before the line above
        os.kill(os.getpid(), signal.SIGINT)


def _tag_logs(index: int) -> None:
    def add_worker(record: logging.LogRecord) -> bool:
        record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add_worker)


def make_core_factory(
    config: ServeConfig, index: int, nonce_key: bytes, live: LivePorts, quotas: Quotas | None
) -> CoreFactory:
    reach = sibling_addresses(config)
    siblings = Siblings(live, reach)
    public_of: dict[IPAddress, IPAddress] = {}
    for family, ip in reach.items():
        public = config.relay_addresses.get(family)
        if public is not None and public != ip:
            public_of[ip] = public

    def factory(server: ServerConfig, ports: RelayPorts, rng: random.Random | None) -> Core:
        server = replace(server, nonce_key=nonce_key, worker=index)
        if public_of:
            return WorkerCore(
                server,
                ports,
                rng,
                quotas=quotas,
                siblings=siblings,
                live=live,
                public_of=public_of,
            )
        return TurnServer(
            server, ports, rng, wall_clock=time.time, quotas=quotas, siblings=siblings
        )

    return factory


def _worker_main(
    supervisor: int,
    index: int,
    config: ServeConfig,
    sockets: WorkerSockets,
    fastpath: FastPath,
    nonce_key: bytes,
    live: LivePorts,
    quotas_limited: bool,
    shares: list[restart.SavedRelay | None],
) -> int:
    _die_with_parent(supervisor)
    _tag_logs(index)
    xdp = _xdp(fastpath)
    if xdp is not None:
        xdp.keep_next_hops_with(NextHopsProxy(sockets.quotas))
    quotas = SupervisorQuotas(sockets.quotas) if quotas_limited else None
    reservations = ReservationChannel(sockets.reservations)
    handover = None
    if config.state_dir is not None:
        share = shares[index]
        elsewhere = frozenset(
            allocation.flow
            for other, part in enumerate(shares)
            if other != index and part is not None
            for allocation in part.core.allocations
        )
        handover = WorkerHandover(share, elsewhere, fastpath, sockets.quotas)
    server = RelayServer(
        config,
        core_factory=make_core_factory(config, index, nonce_key, live, quotas),
        fastpath=SharedFastPath(fastpath, sockets.quotas),
        listeners=sockets.udp,
        stream_listeners=sockets.streams,
        reservations=reservations,
        handover=handover,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        control = loop.create_task(answer_snapshots(index, server, sockets.control))
        reservations.start(server)
        try:
            await serve(config, server)
        finally:
            reservations.close()
            control.cancel()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(main())
    except (StartError, StreamBindError) as e:
        log.error("worker cannot start", extra={"error": str(e)})
        return 1
    return 0


def run_workers(config: ServeConfig) -> int:
    """`xdpturn serve` with config.workers > 1: bind, fork the workers, supervise them until
    they have all exited; the exit status (0 when every worker exited cleanly). Raises
    StartError/ConfigError when the relay cannot start."""
    # Blocked until the supervisor's loop and each worker's handle them: SIGINT before then
    # would raise KeyboardInterrupt in whichever process is starting (and a worker dying so
    # loses its state at a stop for a restart); a signal sent meanwhile waits. Threads started
    # meanwhile (the next-hop watcher) keep them blocked, so they reach the main thread.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        return _start_and_supervise(config)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def _start_and_supervise(config: ServeConfig) -> int:
    groups = bind_worker_listeners(config, config.workers)
    listen = [bound_address(s) for s in groups[0][0]]
    try:
        saved = restart.load_saved(config) if config.state_dir is not None else None
        fastpath, saved = open_kept_fastpath(config, listen[0].port, saved)
    except BaseException:
        for udp, streams in groups:
            for sock in [*udp, *streams]:
                sock.close()
        raise
    restarts = Restarts(config, fastpath, saved)
    shares: list[restart.SavedRelay | None] = [None] * config.workers
    if saved is not None:
        parts = restart.partition(saved.core, config.workers)
        shares = [restart.SavedRelay(part, None, saved.saved_at) for part in parts]
    # One key for every worker, the saved one after a restart: old nonces stay valid.
    nonce_key = saved.core.nonce_key if saved is not None else os.urandom(16)
    live = LivePorts()
    quotas = LocalQuotas(
        config.max_allocations, config.max_allocations_per_user, config.max_allocations_per_ip
    )
    worker_config = replace(config, metrics=None)
    handles: list[tuple[int, int, socket.socket, socket.socket]] = []
    channels: list[socket.socket] = []  # the supervisor's ends of the reservation channels
    supervisor = os.getpid()
    for index, (udp, streams) in enumerate(groups):
        control, control_peer = socket.socketpair()
        quota, quota_peer = socket.socketpair()
        channel, channel_peer = channel_pair()
        mine = WorkerSockets(udp, streams, control_peer, quota_peer, channel_peer)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                control.close()
                quota.close()
                channel.close()
                for other_udp, other_streams in groups:
                    if other_udp is not udp:
                        for sock in [*other_udp, *other_streams]:
                            sock.close()
                for _, _, sup_control, sup_quota in handles:
                    sup_control.close()
                    sup_quota.close()
                for sup_channel in channels:
                    sup_channel.close()
                code = _worker_main(
                    supervisor,
                    index,
                    worker_config,
                    mine,
                    fastpath,
                    nonce_key,
                    live,
                    quotas.limited,
                    shares,
                )
            except BaseException:
                log.exception("worker failed")
            finally:
                logging.shutdown()
                os._exit(code)
        handles.append((index, pid, control, quota))
        channels.append(channel)
        # The supervisor keeps no listening socket: one it held would get its share of the
        # clients and never read them.
        mine.close()
    try:
        with asyncio.Runner() as runner:
            router = ReservationRouter(channels)
            return runner.run(
                _supervise(config, handles, fastpath, listen, quotas, router, restarts)
            )
    finally:
        if not restarts.kept:  # kept: the program stays attached, its maps pinned
            fastpath.close()


async def _supervise(
    config: ServeConfig,
    handles: list[tuple[int, int, socket.socket, socket.socket]],
    fastpath: FastPath,
    listen: list[TransportAddr],
    quotas: LocalQuotas,
    reservations: ReservationRouter,
    restarts: Restarts,
) -> int:
    loop = asyncio.get_running_loop()
    reservations.start()
    workers = [Worker(*handle) for handle in handles]
    pool = WorkerPool(config, fastpath, listen, workers)
    drainer = PoolDrainer(pool, timeout=config.drain_timeout)
    stopping: list[str] = []

    def stop(reason: str) -> None:
        if not stopping:
            stopping.append(reason)
        for worker in workers:
            worker.signal(signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        if sig is signal.SIGTERM and pool.running and not stopping:
            drainer.start(sig.name)
        elif sig is signal.SIGHUP:
            for worker in workers:
                worker.signal(signal.SIGHUP)
        else:  # SIGINT, or SIGTERM before the workers run: stop now
            stop(sig.name)

    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # blocked since the forks
    ops: PoolOpsServer | None = None
    all_exited = loop.create_task(_all_exited(workers))
    try:
        xdp = _xdp(fastpath)
        next_hops = xdp.next_hops if xdp is not None else None
        if xdp is not None:  # judged by the workers' routes, as of the last snapshots
            xdp.count_routes_with(lambda: pool.fastpath_routes)
        for worker in workers:
            await worker.attach(quotas, next_hops, restarts)
        if restarts.saved is not None:
            await restarts.settle(workers)
        await _wait_running(pool, all_exited)
        if pool.running:
            log.info(
                "listening",
                extra={
                    "listen": [str(a) for a in listen],
                    "workers": len(workers),
                    "fastpath": fastpath.mode,
                    "pids": [w.pid for w in workers],
                },
            )
            if config.metrics is not None:
                ops = PoolOpsServer(pool, drainer, config.metrics)
                await ops.start()
        # Until every worker has exited; one that exits on its own (a crash, or a start that
        # failed) while the others run takes them down with it.
        while not all_exited.done():
            exits = [loop.create_task(w.exited.wait()) for w in workers if w.exit_code is None]
            await asyncio.wait([all_exited, *exits], return_when=asyncio.FIRST_COMPLETED)
            for task in exits:
                task.cancel()
            failed = [w for w in workers if w.exit_code not in (None, 0)]
            unasked = [w for w in workers if w.exit_code == 0] and not drainer.draining
            if (failed or unasked) and not stopping:
                log.error(
                    "worker exited; stopping the others",
                    extra={"workers": {w.index: w.exit_code for w in workers}},
                )
                stop("worker exited")
    except StartError:
        stop("start failed")
        await all_exited
        raise
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
        if ops is not None:
            await ops.stop()
        if not all_exited.done():
            stop("supervisor stopping")
            await asyncio.wait([all_exited], timeout=START_TIMEOUT)
        # SIGINT with --state-dir: a stop for a restart (the workers have exported their states).
        if stopping[:1] == ["SIGINT"] and config.state_dir is not None and all_exited.done():
            await restarts.keep(workers)
        for worker in workers:
            worker.close()
        reservations.close()
    codes = {w.index: w.exit_code for w in workers}
    clean = all(code == 0 for code in codes.values()) and stopping[:1] != ["worker exited"]
    log.info(
        "stopped",
        extra={
            "workers": codes,
            "reason": stopping[0] if stopping else drainer.reason,
            "for_restart": restarts.kept,
        },
    )
    return 0 if clean else 1


async def _all_exited(workers: Sequence[Worker]) -> None:
    for worker in workers:
        await worker.exited.wait()


async def _wait_running(pool: WorkerPool, all_exited: asyncio.Task[None]) -> None:
    """Until every worker runs its relay, a worker has exited, or START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        await pool.refresh()
        if pool.running or any(w.exit_code is not None for w in pool.workers):
            return
        await asyncio.sleep(START_POLL)
    log.error("workers did not start in time", extra={"timeout": START_TIMEOUT})


__all__ = [
    "LivePorts",
    "Siblings",
    "SupervisorQuotas",
    "WorkerPool",
    "WorkerSnapshot",
    "run_workers",
]
