"""The asyncio runtime: real sockets and one timer around the sans-IO `TurnServer`.

Thin on purpose (as aioquic's asyncio layer): every input is fed to the core with the time, the
core's commands are drained at once, and the single timer is re-armed after every state change.
Order of work per readiness event, as in Firezone's relay: feed one datagram, execute all of the
commands it caused, repeat for a bounded batch, then re-arm the timer; the timer fires from the
loop like any other event. Protocol decisions live in the core; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

from xdpturn.config import ServeConfig
from xdpturn.fastpath import FastPath, FastPathMode, NullFastPath, open_fastpath, pinning
from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, PeerAddr, Transport, TransportAddr
from xdpturn.proto.commands import (
    AddPermission,
    AllocationClosed,
    AllocationOpened,
    CloseRelayPort,
    Command,
    FetchReservation,
    InstallChannel,
    OpenRelayPort,
    PortResult,
    RemoveChannel,
    RemovePermission,
    SendToClient,
    SendToPeer,
)
from xdpturn.proto.handover import CoreState, SavedAllocation, SavedReservation
from xdpturn.proto.paths import ChannelPath
from xdpturn.proto.ports import PortChooser
from xdpturn.proto.server import AllocationInfo, RelayPorts, ServerConfig, TurnServer
from xdpturn.proto.stats import CoreStats
from xdpturn.server import restart
from xdpturn.server.budget import ListenerBudget, source_key
from xdpturn.server.clientsockets import ClientSockets, enable_port_sharing
from xdpturn.server.metering import MeteredAllocation, Metering
from xdpturn.server.sockets import (
    MAX_DATAGRAM,
    RelaySockets,
    SockAddr,
    bound_address,
    from_sockaddr,
    open_udp_socket,
    receive_buffer_for,
    receive_drops,
    to_sockaddr,
)
from xdpturn.server.streams import StreamBindError, StreamListeners
from xdpturn.server.traffic import ReceiveQueueDrops

log = logging.getLogger("xdpturn.server")

# Datagrams read per readiness callback before yielding to the loop, so one busy socket cannot
# starve the others or the timer.
BATCH = 64
# The same for a listening socket. Once every client with an allocation reads from its own socket
# (see clientsockets; the event loop reads those for us), a listener carries only newcomers and
# junk; a smaller share per loop iteration bounds what a flood there adds to the allocated
# clients' round trips.
LISTENER_BATCH = 16

# Entries in each of the runtime's address caches (see RelayServer.__init__) before it is
# emptied and refilled: enough for every sender of a busy relay, bounded against a flood of
# spoofed sources (which then costs what it would without the cache).
ADDRESS_CACHE = 65536

# A ChannelData header: channel number, payload length.
_CHANNEL_HEADER = struct.Struct("!HH").pack
# What the runtime keeps per cached path (see RelayServer.__init__): the path, then for
# ChannelData to the peer the relay socket and the peer's sockaddr, for a peer's datagrams to
# the client the listener's index and the client's sockaddr.
_ToPeer = tuple[ChannelPath, socket.socket, SockAddr]
_ToClient = tuple[ChannelPath, int, SockAddr]

# Datagrams read at most from each listener right after restoring (see _sort_queued): far
# more than a listener's receive buffer holds.
QUEUED_AT_RESTORE = 65536

# With --max-bps, how often the relay's rate is measured (reading every allocation's meter).
THROUGHPUT_INTERVAL = 1.0


class Core(Protocol):
    """What the runtime needs of the protocol core; `TurnServer` is the real one."""

    stats: CoreStats

    def handle_client_datagram(self, data: bytes, flow: ClientFlow, now: float) -> None: ...
    def handle_peer_datagram(
        self, data: bytes, relay_port: int, peer: PeerAddr, now: float
    ) -> None: ...
    def channel_path(self, flow: ClientFlow, number: int, now: float) -> ChannelPath | None: ...
    def peer_path(self, relay_port: int, peer: PeerAddr, now: float) -> ChannelPath | None: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_command(self) -> Command | None: ...
    def close(self, now: float) -> None: ...
    def allocations(self) -> list[AllocationInfo]: ...
    def set_throughput(self, bps: float) -> None: ...
    def handle_flow_closed(self, flow: ClientFlow, now: float) -> None: ...
    def handle_relay_port(self, port: int, result: PortResult, now: float) -> None: ...
    def export_state(self, now: float, wall_now: float) -> CoreState: ...
    def restore_state(
        self, state: CoreState, now: float, wall_now: float, listeners: int
    ) -> list[tuple[SavedAllocation, str]]: ...
    def give_up_reservation(self, token: bytes, now: float) -> SavedReservation | None: ...
    def handle_fetched_reservation(
        self, token: bytes, handed: SavedReservation | None, now: float
    ) -> None: ...


class ReservationExchange(Protocol):
    """How a worker process asks the others for a reservation it does not hold
    (xdpturn.server.workers); a single process has none."""

    def fetch(self, token: bytes) -> bool:
        """Ask for the reservation of `token`; the answer comes to
        `RelayServer.reservation_fetched`. False when the question could not be sent."""


CoreFactory = Callable[[ServerConfig, RelayPorts, "random.Random | None"], Core]


def turn_server(config: ServerConfig, ports: RelayPorts, rng: random.Random | None) -> Core:
    return TurnServer(config, ports, rng, wall_clock=time.time)  # for REST credentials' expiry


class StartError(Exception):
    """The relay could not start (e.g. a --listen address cannot be bound)."""


def bind_udp_listeners(addrs: Sequence[TransportAddr], receive_buffer: int) -> list[socket.socket]:
    """UDP sockets bound to the --listen `addrs`, open to port sharing (the connected client
    sockets of clientsockets, and the other workers' listeners); raises StartError."""
    socks: list[socket.socket] = []
    skipped: list[str] = []
    for addr in addrs:
        try:
            socks.append(open_udp_socket(addr, receive_buffer, before_bind=enable_port_sharing))
        except OSError as e:
            # A wildcard listener of a family the host lacks (IPv6 disabled, as in many
            # containers) is skipped, so the default `--listen` works there.
            no_family = e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)
            if addr.ip.is_unspecified and no_family:
                skipped.append(str(addr))
                continue
            for sock in socks:
                sock.close()
            raise StartError(f"--listen: cannot bind {addr}: {e.strerror or e}") from e
    if not socks:
        raise StartError(f"--listen: cannot bind any of {', '.join(skipped)}")
    for addr_text in skipped:
        log.warning("address family not available, not listening", extra={"listen": addr_text})
    return socks


def open_kept_fastpath(
    config: ServeConfig, turn_port: int, saved: restart.SavedRelay | None
) -> tuple[FastPath, restart.SavedRelay | None]:
    """The fast path, adopting what `saved` pinned; and `saved`, or None when it cannot be
    taken over after all (then the relay starts clean). Raises StartError when the configured
    object cannot take over the running program."""
    settings = replace(config.fastpath_settings, turn_port=turn_port)
    handover = saved.fastpath if saved is not None else None
    if handover is not None and config.fastpath is FastPathMode.OFF:
        # The previous process had a kernel path, this one is told to run without.
        restart.discard_pins(config)
        handover = None
    if config.fastpath is FastPathMode.OFF:
        return NullFastPath(), saved
    if settings.pin_dir is not None:
        try:
            pinning.ensure_bpffs(config.bpffs)
        except OSError as e:
            log.warning("the kernel path cannot be kept over restarts: %s", e)
    if handover is not None:
        try:
            return open_fastpath(settings, handover), saved
        except pinning.LayoutMismatch as e:
            raise StartError(
                f"--bpf-object: cannot take over the running XDP program: {e}. It keeps "
                "relaying; to replace it and drop the saved state, run `xdpturn detach "
                f"--state-dir {config.state_dir}` first"
            ) from e
        except pinning.AdoptError as e:
            restart.start_clean(config, str(e))
            saved = None
    try:
        return open_fastpath(settings), saved
    except Exception:
        # open_fastpath reports its own failures by returning NullFastPath; this is a bug
        # there, and Python still relays everything correctly.
        log.exception("fast path failed to open; relaying in Python only")
        return NullFastPath(), saved


class RelayServer:
    """Runs one TURN relay on the running event loop.

    `await start()` binds the listeners (raising StartError), `await stop()` closes
    every allocation, tells the fast path, and closes all sockets. `listen_addresses` are the
    addresses actually bound (port 0 in the config becomes the port the kernel chose).
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        core_factory: CoreFactory = turn_server,
        fastpath: FastPath | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        listeners: Sequence[socket.socket] = (),
        stream_listeners: Sequence[socket.socket] = (),
        reservations: ReservationExchange | None = None,
        handover: restart.Handover | None = None,
    ) -> None:
        """`listeners`/`stream_listeners`: sockets already bound to the --listen and then the
        --listen-tcp and --listen-tls addresses, used instead of binding them (a worker gets
        its own from the supervisor, see xdpturn.server.workers). `reservations`: where the
        core's FetchReservation goes (a worker's channel to the other workers). `handover`:
        where the state of a restart comes from and goes to (default with --state-dir: the
        state file)."""
        self.config = config
        if handover is None and config.state_dir is not None:
            handover = restart.StateFile(config)
        self._handover = handover
        self.stats: Counter[str] = Counter()  # the runtime's own: send errors, drops
        self.metering = Metering()  # traffic per allocation and user, both paths
        # TURN over TCP/TLS (--listen-tcp, --listen-tls); flows of theirs are sent through it.
        self.streams = StreamListeners(self.stats, self._on_stream_frames, self._on_stream_closed)
        self._core_factory = core_factory
        self._fastpath = fastpath
        self._rng = rng
        self._clock = clock
        self._listeners: list[socket.socket] = []
        self._bound = list(listeners)
        self._bound_streams = list(stream_listeners)
        self._reservations = reservations
        # Each UDP client with an allocation gets its own connected socket on the listening port
        # (see clientsockets), so a flood on the listener does not bury its datagrams.
        self._client_sockets: ClientSockets | None = None
        # How much the listeners may take of the process (see budget), and the timers of
        # listeners not read meanwhile.
        self._budget = ListenerBudget(config.guard)
        self._paused: dict[int, asyncio.TimerHandle] = {}
        self._core: Core | None = None
        self._relay_sockets: RelaySockets | None = None
        self._receive_buffer = receive_buffer_for(config.receive_queue_delay / 1000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._state = "new"
        # Per-datagram conversions, done once per address instead: the address recvfrom()
        # returned -> the core's ClientFlow (one dict per listener) or PeerAddr, and a
        # TransportAddr -> what sendto() takes. Besides the parsing, the same objects coming back
        # make the core's lookups identity hits with hashes computed once.
        self._client_flows: list[dict[Any, ClientFlow]] = []
        self._peer_addrs: dict[Any, PeerAddr] = {}
        self._sockaddrs: dict[TransportAddr, SockAddr] = {}
        # Bound channels relayed without the core (see xdpturn.proto.paths): per listener, the
        # address recvfrom() returned and the channel number -> (path, relay socket, peer's
        # sockaddr); and (relay port, peer's address from recvfrom()) -> (path, listener, client's
        # sockaddr). A path the core revoked or that expired is asked for again.
        self._client_paths: list[dict[tuple[Any, int], _ToPeer]] = []
        self._peer_paths: dict[tuple[int, Any], _ToClient] = {}
        self._throughput_timer: asyncio.TimerHandle | None = None
        self._throughput_sample: tuple[float, int] | None = None  # (when, total bytes)
        # With --max-bps: the relayed payload rate (bits/s) last measured; else None.
        self.throughput_bps: float | None = None

    # Life cycle

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"RelayServer.start() called when {self._state}")
        self._loop = loop = asyncio.get_running_loop()
        self._state = "starting"
        try:
            self._listeners = self._bound or bind_udp_listeners(
                self.config.listen, self._receive_buffer
            )
            self._client_flows = [{} for _ in self._listeners]
            self._client_paths = [{} for _ in self._listeners]
            self._client_sockets = ClientSockets(
                loop,
                self._listeners,
                self._on_client_socket_datagram,
                self.stats,
                self._receive_buffer,
            )
            self._relay_sockets = RelaySockets(
                loop, self.config.relay_binds, self._on_peer_readable, self._receive_buffer
            )
            # Relay ports are chosen unpredictably (RFC 8656 section 7.2), so from the system's
            # randomness unless a test fixes it.
            chooser = PortChooser(self.config.ports, self._rng or random.SystemRandom())
            self._core = self._core_factory(self.config.server, chooser, self._rng)
            try:
                await self.streams.start(self.config, self._bound_streams)
            except StreamBindError as e:
                raise StartError(str(e)) from e
            handover = self._handover
            saved = handover.saved() if handover is not None else None
            if self._fastpath is None:
                turn_port = bound_address(self._listeners[0]).port
                self._fastpath, saved = open_kept_fastpath(self.config, turn_port, saved)
            elif saved is not None and saved.fastpath is not None:
                # A fast path was given: the pinned one is not wanted.
                restart.discard_pins(self.config)
            if saved is not None:
                self._restore(saved)
        except BaseException:
            self._close_sockets()
            self._state = "stopped"
            raise
        for index, sock in enumerate(self._listeners):
            self._read_listener(sock, index)
        self._state = "running"
        if self.config.max_bps is not None:
            self._measure_throughput()
        server = self.config.server
        log.info(
            "listening",
            extra={
                "listen": [str(a) for a in self.listen_addresses],
                "public_ipv4": server.public_ipv4,
                "public_ipv6": server.public_ipv6,
                "relay_ports": str(self.config.ports),
                "realm": self.config.realm,
                "fastpath": self._fastpath.mode,
                "event_loop": type(loop).__module__.split(".")[0],
            },
        )
        self._arm_timer()

    # Restarts (--state-dir)

    def _restore(self, saved: restart.SavedRelay) -> None:
        """Carry on with the saved allocations; the saved state is then spent."""
        assert self._core is not None and self._handover is not None
        wall_now = time.time()
        skipped = self._core.restore_state(
            saved.core, self._clock(), wall_now, len(self._listeners)
        )
        self._drain()  # opens their ports again, their records, and installs their routes
        self.fastpath.settle()
        self._handover.restored(len(self._core.allocations()))
        elsewhere = self._handover.elsewhere()
        if elsewhere:
            self._sort_queued(elsewhere)
        log.info(
            "restored",
            extra={
                # Those whose port could not be opened again are closed by now.
                "allocations": len(self._core.allocations()),
                "skipped": dict(Counter(reason for _, reason in skipped)),
                "stopped_for": round(wall_now - saved.saved_at, 3),
            },
        )

    def _sort_queued(self, elsewhere: frozenset[ClientFlow]) -> None:
        """What queued on the listeners while the workers restored their shares: datagrams of
        allocations another worker carries on are dropped rather than answered 437 here
        (their client retransmits a request, and its connected socket, open by now, takes the
        retransmission to that worker); the rest are handled as usual."""
        for listener, sock in enumerate(self._listeners):
            for _ in range(QUEUED_AT_RESTORE):
                try:
                    data, addr = sock.recvfrom(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    self._count_error("client_receive_errors", e)
                    break
                flow = ClientFlow(ClientAddr(from_sockaddr(addr[0], addr[1])), listener)
                if flow in elsewhere:
                    self.stats["listener_restored_elsewhere"] += 1
                    continue
                self._client_datagram(data, addr, listener)

    async def stop(self, *, for_restart: bool = False) -> None:
        """Stop: close every allocation and detach the fast path; or, `for_restart` with a
        --state-dir, leave the kernel path running and save the state for the next process."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopping"
        assert self._core is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._throughput_timer is not None:
            self._throughput_timer.cancel()
            self._throughput_timer = None
        kept = for_restart and self._handover is not None and self._keep_for_restart()
        if not kept:
            try:
                self._core.close(self._clock())
            except Exception:
                log.exception("core failed to close")
            self._drain()
            if self._fastpath is not None:
                try:
                    self._fastpath.close()
                except Exception:
                    log.exception("fast path failed to close")
        self._close_sockets()
        self._state = "stopped"
        log.info("stopped", extra={"stats": dict(self.stats), "for_restart": kept})

    def _keep_for_restart(self) -> bool:
        """Pin the kernel path and hand the state over; False (having undone any of it) if that
        fails, and the relay then stops for good."""
        core, handover = self._core, self._handover
        assert core is not None and handover is not None
        wall_now = time.time()

        def export() -> tuple[CoreState, dict[str, Any] | None]:
            return core.export_state(self._clock(), wall_now), self.fastpath.keep_for_restart()

        return restart.keep(handover, export, wall_now)

    def _close_sockets(self) -> None:
        for handle in self._paused.values():
            handle.cancel()
        self._paused.clear()
        if self._client_sockets is not None:
            self._client_sockets.close_all()
        for sock in self._listeners:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        if self._relay_sockets is not None:
            self._relay_sockets.close_all()
        self.streams.close()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # What callers may look at

    @property
    def listen_addresses(self) -> list[TransportAddr]:
        return [bound_address(s) for s in self._listeners if s.fileno() >= 0]

    @property
    def core(self) -> Core:
        if self._core is None:
            raise RuntimeError("RelayServer not started")
        return self._core

    @property
    def fastpath(self) -> FastPath:
        return self._fastpath if self._fastpath is not None else NullFastPath()

    def now(self) -> float:
        """The core's clock (monotonic): what allocation expiry times are measured on."""
        return self._clock()

    @property
    def running(self) -> bool:
        return self._state == "running"

    def allocations(self) -> list[AllocationInfo]:
        return self.core.allocations()

    def receive_queue_drops(self) -> ReceiveQueueDrops:
        """Datagrams the kernel dropped because a socket's receive queue was full (see
        --receive-queue-delay). Read from the sockets when asked: nothing per datagram."""
        relay, clients = self._relay_sockets, self._client_sockets
        return ReceiveQueueDrops(
            listener=sum(receive_drops(s) for s in self._listeners if s.fileno() >= 0),
            client=clients.receive_drops() if clients is not None else 0,
            relay=relay.receive_drops() if relay is not None else 0,
        )

    def metered_allocations(self) -> list[MeteredAllocation]:
        """Open allocations with their traffic on both paths (reads the kernel's meters)."""
        return self.metering.allocations(self.core.allocations(), self.fastpath)

    def _measure_throughput(self) -> None:
        """--max-bps: the relay's rate of relayed payload since the last sample, to the core."""
        assert self._loop is not None
        self._throughput_timer = self._loop.call_later(
            THROUGHPUT_INTERVAL, self._measure_throughput
        )
        try:
            total = self.metering.total_bytes(self.metered_allocations())
        except Exception:
            log.exception("measuring the relay's rate failed")
            return
        now = time.monotonic()
        if self._throughput_sample is not None:
            then, before = self._throughput_sample
            if now > then:
                self.throughput_bps = 8 * (total - before) / (now - then)
                self.core.set_throughput(self.throughput_bps)
        self._throughput_sample = (now, total)

    @property
    def client_socket_count(self) -> int:
        """Connected sockets of UDP clients with an allocation (see clientsockets)."""
        return len(self._client_sockets) if self._client_sockets is not None else 0

    @property
    def relay_port_count(self) -> int:
        """Allocation ports currently bound (a leak shows here after allocations close)."""
        return len(self._relay_sockets) if self._relay_sockets is not None else 0

    # Inputs

    def _read_listener(self, sock: socket.socket, listener: int) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_listener_readable, sock, listener)

    def _on_listener_readable(self, sock: socket.socket, listener: int) -> None:
        """A listener: newcomers and junk, read within the budget (see budget)."""
        budget, deliver, recvfrom = self._budget, self._client_datagram, sock.recvfrom
        relay = self._relay_channel_data
        now = time.monotonic()
        for _ in range(LISTENER_BATCH):
            if not budget.total.take(now):
                self._pause_listener(sock, listener, budget.total.wait(now))
                break
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._count_error("client_receive_errors", e)
                break
            if addr not in budget.allocated and not budget.source_allows(source_key(addr[0]), now):
                self.stats["listener_source_limited"] += 1
                continue
            if not relay(data, addr, listener):
                deliver(data, addr, listener)
        self._arm_timer()

    def _on_client_socket_datagram(self, data: bytes, addr: Any, listener: int) -> None:
        """A datagram from a client with an allocation, on its own socket (clientsockets)."""
        if not self._relay_channel_data(data, addr, listener):
            self._client_datagram(data, addr, listener)
            self._arm_timer()

    def _relay_channel_data(self, data: bytes, addr: Any, listener: int) -> bool:
        """ChannelData on a bound channel, relayed on its path without the core; False (nothing
        done) for anything else, which the core is to handle."""
        if len(data) < 4 or data[0] & 0xC0 != 0x40:  # is_channel_data, inlined
            return False
        now = self._clock()
        key = (addr, data[0] << 8 | data[1])
        route = self._client_paths[listener].get(key)
        if route is None or route[0].until <= now:
            route = self._find_peer_route(key, listener, now)
            if route is None:
                return False
        length = data[2] << 8 | data[3]
        if 4 + length > len(data):  # malformed: the core drops and counts it
            return False
        path, sock, sockaddr = route
        if path.relay(length, now):
            self._sendto(sock, data[4 : 4 + length], sockaddr, "peer", path.peer)
        return True

    def _find_peer_route(self, key: tuple[Any, int], listener: int, now: float) -> _ToPeer | None:
        addr, number = key
        try:
            path = self.core.channel_path(self._client_flow(addr, listener), number, now)
        except Exception:
            self._core_failed("channel path", channel=number)
            return None
        paths = self._client_paths[listener]
        assert self._relay_sockets is not None
        if path is not None:
            sock = self._relay_sockets.socket(path.relay_port, path.peer.family)
            if sock is not None:
                if len(paths) >= ADDRESS_CACHE:
                    paths.clear()
                route = paths[key] = (path, sock, self._sockaddr(path.peer))
                return route
        paths.pop(key, None)  # the core handles it (a port not open: it counts the failure)
        return None

    def _client_flow(self, addr: Any, listener: int) -> ClientFlow:
        flows = self._client_flows[listener]
        flow = flows.get(addr)
        if flow is None:
            if len(flows) >= ADDRESS_CACHE:
                flows.clear()
            client = ClientAddr(from_sockaddr(addr[0], addr[1]))
            flow = flows[addr] = ClientFlow(client, listener)
        return flow

    def _client_datagram(self, data: bytes, addr: Any, listener: int) -> None:
        flow = self._client_flow(addr, listener)
        try:
            self.core.handle_client_datagram(data, flow, self._clock())
        except Exception:
            self._core_failed("client datagram", client=str(flow.client))
        self._drain()

    def _pause_listener(self, sock: socket.socket, listener: int, wait: float) -> None:
        # The relay-wide rate is spent: the kernel drops what overflows the listener's queue
        # meanwhile, and the loop serves the clients' own sockets. Resumed for a whole batch.
        assert self._loop is not None
        self.stats["listener_paused"] += 1
        self._loop.remove_reader(sock.fileno())
        wait += (LISTENER_BATCH - 1) * self._budget.total.interval
        self._paused[listener] = self._loop.call_later(wait, self._resume_listener, sock, listener)

    def _resume_listener(self, sock: socket.socket, listener: int) -> None:
        self._paused.pop(listener, None)
        if self._state == "running" and sock.fileno() >= 0:
            self._read_listener(sock, listener)

    def _on_peer_readable(self, sock: socket.socket, relay_port: int, family: Family) -> None:
        handle, clock, drain = self.core.handle_peer_datagram, self._clock, self._drain
        recvfrom = sock.recvfrom
        routes, listeners, sendto = self._peer_paths, self._listeners, self._sendto
        handled = False  # by the core: its timer may have changed
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._count_error("peer_receive_errors", e)
                break
            now = clock()
            key = (relay_port, addr)
            route = routes.get(key)
            if route is None or route[0].until <= now:
                route = self._find_client_route(key, now)
            if route is not None:  # a bound channel: relayed on its path
                path, listener, sockaddr = route
                if path.relay(len(data), now):
                    frame = _CHANNEL_HEADER(path.channel, len(data)) + data
                    sendto(listeners[listener], frame, sockaddr, "client", path.flow.client)
                continue
            peer = self._peer_addr(addr)
            try:
                handle(data, relay_port, peer, now)
            except Exception:
                self._core_failed("peer datagram", peer=str(peer), relay_port=relay_port)
            drain()
            handled = True
            if sock.fileno() < 0:  # the core released this port while handling the datagram
                break
        if handled:
            self._arm_timer()

    def _peer_addr(self, addr: Any) -> PeerAddr:
        peers = self._peer_addrs
        peer = peers.get(addr)
        if peer is None:
            if len(peers) >= ADDRESS_CACHE:
                peers.clear()
            peer = peers[addr] = PeerAddr(from_sockaddr(addr[0], addr[1]))
        return peer

    def _find_client_route(self, key: tuple[int, Any], now: float) -> _ToClient | None:
        relay_port, addr = key
        try:
            path = self.core.peer_path(relay_port, self._peer_addr(addr), now)
        except Exception:
            self._core_failed("peer path", relay_port=relay_port)
            return None
        routes = self._peer_paths
        if path is None or path.flow.listener >= len(self._listeners):
            routes.pop(key, None)
            return None
        if len(routes) >= ADDRESS_CACHE:
            routes.clear()
        route = routes[key] = (path, path.flow.listener, self._sockaddr(path.flow.client))
        return route

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.core.handle_timer(self._clock())
        except Exception:
            self._core_failed("timer")
        self._drain()
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._state != "running":
            return
        deadline = self.core.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = None
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)

    def _on_stream_frames(self, flow: ClientFlow, frames: list[bytes]) -> None:
        core = self.core
        for frame in frames:
            try:
                core.handle_client_datagram(frame, flow, self._clock())
            except Exception:
                self._core_failed("client message", client=str(flow.client))
            self._drain()
        self._arm_timer()

    def _on_stream_closed(self, flow: ClientFlow) -> None:
        try:
            self.core.handle_flow_closed(flow, self._clock())
        except Exception:
            self._core_failed("connection close", client=str(flow.client))
        self._drain()
        self._arm_timer()

    def reload_tls(self) -> bool:
        """Re-read --tls-cert/--tls-key (SIGHUP): new handshakes use them; allocations and
        open connections are untouched. False when there is no TLS or the files are bad."""
        return self.streams.reload_tls()

    # Reservations across worker processes (see ReservationExchange)

    def give_up_reservation(
        self, token: bytes
    ) -> tuple[SavedReservation, list[socket.socket]] | None:
        """Another worker asks for the reservation of `token`: out of the core, with its
        port's sockets (one per family, in family order), which the caller sends on and then
        closes. None when this worker does not hold it."""
        if self._state != "running" or self._relay_sockets is None:
            return None
        try:
            handed = self.core.give_up_reservation(token, self._clock())
        except Exception:
            self._core_failed("reservation give-up")
            return None
        self._arm_timer()  # its expiry is no longer this worker's
        if handed is None:
            return None
        socks = self._relay_sockets.detach(handed.relay_port)
        if socks.keys() != handed.families:  # its sockets were not open: a bug, logged
            log.error("reserved port without its sockets", extra={"relay_port": handed.relay_port})
            for sock in socks.values():
                sock.close()
            return None
        return handed, [socks[family] for family in sorted(handed.families)]

    def reservation_fetched(
        self,
        token: bytes,
        handed: SavedReservation | None,
        socks: Sequence[socket.socket],
        giver: int | None = None,
    ) -> None:
        """The answer to a FetchReservation: the reservation worker `giver` gave up and its
        port's sockets (in family order), or None and no sockets. The sockets are this
        worker's from now on (closed here when they cannot be taken)."""
        if self._state != "running" or self._relay_sockets is None:
            for sock in socks:
                sock.close()
            return
        if handed is not None and (
            len(socks) != len(handed.families)
            or not self._relay_sockets.adopt(
                handed.relay_port, dict(zip(sorted(handed.families), socks, strict=True))
            )
        ):
            log.warning(
                "reserved port's sockets not taken", extra={"relay_port": handed.relay_port}
            )
            handed = None
        if handed is None:
            for sock in socks:
                sock.close()
        else:
            log.info(
                "reservation taken over",
                extra={"relay_port": handed.relay_port, "from_worker": giver},
            )
        try:
            self.core.handle_fetched_reservation(token, handed, self._clock())
        except Exception:
            self._core_failed("fetched reservation")
        self._drain()
        self._arm_timer()

    def _core_failed(self, what: str, **fields: object) -> None:
        # A bug in the core must not take every other allocation down with it.
        self.stats["core_errors"] += 1
        log.exception("core failed on %s", what, extra=fields)

    # Outputs

    def _drain(self) -> None:
        next_command = self.core.next_command
        while (command := next_command()) is not None:
            # The two commands of every relayed datagram skip _execute's match statement.
            if type(command) is SendToPeer:
                self._send_to_peer(command)
            elif type(command) is SendToClient:
                self._send_to_client(command)
            else:
                self._execute(command)

    def _send_to_peer(self, command: SendToPeer) -> None:
        relay_port, peer, data = command.relay_port, command.peer, command.data
        assert self._relay_sockets is not None
        sock = self._relay_sockets.socket(relay_port, peer.family)
        if sock is None:
            self.stats["peer_send_unroutable"] += 1
            return
        self._send(sock, data, peer, "peer")

    def _send_to_client(self, command: SendToClient) -> None:
        flow, data = command.flow, command.data
        if flow.transport is not Transport.UDP:
            self.streams.send(flow, data)
            return
        if flow.listener >= len(self._listeners):
            self.stats["client_send_unroutable"] += 1
            return
        self._send(self._listeners[flow.listener], data, flow.client, "client")

    def _execute(self, command: Command) -> None:
        """Every command but the sends, which _drain runs itself."""
        match command:
            case OpenRelayPort(relay_port, families, dont_fragment):
                assert self._relay_sockets is not None
                result = self._relay_sockets.open(relay_port, families, dont_fragment)
                self.core.handle_relay_port(relay_port, result, self._clock())
            case CloseRelayPort(relay_port):
                assert self._relay_sockets is not None
                self._relay_sockets.close(relay_port)
            case FetchReservation(token):
                exchange = self._reservations
                if exchange is None or not exchange.fetch(token):
                    self.core.handle_fetched_reservation(token, None, self._clock())
            case InstallChannel(route) | RemoveChannel(route):
                install = isinstance(command, InstallChannel)
                try:
                    (self.fastpath.install if install else self.fastpath.remove)(route)
                except Exception:
                    # The kernel only speeds things up; Python still relays this channel.
                    self.stats["fastpath_errors"] += 1
                    log.exception(
                        "fast path %s failed",
                        "install" if install else "remove",
                        extra={"client": str(route.client), "channel": route.channel},
                    )
            case AddPermission(relay_port, peer) | RemovePermission(relay_port, peer):
                add = isinstance(command, AddPermission)
                self._tell_fastpath(
                    "permit" if add else "unpermit",
                    lambda: (self.fastpath.permit if add else self.fastpath.unpermit)(
                        relay_port, peer
                    ),
                    relay_port=relay_port,
                    peer=str(peer),
                )
            case AllocationOpened(flow, relay_port, families, username, lifetime):
                self._tell_fastpath(
                    "allocation opened",
                    lambda: self.fastpath.allocation_opened(flow, relay_port),
                    relay_port=relay_port,
                )
                self.metering.opened(relay_port, username, self.fastpath)
                if flow.transport is not Transport.UDP:  # exempt from the idle timeout
                    self.streams.allocation_changed(flow, True)
                else:
                    self._budget.exempt(to_sockaddr(flow.client))
                    if self._client_sockets is not None:
                        self._client_sockets.open(flow)
                log.info(
                    "allocation opened",
                    extra={
                        "allocation": allocation_id(flow),
                        "client": str(flow.client),
                        "relay_port": relay_port,
                        "families": sorted(f.name.lower() for f in families),
                        "username": username,
                        "lifetime": lifetime,
                    },
                )
            case AllocationClosed(flow, relay_port, reason, python_traffic):
                self._tell_fastpath(
                    "allocation closed",
                    lambda: self.fastpath.allocation_closed(flow, relay_port),
                    relay_port=relay_port,
                )
                totals = self.metering.closed(relay_port, python_traffic, self.fastpath)
                if flow.transport is not Transport.UDP:  # the idle timeout applies again
                    self.streams.allocation_changed(flow, False)
                else:
                    self._budget.unexempt(to_sockaddr(flow.client))
                    if self._client_sockets is not None:
                        self._client_sockets.close(flow)
                log.info(
                    "allocation closed",
                    extra={
                        "allocation": allocation_id(flow),
                        "client": str(flow.client),
                        "relay_port": relay_port,
                        "reason": reason,
                        "traffic": totals.as_dict(),
                    },
                )

    def _tell_fastpath(self, what: str, call: Callable[[], None], **fields: object) -> None:
        try:
            call()
        except Exception:
            # The kernel only filters and speeds things up; Python still holds the truth.
            self.stats["fastpath_errors"] += 1
            log.exception("fast path: %s failed", what, extra=fields)

    def _send(self, sock: socket.socket, data: bytes, to: TransportAddr, side: str) -> None:
        self._sendto(sock, data, self._sockaddr(to), side, to)

    def _sockaddr(self, addr: TransportAddr) -> SockAddr:
        sockaddrs = self._sockaddrs
        sockaddr = sockaddrs.get(addr)
        if sockaddr is None:
            if len(sockaddrs) >= ADDRESS_CACHE:
                sockaddrs.clear()
            sockaddr = sockaddrs[addr] = to_sockaddr(addr)  # str(ip) costs a microsecond
        return sockaddr

    def _sendto(
        self, sock: socket.socket, data: bytes, sockaddr: SockAddr, side: str, to: TransportAddr
    ) -> None:
        try:
            sock.sendto(data, sockaddr)
        except (BlockingIOError, InterruptedError):
            # The socket's send queue is full: drop, as a router would.
            self.stats[f"{side}_send_dropped"] += 1
        except OSError as e:
            self._count_error(f"{side}_send_errors", e, to=str(to))

    def _count_error(self, counter: str, error: OSError, **fields: object) -> None:
        self.stats[counter] += 1
        log.debug(counter.replace("_", " "), extra={"error": str(error), **fields})


def allocation_id(flow: ClientFlow) -> str:
    """A log-friendly name for an allocation: its 5-tuple, as the client sees it."""
    return f"{flow.transport.value}:{flow.client}#{flow.listener}"


__all__ = [
    "Core",
    "CoreFactory",
    "RelayServer",
    "ReservationExchange",
    "StartError",
    "allocation_id",
    "bind_udp_listeners",
    "open_kept_fastpath",
    "turn_server",
]
