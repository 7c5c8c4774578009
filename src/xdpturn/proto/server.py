"""The TURN server state machine (RFC 8656, UDP relaying), sans-IO.

Inputs: datagrams from clients and from peers, each with `now` (a monotonic clock, seconds),
timer ticks, and the runtime's answers to `OpenRelayPort`. Outputs: commands, pulled with
`next_command()`. Which port an allocation gets is chosen here, by an injected `RelayPorts`
(numbers only: `xdpturn.proto.ports`); the runtime opens and closes the sockets on
`OpenRelayPort`/`CloseRelayPort` and says whether it could (a port another program holds is
skipped). Randomness comes from an injected `random.Random` (tests seed it); without one, the
nonce key and reservation tokens come from the system's CSPRNG, transaction ids from a
`random.Random` (cheap, and unguessable ids are not needed there). One
thing is wall time by definition: the expiry that TURN REST API usernames carry (unix time), read
from the injected `wall_clock` when a request is authenticated, and nowhere else.

Packets to itself: when a client sends to one of the relay's own public addresses and the port
is a live allocation, the datagram is handed to that allocation here, as if it had arrived from
the network, and never becomes a `SendToPeer`. When another worker process of the same relay
holds that port (an injected `SiblingAllocations` says so), it becomes a `SendToPeer` to the
address that worker's socket listens on, and arrives there from a peer.

Reservations across workers: a core that is one of several workers (`ServerConfig.worker`) puts
its index in the first two bytes of its RESERVATION-TOKENs. An Allocate with a token this core
does not hold is held while the runtime fetches the reservation from the worker that does
(`FetchReservation`; that worker's core gives it up with `give_up_reservation`, and the runtime
moves the port's sockets), then answered as a local token would be
(`handle_fetched_reservation`); no answer within FETCH_TIMEOUT is an unknown token.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import ipaddress
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

from xdpturn.proto import stun
from xdpturn.proto.addr import (
    ClientFlow,
    Family,
    IPAddress,
    PeerAddr,
    Transport,
    TransportAddr,
)
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.channel_data import (
    ACCEPTED_CHANNEL_MAX,
    CHANNEL_MIN,
    ChannelDataError,
    encode_channel_data,
    is_channel_data,
    split_channel_data,
)
from xdpturn.proto.commands import (
    AddPermission,
    AllocationClosed,
    AllocationOpened,
    ChannelRoute,
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
from xdpturn.proto.handover import CoreState, SavedAllocation, SavedChannel, SavedReservation
from xdpturn.proto.meter import DEFAULT_BURST_SECONDS, AllocationTraffic, RateSchedule
from xdpturn.proto.paths import ChannelPath
from xdpturn.proto.policy import PeerPolicy
from xdpturn.proto.quotas import LocalQuotas, QuotaRefusal, Quotas
from xdpturn.proto.ratelimit import SourceBuckets
from xdpturn.proto.stats import CoreStats, Drop, Route
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Lifetimes in seconds (RFC 8656 sections 3.2, 9, 12).
DEFAULT_ALLOCATION_LIFETIME = 600
MAX_ALLOCATION_LIFETIME = 3600
PERMISSION_LIFETIME = 300
CHANNEL_LIFETIME = 600
# A channel number and peer stay reserved this long after the binding expires (section 12).
CHANNEL_COOLDOWN = 300
# How long the port after an EVEN-PORT allocation with the R bit is held for its
# RESERVATION-TOKEN: the "at least 30 seconds" of section 7.2, and no longer.
RESERVATION_LIFETIME = 30
# How long an Allocate waits for a reservation another worker holds (FetchReservation) before
# it is answered as for an unknown token; and how many may wait at once.
FETCH_TIMEOUT = 1.0
MAX_FETCHES = 256
NONCE_LIFETIME = 600

UDP_PROTOCOL = 17


class TurnError(Exception):
    """A request fails with a STUN error code; turned into an error response in one place."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason if reason is not None else stun.REASONS.get(code, "Error")
        self.attributes: list[tuple[int, bytes]] = []


class RelayPorts(Protocol):
    """Chooses allocation port numbers (`xdpturn.proto.ports.PortChooser`; tests fake it)."""

    def acquire(
        self, families: frozenset[Family], *, even: bool = False, pair: bool = False
    ) -> int | None:
        """A port number not handed out yet, or None when none is left. `even`: an even one.
        `pair`: an even N whose N + 1 is free too; both are taken (each released on its own),
        N is returned."""

    def release(self, port: int) -> None: ...

    def claim(self, port: int, families: frozenset[Family]) -> bool:
        """Take port number `port` itself (an allocation carried over from the previous
        process); False when it is not free."""


class SiblingAllocations(Protocol):
    """The allocations of all worker processes of one relay: each core tells it of its own,
    and asks it about the others'."""

    def opened(self, port: int, families: frozenset[Family]) -> None:
        """This core's allocation on `port` is live."""

    def closed(self, port: int) -> None:
        """This core's allocation on `port` is gone."""

    def route(self, port: int, family: Family) -> PeerAddr | None:
        """Where to send a datagram for the relay's own `family` address on `port` so that the
        worker holding that allocation receives it from a peer; None when no worker does."""


@dataclass
class ServerConfig:
    realm: str = "xdpturn"
    public_ipv4: ipaddress.IPv4Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    auth: Authenticator = field(default_factory=Authenticator)
    allow_peers: list[IPNetwork] = field(default_factory=list)
    deny_peers: list[IPNetwork] = field(default_factory=list)
    max_allocations: int | None = None
    max_allocations_per_user: int | None = None
    max_allocations_per_ip: int | None = None
    software: str = "xdpturn"
    # Answers to unauthenticated UDP requests, per client IP: `unauthenticated_burst` at once,
    # then `unauthenticated_rate` per second (0: no limit); at most that many IPs tracked.
    unauthenticated_rate: float = 20.0
    unauthenticated_burst: int = 40
    unauthenticated_sources: int = 65536
    # The key of the stateless nonces; random when None. Workers of one relay share one, so a
    # nonce from any of them is valid on all.
    nonce_key: bytes | None = None
    # Each direction of each allocation: at most this many bits of payload per second, in bursts
    # of `allocation_burst` seconds' worth (None: no limit). The XDP program enforces the same.
    max_bps_per_allocation: int | None = None
    allocation_burst: float = DEFAULT_BURST_SECONDS
    # New allocations get 508 while the relay's measured rate (set_throughput) is at least this.
    max_bps: int | None = None
    # This core's index among the relay's worker processes (0-65535), None for the only one:
    # its reservation tokens start with it, and a token it does not hold is fetched through the
    # runtime from the worker that does (FetchReservation).
    worker: int | None = None


@dataclass(frozen=True)
class AllocationInfo:
    """A read-only view of one allocation, for status displays and metrics."""

    flow: ClientFlow
    username: str
    relay_port: int
    families: frozenset[Family]
    expires: float
    permissions: int
    channels: int
    # Relayed by Python (the kernel's share is read from the fast path).
    traffic: AllocationTraffic = field(default_factory=AllocationTraffic)


@dataclass
class _Channel:
    number: int
    peer: PeerAddr
    expires: float
    routed: bool = False  # installed in the fast path
    # `peer` is one of the relay's own addresses (packets to itself). A channel's peer never
    # changes and neither do the public addresses, so this is decided once, at ChannelBind.
    to_self: bool = False
    # The paths handed out for it (channel_path, peer_path), until revoked (_revoke_paths).
    to_peer: ChannelPath | None = None
    to_client: ChannelPath | None = None


@dataclass
class _Allocation:
    flow: ClientFlow
    username: str
    key: bytes  # long-term key that authenticated the Allocate
    relay_port: int
    families: frozenset[Family]
    expires: float
    allocate_transaction: bytes
    allocate_response: bytes  # resent for a retransmitted Allocate
    dont_fragment: bool = False  # its port's sockets send with DF (reopened so on a restart)
    permissions: dict[IPAddress, float] = field(default_factory=dict)
    channels: dict[int, _Channel] = field(default_factory=dict)
    channel_by_peer: dict[PeerAddr, int] = field(default_factory=dict)
    wakeup: float | None = None  # earliest pending timer entry for this allocation
    # Permissions the runtime was told of (AddPermission sent, RemovePermission not yet).
    announced: set[IPAddress] = field(default_factory=set)
    # What Python relayed for it.
    traffic: AllocationTraffic = field(default_factory=AllocationTraffic)
    # --max-bps-per-allocation: (client_to_peer, peer_to_client) schedules, None without a limit.
    limits: tuple[RateSchedule, RateSchedule] | None = None

    def has_permission(self, ip: IPAddress, now: float) -> bool:
        expires = self.permissions.get(ip)
        return expires is not None and expires > now


@dataclass
class _PendingAllocate:
    """An Allocate whose port the runtime is opening: `port`, and for EVEN-PORT with the R bit
    `port + 1` too (`pair`). `waiting` are the ports not answered yet, `opened` those that
    opened; `refused` are ports the runtime could not open, held until the Allocate is answered
    so the chooser does not offer them again."""

    request: _Request
    families: frozenset[Family]
    address_errors: list[tuple[Family, int]]
    lifetime: int
    even: bool = False
    pair: bool = False
    dont_fragment: bool = False
    port: int = 0
    waiting: set[int] = field(default_factory=set)
    opened: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    exhausted: bool = False  # a port was refused for want of resources: try no other


@dataclass
class _Reservation:
    """A port held for the Allocate that presents `token` (RFC 8656 section 7.2). Its sockets
    are open (the runtime opened them with the pair), so no other program can take the port."""

    token: bytes
    relay_port: int
    families: frozenset[Family]
    dont_fragment: bool  # its sockets were opened so (the pair's Allocate asked)
    expires: float


@dataclass
class _Request:
    """An authenticated request being handled."""

    message: Message
    flow: ClientFlow
    username: str
    key: bytes
    sha256: bool


class TurnServer:
    def __init__(
        self,
        config: ServerConfig,
        ports: RelayPorts,
        rng: random.Random | None = None,
        *,
        wall_clock: Callable[[], float],
        quotas: Quotas | None = None,
        siblings: SiblingAllocations | None = None,
    ) -> None:
        """`quotas` counts allocations against the config's limits (default: this core
        alone); `siblings` knows the allocations of other workers (default: there are none)."""
        self.config = config
        self._wall_clock = wall_clock
        self.stats = CoreStats()
        self._ports = ports
        self._rng = rng if rng is not None else random.Random()
        # What must not be guessed: a client that knew the nonce key could forge nonces, one
        # that guessed a token could take the port reserved for another client.
        self._secret_rng = rng if rng is not None else random.SystemRandom()
        self._nonce_key = config.nonce_key or self._secret_rng.randbytes(16)
        self._quotas: Quotas = quotas or LocalQuotas(
            config.max_allocations, config.max_allocations_per_user, config.max_allocations_per_ip
        )
        self._siblings = siblings
        self._public: dict[Family, IPAddress] = {}
        if config.public_ipv4 is not None:
            self._public[Family.IPV4] = config.public_ipv4
        if config.public_ipv6 is not None:
            self._public[Family.IPV6] = config.public_ipv6
        self._policy = PeerPolicy(config.allow_peers, config.deny_peers, self._public.values())
        self._unauthenticated: SourceBuckets[IPAddress] = SourceBuckets(
            config.unauthenticated_rate,
            config.unauthenticated_burst,
            config.unauthenticated_sources,
        )
        self._by_flow: dict[ClientFlow, _Allocation] = {}
        self._by_port: dict[int, _Allocation] = {}
        self._opening: dict[int, _PendingAllocate] = {}  # by the port being opened
        self._reopening: set[int] = set()  # ports of restored allocations (restore_state)
        self._timers: list[tuple[float, int, int]] = []  # (when, seq, relay_port)
        # By token, in the order made, which is the order they expire in: every reservation
        # lives RESERVATION_LIFETIME, so the first one is always the next to expire.
        self._reservations: dict[bytes, _Reservation] = {}
        if config.worker is not None and not 0 <= config.worker <= 0xFFFF:
            raise ValueError(f"worker index {config.worker} does not fit a token's two bytes")
        self._token_prefix = b"" if config.worker is None else config.worker.to_bytes(2, "big")
        # Allocates waiting for the reservation of their token from another worker, by token,
        # with when to stop waiting; in the order asked, which is the order they time out in.
        self._fetching: dict[bytes, tuple[_Request, float]] = {}
        self._seq = itertools.count()
        self._commands: list[Command] = []
        self._next_command = 0
        self._draining = False
        self._alternate: TransportAddr | None = None
        self._throughput_bps = 0.0

    # Inputs

    def handle_client_datagram(self, data: bytes, flow: ClientFlow, now: float) -> None:
        """A STUN message or ChannelData from a client."""
        if is_channel_data(data):
            self._client_channel_data(data, flow, now)
        elif stun.is_stun(data):
            self._client_stun(data, flow, now)
        else:
            self._drop(Drop.NOT_TURN)

    def handle_peer_datagram(
        self, data: bytes, relay_port: int, peer: PeerAddr, now: float
    ) -> None:
        """A UDP datagram that arrived on allocation port `relay_port` from `peer`."""
        alloc = self._by_port.get(relay_port)
        if alloc is None or alloc.expires <= now:
            self._drop(Drop.NO_ALLOCATION)
            return
        self._deliver_to_client(alloc, peer, data, now)

    def channel_path(self, flow: ClientFlow, number: int, now: float) -> ChannelPath | None:
        """The path of `flow`'s ChannelData on channel `number` to its peer, for a runtime to
        relay it without the core until `until` or revoked (see xdpturn.proto.paths); None when
        the core would not relay such a datagram now, or relays it itself (a client on TCP/TLS,
        a channel to the relay's own address). Changes nothing the protocol sees."""
        alloc = self._by_flow.get(flow)
        if alloc is None or alloc.expires <= now or flow.transport is not Transport.UDP:
            return None
        channel = alloc.channels.get(number)
        if channel is None or channel.expires <= now or channel.to_self:
            return None
        path = channel.to_peer
        if path is not None and path.until > now:
            return path
        permission = alloc.permissions.get(channel.peer.ip)
        if permission is None or permission <= now:
            return None
        path = channel.to_peer = ChannelPath(
            alloc.flow,
            number,
            alloc.relay_port,
            channel.peer,
            min(alloc.expires, channel.expires, permission),
            alloc.traffic.client_to_peer,
            self.stats.relayed[Route.CLIENT_TO_PEER],
            alloc.limits[0] if alloc.limits is not None else None,
            self.stats.drops,
        )
        return path

    def peer_path(self, relay_port: int, peer: PeerAddr, now: float) -> ChannelPath | None:
        """The path of `peer`'s datagrams to allocation port `relay_port` as ChannelData to the
        client, as `channel_path` (None also when the peer has no channel: a Data indication)."""
        alloc = self._by_port.get(relay_port)
        if alloc is None or alloc.expires <= now or alloc.flow.transport is not Transport.UDP:
            return None
        number = alloc.channel_by_peer.get(peer)
        if number is None:
            return None
        channel = alloc.channels[number]
        if channel.expires <= now:
            return None
        path = channel.to_client
        if path is not None and path.until > now:
            return path
        permission = alloc.permissions.get(peer.ip)
        if permission is None or permission <= now or peer.family not in alloc.families:
            return None
        path = channel.to_client = ChannelPath(
            alloc.flow,
            number,
            relay_port,
            channel.peer,
            min(alloc.expires, channel.expires, permission),
            alloc.traffic.peer_to_client,
            self.stats.relayed[Route.PEER_TO_CLIENT],
            alloc.limits[1] if alloc.limits is not None else None,
            self.stats.drops,
        )
        return path

    def handle_relay_port(self, port: int, result: PortResult, now: float) -> None:
        """The runtime's answer to `OpenRelayPort(port)`: the sockets are open; or they could not
        be because another program holds the port, and the Allocate tries the next one (the next
        pair: one refused port of a pair closes the other); or the process is out of resources
        (file descriptors), and the Allocate gets its 508 at once: trying every other port
        would fail the same way, one system call and one log line each."""
        opened = result is PortResult.OPENED
        if port in self._reopening:
            self._reopening.discard(port)
            alloc = self._by_port.get(port)
            if not opened and alloc is not None:
                # Its sockets never opened: nothing to close.
                self._delete_allocation(alloc, "port_unavailable", port_open=False)
            elif not opened:
                for reservation in list(self._reservations.values()):
                    if reservation.relay_port == port:  # a restored reservation's port
                        del self._reservations[reservation.token]
                        self._ports.release(port)
            return
        pending = self._opening.pop(port, None)
        if pending is None:  # not asked for (a runtime bug): give it back
            if opened:
                self._push(CloseRelayPort(port))
            return
        pending.waiting.discard(port)
        (pending.opened if opened else pending.refused).append(port)
        pending.exhausted |= result is PortResult.EXHAUSTED
        if pending.waiting:  # the pair's other port is still being opened
            return
        if len(pending.opened) < (2 if pending.pair else 1):
            for other in pending.opened:
                self._ports.release(other)
                self._push(CloseRelayPort(other))
            pending.opened.clear()
            if pending.exhausted:
                self._refuse_allocate(pending, "Relay out of resources")
            else:
                self._open_next_port(pending)
            return
        self._release_refused(pending)
        request = pending.request
        response = self._allocated(pending, pending.port, now)
        self._respond(request.flow, response, request, request.message)

    def get_timer(self) -> float | None:
        deadlines = [self._timers[0][0]] if self._timers else []
        reservation = self._first_reservation()
        if reservation is not None:
            deadlines.append(reservation.expires)
        fetch = next(iter(self._fetching.values()), None)
        if fetch is not None:
            deadlines.append(fetch[1])
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> None:
        while (reservation := self._first_reservation()) is not None:
            if reservation.expires > now:
                break
            self._cancel_reservation(reservation)
        while (fetch := next(iter(self._fetching.items()), None)) is not None:
            token, (request, deadline) = fetch
            if deadline > now:
                break
            del self._fetching[token]
            self._resume_allocate(request, now)  # no reservation here: as for an unknown token
        while self._timers and self._timers[0][0] <= now:
            when, _, port = heapq.heappop(self._timers)
            alloc = self._by_port.get(port)
            # Entries superseded by an earlier one that already ran are skipped.
            if alloc is None or alloc.wakeup != when:
                continue
            alloc.wakeup = None
            self._sweep(alloc, now)

    def next_command(self) -> Command | None:
        if self._next_command >= len(self._commands):
            if self._commands:
                self._commands.clear()
                self._next_command = 0
            return None
        command = self._commands[self._next_command]
        self._next_command += 1
        return command

    def close(self, now: float) -> None:
        for alloc in list(self._by_port.values()):
            self._delete_allocation(alloc, "shutdown")
        for reservation in list(self._reservations.values()):
            self._cancel_reservation(reservation)
        self._fetching.clear()  # unanswered, as every request in flight at shutdown

    def handle_flow_closed(self, flow: ClientFlow, now: float) -> None:
        """The TCP/TLS connection of `flow` closed. Its allocation is deleted at once: no
        request can reach it again (a new connection is a new 5-tuple), and leaving it to
        expire would hold its port and quota for up to an hour."""
        if flow.transport is Transport.UDP:
            return
        alloc = self._by_flow.get(flow)
        if alloc is not None:
            self._delete_allocation(alloc, "connection_closed")
        for token, (request, _) in list(self._fetching.items()):
            if request.flow == flow:  # its reservation, when it comes, waits for another try
                del self._fetching[token]

    def drain(self, alternate: TransportAddr | None = None) -> None:
        """Accept no new allocations: a new Allocate is answered 300 Try Alternate with
        ALTERNATE-SERVER `alternate`, or 508 without one. Existing allocations keep working
        (refresh, permissions, channels, relaying) until they expire or are deleted."""
        self._draining = True
        self._alternate = alternate

    @property
    def draining(self) -> bool:
        return self._draining

    def export_state(self, now: float, wall_now: float) -> CoreState:
        """What the next process needs to carry on (see xdpturn.proto.handover), times on the
        wall clock. Allocations of TCP/TLS clients are left out: their connections end with
        this process."""
        to_wall = wall_now - now
        return CoreState(
            nonce_key=self._nonce_key,
            allocations=tuple(
                SavedAllocation(
                    flow=a.flow,
                    username=a.username,
                    key=a.key,
                    relay_port=a.relay_port,
                    families=a.families,
                    expires=a.expires + to_wall,
                    allocate_transaction=a.allocate_transaction,
                    allocate_response=a.allocate_response,
                    dont_fragment=a.dont_fragment,
                    permissions={ip: e + to_wall for ip, e in a.permissions.items()},
                    channels=tuple(
                        SavedChannel(c.number, c.peer, c.expires + to_wall)
                        for c in a.channels.values()
                    ),
                )
                for a in self._by_port.values()
                if a.flow.transport is Transport.UDP and a.expires > now
            ),
            reservations=tuple(
                SavedReservation(
                    r.token, r.relay_port, r.families, r.dont_fragment, r.expires + to_wall
                )
                for r in self._reservations.values()
                if r.expires > now
            ),
        )

    def restore_state(
        self, state: CoreState, now: float, wall_now: float, listeners: int
    ) -> list[tuple[SavedAllocation, str]]:
        """Carry on with the allocations of `state` (a fresh server only). Their ports are
        claimed and opened again (one whose port cannot be opened is then closed with reason
        "port_unavailable"), their channels installed again (the same routes: the fast path
        keeps them), and their timers run from the saved deadlines. Returns the allocations not
        taken, each with why (expired, its port or listener gone, a clash)."""
        if self._by_port:
            raise RuntimeError("restore_state on a server that has allocations")
        self._nonce_key = state.nonce_key
        to_core = now - wall_now
        skipped: list[tuple[SavedAllocation, str]] = []
        for saved in state.allocations:
            expires = saved.expires + to_core
            reason = None
            if expires <= now:
                reason = "expired"
            elif saved.flow.listener >= listeners:
                reason = "listener gone"
            elif saved.flow in self._by_flow or saved.relay_port in self._by_port:
                reason = "duplicate"
            elif not saved.families or not saved.families <= self._public.keys():
                reason = "family not served"
            elif not self._ports.claim(saved.relay_port, saved.families):
                reason = "port unavailable"
            elif self._quotas.acquire(saved.username, saved.flow.client.ip) is not None:
                self._ports.release(saved.relay_port)
                reason = "over a quota"  # the new configuration's limits are lower
            if reason is not None:
                skipped.append((saved, reason))
                continue
            alloc = _Allocation(
                flow=saved.flow,
                username=saved.username,
                key=saved.key,
                relay_port=saved.relay_port,
                families=saved.families,
                expires=expires,
                allocate_transaction=saved.allocate_transaction,
                allocate_response=saved.allocate_response,
                dont_fragment=saved.dont_fragment,
                permissions={ip: e + to_core for ip, e in saved.permissions.items()},
            )
            for c in saved.channels:
                alloc.channels[c.number] = _Channel(
                    c.number, c.peer, c.expires + to_core, to_self=self._is_self(c.peer)
                )
                alloc.channel_by_peer[c.peer] = c.number
            self._by_flow[alloc.flow] = alloc
            self._by_port[alloc.relay_port] = alloc
            if self._siblings is not None:
                self._siblings.opened(alloc.relay_port, alloc.families)
            self._reopening.add(alloc.relay_port)
            self._push(OpenRelayPort(alloc.relay_port, alloc.families, alloc.dont_fragment))
            lifetime = max(0, int(expires - now))
            self._push(
                AllocationOpened(
                    alloc.flow, alloc.relay_port, alloc.families, alloc.username, lifetime
                )
            )
            # Expires what lapsed while no process ran, installs the rest, arms the timer.
            self._sweep(alloc, now)
        self._restore_reservations(state.reservations, now, to_core)
        return skipped

    def _restore_reservations(
        self, saved: tuple[SavedReservation, ...], now: float, to_core: float
    ) -> None:
        """Hold the reserved ports again, each reopened like a restored allocation's; ones that
        lapsed meanwhile, or whose port or family is gone, are dropped (their token's Allocate
        then gets 508, as for any unknown token)."""
        for r in sorted(saved, key=lambda r: r.expires):  # so `_hold` need not reorder
            if self._hold_saved(r, r.expires + to_core, now):
                self._reopening.add(r.relay_port)
                self._push(OpenRelayPort(r.relay_port, r.families, r.dont_fragment))

    def _hold_saved(self, r: SavedReservation, expires: float, now: float) -> bool:
        """Hold a reservation of another process (restored) or worker (fetched) until
        `expires`, its port claimed; False when it lapsed meanwhile or its port or family is
        not to be had here."""
        if (
            expires <= now
            or r.token in self._reservations
            or not r.families
            or not r.families <= self._public.keys()
            or not self._ports.claim(r.relay_port, r.families)
        ):
            return False
        self._hold(_Reservation(r.token, r.relay_port, r.families, r.dont_fragment, expires))
        return True

    def _hold(self, reservation: _Reservation) -> None:
        """Keep the table in expiry order (`_first_reservation` relies on it): reservations
        made here come in that order; one from elsewhere may have less left."""
        last = next(reversed(self._reservations.values()), None)
        self._reservations[reservation.token] = reservation
        if last is not None and reservation.expires < last.expires:
            ordered = sorted(self._reservations.values(), key=lambda r: r.expires)
            self._reservations = {r.token: r for r in ordered}

    def give_up_reservation(self, token: bytes, now: float) -> SavedReservation | None:
        """Another worker asks for the reservation of `token` (an Allocate presented it there):
        it leaves this core, its port released here but not closed, since the runtime hands the
        port's sockets over with it. `expires` in the result is the seconds it has left. None
        when this core holds no live reservation of that token (unknown, expired or used)."""
        reservation = self._reservations.get(token)
        if reservation is None or reservation.expires <= now:
            return None
        del self._reservations[token]
        self._ports.release(reservation.relay_port)
        return SavedReservation(
            token,
            reservation.relay_port,
            reservation.families,
            reservation.dont_fragment,
            reservation.expires - now,
        )

    def handle_fetched_reservation(
        self, token: bytes, handed: SavedReservation | None, now: float
    ) -> None:
        """The runtime's answer to `FetchReservation(token)`: the reservation as the worker that
        held it gave it up (`expires`: seconds left), its port's sockets now open in this
        runtime; or None when no worker held it or the hand-over failed. It is held here for
        the rest of its 30 s, and the Allocate waiting for it is answered now; after
        FETCH_TIMEOUT that Allocate was answered as for an unknown token already, and the
        reservation waits for the client's next try."""
        if handed is not None and (
            handed.token != token or not self._hold_saved(handed, now + handed.expires, now)
        ):
            self._push(CloseRelayPort(handed.relay_port))  # the sockets the runtime took
        held = self._fetching.pop(token, None)
        if held is not None:
            self._resume_allocate(held[0], now)

    def set_throughput(self, bps: float) -> None:
        """The relay's current rate of relayed payload, both paths, in bits per second, as the
        runtime measures it: with `max_bps` set, new allocations get 508 while it is reached."""
        self._throughput_bps = bps

    def allocations(self) -> list[AllocationInfo]:
        return [
            AllocationInfo(
                flow=a.flow,
                username=a.username,
                relay_port=a.relay_port,
                families=a.families,
                expires=a.expires,
                permissions=len(a.permissions),
                channels=len(a.channels),
                traffic=a.traffic.copy(),
            )
            for a in self._by_port.values()
        ]

    # ChannelData and indications from clients

    def _client_channel_data(self, data: bytes, flow: ClientFlow, now: float) -> None:
        # The relay's per-datagram path when the fast path is off: the same checks as
        # everywhere (live allocation, bound channel, permission), as plain dict lookups, with
        # the helpers (_live_allocation, has_permission) inlined.
        try:
            number, payload = split_channel_data(data)
        except ChannelDataError:
            self._drop(Drop.MALFORMED_CHANNEL_DATA)
            return
        alloc = self._by_flow.get(flow)
        if alloc is None or alloc.expires <= now:
            self._drop(Drop.NO_ALLOCATION)
            return
        channel = alloc.channels.get(number)
        if channel is None or channel.expires <= now:
            self._drop(Drop.NO_CHANNEL)
            return
        permission = alloc.permissions.get(channel.peer.ip)
        if permission is None or permission <= now:
            self._drop(Drop.NO_PERMISSION)
            return
        self._send_to_peer(alloc, channel.peer, payload, now, channel.to_self)

    def _client_stun(self, data: bytes, flow: ClientFlow, now: float) -> None:
        try:
            message = stun.decode(data)
        except stun.StunDecodeError:
            self._drop(Drop.MALFORMED_STUN)
            return
        if message.cls == MessageClass.INDICATION:
            if message.method == Method.SEND:
                self._send_indication(message, flow, now)
            elif message.method != Method.BINDING:  # Binding indications are keepalives
                self._drop(Drop.UNEXPECTED_MESSAGE)
            return
        if message.cls != MessageClass.REQUEST:
            self._drop(Drop.UNEXPECTED_MESSAGE)
            return
        self.stats.requests[_method(message.method)] += 1
        if message.method == Method.BINDING:
            self._binding(message, flow, now)
            return
        self._authenticated_request(message, data, flow, now)

    def _send_indication(self, message: Message, flow: ClientFlow, now: float) -> None:
        alloc = self._live_allocation(flow, now)
        if alloc is None:
            self._drop(Drop.NO_ALLOCATION)
            return
        peer_value = message.get(AttrType.XOR_PEER_ADDRESS)
        payload = message.get(AttrType.DATA)
        if peer_value is None or payload is None:
            self._drop(Drop.BAD_INDICATION)
            return
        try:
            peer = PeerAddr(stun.decode_xor_address(peer_value, message.transaction_id))
        except stun.StunDecodeError:
            self._drop(Drop.BAD_INDICATION)
            return
        if peer.family not in alloc.families:
            self._drop(Drop.FAMILY_MISMATCH)
            return
        to_self = self._is_self(peer)
        if not alloc.has_permission(peer.ip, now):
            # Judged here, off the per-datagram path: a permission only ever exists for an IP
            # the policy allowed (_check_peer_attributes ran before it was installed), and the
            # policy does not change while the server runs.
            refused = not to_self and not self._policy.permits(peer.ip)
            self._drop(Drop.PEER_DENIED if refused else Drop.NO_PERMISSION)
            return
        self._send_to_peer(alloc, peer, payload, now, to_self)

    # Relaying

    def _is_self(self, peer: PeerAddr) -> bool:
        """`peer` is one of the relay's own public addresses."""
        return self._public.get(peer.family) == peer.ip

    def _send_to_peer(
        self, alloc: _Allocation, peer: PeerAddr, data: bytes, now: float, to_self: bool
    ) -> None:
        """`to_self` is `_is_self(peer)`, which a bound channel has worked out already."""
        if not to_self:
            if alloc.limits is not None and not self._admit(alloc, 0, data, now):
                return
            counts = alloc.traffic.client_to_peer
            counts.packets += 1
            counts.bytes += len(data)
            relayed = self.stats.relayed[Route.CLIENT_TO_PEER]
            relayed.packets += 1
            relayed.bytes += len(data)
            self._commands.append(SendToPeer(alloc.relay_port, peer, data))
            return
        # Packets to itself: deliver to the allocation on that port, never through a socket.
        target = self._by_port.get(peer.port)
        if target is None and self._siblings is not None:
            sibling = self._siblings.route(peer.port, peer.family)
            if sibling is not None:  # another worker's: through its socket, as from a peer
                self._send_to_peer(alloc, sibling, data, now, False)
                return
        if target is None or target.expires <= now or peer.family not in target.families:
            self._drop(Drop.SELF_NOT_ALLOCATION)
            return
        source = PeerAddr(TransportAddr(peer.ip, alloc.relay_port))
        self._deliver_to_client(target, source, data, now, Route.LOOPBACK, sender=alloc)

    def _admit(self, alloc: _Allocation, direction: int, data: bytes, now: float) -> bool:
        """The allocation's rate limit in `direction` (0: client_to_peer, 1: peer_to_client);
        a refused datagram is counted as dropped, on the allocation and in the stats."""
        assert alloc.limits is not None
        if alloc.limits[direction].admit(len(data), now):
            return True
        counts = alloc.traffic.peer_to_client if direction else alloc.traffic.client_to_peer
        counts.dropped_packets += 1
        counts.dropped_bytes += len(data)
        self._drop(Drop.ALLOCATION_RATE)
        return False

    def _deliver_to_client(
        self,
        alloc: _Allocation,
        peer: PeerAddr,
        data: bytes,
        now: float,
        route: Route = Route.PEER_TO_CLIENT,
        sender: _Allocation | None = None,
    ) -> None:
        """Relay `data` from `peer` to the allocation's client, counted under `route`: each
        datagram is counted once, as peer_to_client, client_to_peer or loopback. `sender` is
        the allocation that sent it when the peer is the relay itself (loopback): it is metered
        and limited as client_to_peer first, as the XDP program does."""
        if peer.family not in alloc.families:
            self._drop(Drop.FAMILY_MISMATCH)
            return
        permission = alloc.permissions.get(peer.ip)  # has_permission, inlined: per datagram
        if permission is None or permission <= now:
            self._drop(Drop.NO_PERMISSION)
            return
        if (
            sender is not None
            and sender.limits is not None
            and not self._admit(sender, 0, data, now)
        ):
            return
        if alloc.limits is not None and not self._admit(alloc, 1, data, now):
            return
        if sender is not None:
            sent = sender.traffic.client_to_peer
            sent.packets += 1
            sent.bytes += len(data)
        counts = alloc.traffic.peer_to_client
        counts.packets += 1
        counts.bytes += len(data)
        relayed = self.stats.relayed[route]
        relayed.packets += 1
        relayed.bytes += len(data)
        number = alloc.channel_by_peer.get(peer)
        if number is not None and alloc.channels[number].expires > now:
            stream = alloc.flow.transport is not Transport.UDP
            self._commands.append(
                SendToClient(alloc.flow, encode_channel_data(number, data, pad=stream))
            )
            return
        indication = Message(Method.DATA, MessageClass.INDICATION, self._rng.randbytes(12))
        indication.add(
            AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(peer, indication.transaction_id)
        )
        indication.add(AttrType.DATA, data)
        self._push(SendToClient(alloc.flow, stun.encode(indication)))

    # Requests

    def _binding(self, message: Message, flow: ClientFlow, now: float) -> None:
        if not self._may_answer_unauthenticated(flow, now):
            return
        unknown = stun.unknown_required_attributes(message)
        if unknown:
            error = TurnError(420)
            error.attributes.append(
                (AttrType.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(unknown))
            )
            self._respond_error(flow, message, error, None)
            return
        response = stun.response(message)
        response.add(
            AttrType.XOR_MAPPED_ADDRESS,
            stun.encode_xor_address(flow.client, message.transaction_id),
        )
        self._respond(flow, response, None, message)

    def _authenticated_request(
        self, message: Message, data: bytes, flow: ClientFlow, now: float
    ) -> None:
        try:
            request = self._authenticate(message, data, flow, now)
        except TurnError as error:
            self.stats.auth_failures += 1
            if self._may_answer_unauthenticated(flow, now):
                self._respond_error(flow, message, error, None)
            return
        try:
            self._check_peer_attributes(message)
            unknown = stun.unknown_required_attributes(message)
            if unknown:
                unknown_error = TurnError(420)
                unknown_error.attributes.append(
                    (AttrType.UNKNOWN_ATTRIBUTES, stun.encode_unknown_attributes(unknown))
                )
                raise unknown_error
            response = self._dispatch(request, now)
        except TurnError as error:
            self._respond_error(flow, message, error, request)
            return
        if response is not None:  # None: an Allocate answers once its port is open
            self._respond(flow, response, request, message)

    def _may_answer_unauthenticated(self, flow: ClientFlow, now: float) -> bool:
        """Spend a token of the client IP's budget for answers to unauthenticated requests.
        Only UDP: a TCP/TLS source completed a handshake, so it cannot be forged."""
        if flow.transport is not Transport.UDP or self._unauthenticated.take(flow.client.ip, now):
            return True
        self._drop(Drop.UNAUTHENTICATED_RATE)
        return False

    def _check_peer_attributes(self, message: Message) -> None:
        """Every XOR-PEER-ADDRESS of any request passes the peer policy, whatever the method
        makes of it, so no request carries a refused peer past this point."""
        for attr, value in message.attributes:
            if attr == AttrType.XOR_PEER_ADDRESS:
                peer = PeerAddr(_decode(stun.decode_xor_address, value, message.transaction_id))
                # The relay's own addresses, canonical spelling, pass: packets to them stay
                # inside, delivered to the allocation on that port or dropped.
                if not self._is_self(peer) and not self._policy.permits(peer.ip):
                    raise TurnError(403, "Peer address refused by policy")

    def _dispatch(self, request: _Request, now: float) -> Message | bytes | None:
        """The response: a message to encode, bytes already encoded (Allocate's, which is kept to
        answer a retransmission identically), or None when it comes later (a new Allocate)."""
        method = request.message.method
        if method == Method.ALLOCATE:
            return self._allocate(request, now)
        if method == Method.REFRESH:
            return self._refresh(request, now)
        if method == Method.CREATE_PERMISSION:
            return self._create_permission(request, now)
        if method == Method.CHANNEL_BIND:
            return self._channel_bind(request, now)
        raise TurnError(400, "Unknown method")

    def _authenticate(
        self, message: Message, data: bytes, flow: ClientFlow, now: float
    ) -> _Request:
        """Long-term credentials (RFC 8489 section 9.2.4)."""
        algorithm = stun.integrity_algorithm(message)
        if algorithm is None:
            raise self._challenge(401, flow, now)
        username_value = message.get(AttrType.USERNAME)
        realm_value = message.get(AttrType.REALM)
        nonce_value = message.get(AttrType.NONCE)
        if username_value is None or realm_value is None or nonce_value is None:
            raise TurnError(400, "Missing USERNAME, REALM or NONCE")
        try:
            username = stun.decode_text(username_value)
            nonce = stun.decode_text(nonce_value)
        except stun.StunDecodeError as exc:
            raise TurnError(400, "Malformed USERNAME or NONCE") from exc
        if not self._nonce_valid(nonce, flow, now):
            raise self._challenge(438, flow, now)
        for password in self.config.auth.passwords(username, self._wall_clock()):
            key = stun.long_term_key(username, self.config.realm, password)
            if stun.verify_integrity(data, key):
                return _Request(message, flow, username, key, algorithm == "sha256")
        raise self._challenge(401, flow, now)

    def _challenge(self, code: int, flow: ClientFlow, now: float) -> TurnError:
        error = TurnError(code)
        error.attributes.append((AttrType.REALM, self.config.realm.encode()))
        error.attributes.append((AttrType.NONCE, self._make_nonce(flow, now).encode()))
        return error

    def _make_nonce(self, flow: ClientFlow, now: float) -> str:
        # Stateless: expiry and a MAC over it and the client's transport address (IP and port,
        # as coturn binds it); no table to fill up. From another port the nonce is stale: 438
        # with a fresh one.
        expiry = f"{int(now) + NONCE_LIFETIME:x}"
        return f"{expiry}.{self._nonce_mac(expiry, flow)}"

    def _nonce_mac(self, expiry: str, flow: ClientFlow) -> str:
        message = f"{expiry}|{flow.client}".encode()
        return hmac.new(self._nonce_key, message, hashlib.sha256).hexdigest()[:24]

    def _nonce_valid(self, nonce: str, flow: ClientFlow, now: float) -> bool:
        expiry, _, mac = nonce.partition(".")
        try:
            expires = int(expiry, 16)
        except ValueError:
            return False
        return expires >= now and hmac.compare_digest(mac, self._nonce_mac(expiry, flow))

    def _allocate(self, request: _Request, now: float, *, fetch: bool = True) -> bytes | None:
        """`fetch`: a token this core does not hold may be fetched from another worker (not
        when resuming an Allocate that waited for one)."""
        message, flow = request.message, request.flow
        if any(p.request.flow == flow for p in self._opening.values()) or any(
            held.flow == flow for held, _ in self._fetching.values()
        ):
            return None  # a retransmission while its port is opened or its token fetched
        existing = self._by_flow.get(flow)
        if existing is not None:
            if existing.expires <= now:  # expired, its timer has not run yet
                self._delete_allocation(existing, "expired")
            elif existing.allocate_transaction == message.transaction_id:
                return existing.allocate_response
            else:
                raise TurnError(437)
        if self._draining:
            # After authentication, so the redirect carries MESSAGE-INTEGRITY and cannot be
            # forged; after the retransmission check, so a lost response is still resent.
            raise self._redirect()
        transport = message.get(AttrType.REQUESTED_TRANSPORT)
        if transport is None:
            raise TurnError(400, "Missing REQUESTED-TRANSPORT")
        if _decode(stun.decode_requested_transport, transport) != UDP_PROTOCOL:
            raise TurnError(442)
        lifetime = _granted_lifetime(message, default=DEFAULT_ALLOCATION_LIFETIME)
        token = self._requested_token(message)
        reservation = None
        if token is not None:
            reservation = self._reservations.get(token)
            if reservation is None and fetch and self._may_fetch(token):
                self._fetching[token] = (request, now + FETCH_TIMEOUT)
                self._push(FetchReservation(token))
                return None  # answered when the reservation comes, or at FETCH_TIMEOUT
            if reservation is None or reservation.expires <= now:
                raise TurnError(508, "No reservation for this token")
        address_errors: list[tuple[Family, int]] = []
        if reservation is not None:
            families = reservation.families
        else:
            families, address_errors = self._requested_families(message)
        even, pair = self._requested_parity(message)
        dont_fragment = message.get(AttrType.DONT_FRAGMENT) is not None
        if reservation is not None and dont_fragment and not reservation.dont_fragment:
            # Section 7.2, check 4: DF it cannot give is an unknown comprehension-required
            # attribute. The reserved port's sockets are open already, without DF.
            error = TurnError(420)
            unknown = stun.encode_unknown_attributes([AttrType.DONT_FRAGMENT])
            error.attributes.append((AttrType.UNKNOWN_ATTRIBUTES, unknown))
            raise error
        self._acquire_quota(request.username, flow)
        pending = _PendingAllocate(
            request, families, address_errors, lifetime, even, pair, dont_fragment
        )
        if reservation is not None:  # its port is open already: answered now
            del self._reservations[reservation.token]  # single use
            pending.dont_fragment = reservation.dont_fragment  # as its sockets were opened
            return self._allocated(pending, reservation.relay_port, now)
        if not self._open_next_port(pending):
            self._quotas.release(request.username, flow.client.ip)
            raise TurnError(508, _NO_PORT[even, pair])
        return None

    def _open_next_port(self, pending: _PendingAllocate) -> bool:
        """Ask the runtime to open the next free port for `pending`; False when none is left
        (after a refusal, the 508 is sent here)."""
        port = self._ports.acquire(pending.families, even=pending.even, pair=pending.pair)
        if port is None:
            if pending.refused:  # the Allocate is answered here, not by the caller
                self._refuse_allocate(pending, _NO_PORT[pending.even, pending.pair])
            return False
        pending.port = port
        # A pair's N + 1 is opened now, not when its token comes: then no other program can
        # take it meanwhile, and the token's Allocate never fails for a port the relay promised.
        for opening in (port, port + 1) if pending.pair else (port,):
            pending.waiting.add(opening)
            self._opening[opening] = pending
            self._push(OpenRelayPort(opening, pending.families, pending.dont_fragment))
        return True

    def _refuse_allocate(self, pending: _PendingAllocate, reason: str) -> None:
        """Answer a pending Allocate 508 after its ports were refused."""
        self._release_refused(pending)
        request = pending.request
        self._quotas.release(request.username, request.flow.client.ip)
        self._respond_error(request.flow, request.message, TurnError(508, reason), request)

    def _release_refused(self, pending: _PendingAllocate) -> None:
        # Held while the Allocate lasts, so the chooser does not offer them again.
        for port in pending.refused:
            self._ports.release(port)
        pending.refused.clear()

    def _allocated(self, pending: _PendingAllocate, port: int, now: float) -> bytes:
        """The allocation on `port`, now open; its success response."""
        request, families, lifetime = pending.request, pending.families, pending.lifetime
        message, flow = request.message, request.flow
        response = stun.response(message)
        for family in sorted(families):
            relayed = TransportAddr(self._public[family], port)
            response.add(
                AttrType.XOR_RELAYED_ADDRESS,
                stun.encode_xor_address(relayed, message.transaction_id),
            )
        for family, code in pending.address_errors:
            response.add(
                AttrType.ADDRESS_ERROR_CODE,
                stun.encode_address_error_code(family, code, stun.REASONS[code]),
            )
        response.add(AttrType.LIFETIME, stun.encode_u32(lifetime))
        if pending.pair:
            token = self._reserve(port + 1, pending, now)
            response.add(AttrType.RESERVATION_TOKEN, token)
        response.add(
            AttrType.XOR_MAPPED_ADDRESS,
            stun.encode_xor_address(flow.client, message.transaction_id),
        )
        alloc = _Allocation(
            flow=flow,
            username=request.username,
            key=request.key,
            relay_port=port,
            families=families,
            expires=now + lifetime,
            allocate_transaction=message.transaction_id,
            allocate_response=self._encode_response(response, request, message),
            dont_fragment=pending.dont_fragment,
            limits=self._new_limits(),
        )
        self._by_flow[flow] = alloc
        self._by_port[port] = alloc
        if self._siblings is not None:
            self._siblings.opened(port, families)
        self._schedule(alloc, alloc.expires)
        self._push(AllocationOpened(flow, port, families, request.username, lifetime))
        return alloc.allocate_response

    def _resume_allocate(self, request: _Request, now: float) -> None:
        """Answer an Allocate that waited for its token's reservation from another worker."""
        try:
            response = self._allocate(request, now, fetch=False)
        except TurnError as error:
            self._respond_error(request.flow, request.message, error, request)
            return
        if response is not None:
            self._respond(request.flow, response, request, request.message)

    def _may_fetch(self, token: bytes) -> bool:
        """A token this core does not hold may be another worker's (or one it gave up): asked
        of the runtime, unless this is the only worker, another Allocate waits for the same
        token (the first takes it), or too many wait already."""
        return (
            bool(self._token_prefix)
            and token not in self._fetching
            and len(self._fetching) < MAX_FETCHES
        )

    def _requested_token(self, message: Message) -> bytes | None:
        """The RESERVATION-TOKEN (section 7.2, check 5): it takes the reserved port with that
        port's family, so the request may name no port parity and no address family. A token
        that is unknown, expired or already used gets 508 (the caller's)."""
        value = message.get(AttrType.RESERVATION_TOKEN)
        if value is None:
            return None
        for attr in (
            AttrType.EVEN_PORT,
            AttrType.REQUESTED_ADDRESS_FAMILY,
            AttrType.ADDITIONAL_ADDRESS_FAMILY,
        ):
            if message.get(attr) is not None:
                raise TurnError(400, f"RESERVATION-TOKEN with {attr.name.replace('_', '-')}")
        return _decode(stun.decode_reservation_token, value)

    def _requested_parity(self, message: Message) -> tuple[bool, bool]:
        """(even, pair) from EVEN-PORT (section 7.2, check 8). A pair reserves N + 1 in the one
        family of the request: a dual allocation cannot ask for it."""
        value = message.get(AttrType.EVEN_PORT)
        if value is None:
            return False, False
        pair = _decode(stun.decode_even_port, value)
        if pair and message.get(AttrType.ADDITIONAL_ADDRESS_FAMILY) is not None:
            raise TurnError(400, "EVEN-PORT with the R bit and ADDITIONAL-ADDRESS-FAMILY")
        return True, pair

    def _reserve(self, port: int, pending: _PendingAllocate, now: float) -> bytes:
        # With workers, the first two bytes say which made it, 48 random bits remain.
        prefix, random_bytes = self._token_prefix, 8 - len(self._token_prefix)
        token = prefix + self._secret_rng.randbytes(random_bytes)
        while token in self._reservations:  # 48 or 64 random bits: in practice never
            token = prefix + self._secret_rng.randbytes(random_bytes)
        expires = now + RESERVATION_LIFETIME
        self._hold(_Reservation(token, port, pending.families, pending.dont_fragment, expires))
        return token

    def _first_reservation(self) -> _Reservation | None:
        return next(iter(self._reservations.values()), None)

    def _cancel_reservation(self, reservation: _Reservation) -> None:
        del self._reservations[reservation.token]
        self._ports.release(reservation.relay_port)
        self._push(CloseRelayPort(reservation.relay_port))

    def _new_limits(self) -> tuple[RateSchedule, RateSchedule] | None:
        rate = self.config.max_bps_per_allocation
        if rate is None:
            return None
        burst = self.config.allocation_burst
        return RateSchedule(rate, burst), RateSchedule(rate, burst)

    def _redirect(self) -> TurnError:
        if self._alternate is None:
            return TurnError(508, "Draining")
        error = TurnError(300)
        error.attributes.append((AttrType.ALTERNATE_SERVER, stun.encode_address(self._alternate)))
        return error

    def _requested_families(
        self, message: Message
    ) -> tuple[frozenset[Family], list[tuple[Family, int]]]:
        """The families to allocate, and ADDRESS-ERROR-CODEs for ones that could not be."""
        requested = message.get(AttrType.REQUESTED_ADDRESS_FAMILY)
        additional = message.get(AttrType.ADDITIONAL_ADDRESS_FAMILY)
        if requested is not None and additional is not None:
            raise TurnError(400, "REQUESTED- and ADDITIONAL-ADDRESS-FAMILY together")
        if additional is not None:
            # Dual stack: IPv4 plus IPv6 (RFC 8656 section 7.2).
            if _decode(stun.decode_address_family, additional) != Family.IPV6:
                raise TurnError(400, "ADDITIONAL-ADDRESS-FAMILY must be IPv6")
            if Family.IPV4 not in self._public:
                raise TurnError(440)
            if Family.IPV6 not in self._public:
                return frozenset({Family.IPV4}), [(Family.IPV6, 440)]
            return frozenset({Family.IPV4, Family.IPV6}), []
        family = Family.IPV4
        if requested is not None:
            value = _decode(stun.decode_address_family, requested)
            if value not in (Family.IPV4, Family.IPV6):
                raise TurnError(440)
            family = Family(value)
        if family not in self._public:
            raise TurnError(440)
        return frozenset({family}), []

    def _acquire_quota(self, username: str, flow: ClientFlow) -> None:
        # Before the quota is taken: a refusal here must not hold one.
        max_bps = self.config.max_bps
        if max_bps is not None and self._throughput_bps >= max_bps:
            raise TurnError(508, "Relay bandwidth cap reached")
        refusal = self._quotas.acquire(username, flow.client.ip)
        if refusal is QuotaRefusal.TOTAL:
            raise TurnError(508, "Relay is full")
        if refusal is not None:
            raise TurnError(486)

    def _refresh(self, request: _Request, now: float) -> Message:
        alloc = self._owned_allocation(request, now)
        message = request.message
        family_value = message.get(AttrType.REQUESTED_ADDRESS_FAMILY)
        if (
            family_value is not None
            and _decode(stun.decode_address_family, family_value) not in alloc.families
        ):
            raise TurnError(443)
        lifetime_value = message.get(AttrType.LIFETIME)
        if lifetime_value is not None and _decode(stun.decode_u32, lifetime_value) == 0:
            self._delete_allocation(alloc, "refresh")
            lifetime = 0
        else:
            lifetime = _granted_lifetime(message, default=DEFAULT_ALLOCATION_LIFETIME)
            alloc.expires = now + lifetime
            self._revoke_paths(alloc)  # it may expire sooner than before
            self._schedule(alloc, alloc.expires)
        response = stun.response(message)
        response.add(AttrType.LIFETIME, stun.encode_u32(lifetime))
        return response

    def _create_permission(self, request: _Request, now: float) -> Message:
        alloc = self._owned_allocation(request, now)
        message = request.message
        peers = [
            self._checked_peer(alloc, value, message.transaction_id)
            for attr, value in message.attributes
            if attr == AttrType.XOR_PEER_ADDRESS
        ]
        if not peers:
            raise TurnError(400, "Missing XOR-PEER-ADDRESS")
        # All or nothing: every peer was checked before any permission is installed.
        for peer in peers:
            self._permit(alloc, peer.ip, now)
        self._sync_routes(alloc, now)
        return stun.response(message)

    def _channel_bind(self, request: _Request, now: float) -> Message:
        alloc = self._owned_allocation(request, now)
        message = request.message
        number_value = message.get(AttrType.CHANNEL_NUMBER)
        peer_value = message.get(AttrType.XOR_PEER_ADDRESS)
        if number_value is None or peer_value is None:
            raise TurnError(400, "Missing CHANNEL-NUMBER or XOR-PEER-ADDRESS")
        number = _decode(stun.decode_channel_number, number_value)
        if not CHANNEL_MIN <= number <= ACCEPTED_CHANNEL_MAX:
            raise TurnError(400, "Channel number out of range")
        peer = self._checked_peer(alloc, peer_value, message.transaction_id)
        if self._is_self(peer) and not self._is_allocation(peer):
            raise TurnError(403, "Relay address that is not an allocation")
        # Rebinding rules (section 11.2): a number keeps its peer and a peer its number,
        # also during the cool-down after expiry.
        bound = alloc.channels.get(number)
        if bound is not None and bound.peer != peer:
            raise TurnError(400, "Channel already bound to another peer")
        other = alloc.channel_by_peer.get(peer)
        if other is not None and other != number:
            raise TurnError(400, "Peer already bound to another channel")
        if bound is None:
            bound = _Channel(number, peer, now + CHANNEL_LIFETIME, to_self=self._is_self(peer))
            alloc.channels[number] = bound
            alloc.channel_by_peer[peer] = number
        else:
            bound.expires = now + CHANNEL_LIFETIME
        self._schedule(alloc, bound.expires)
        self._permit(alloc, peer.ip, now)
        self._sync_routes(alloc, now)
        return stun.response(message)

    def _is_allocation(self, peer: PeerAddr) -> bool:
        """The relay's own address `peer` is an allocation of this worker or of another."""
        if peer.port in self._by_port:
            return True
        siblings = self._siblings
        return siblings is not None and siblings.route(peer.port, peer.family) is not None

    def _checked_peer(self, alloc: _Allocation, value: bytes, transaction_id: bytes) -> PeerAddr:
        peer = PeerAddr(_decode(stun.decode_xor_address, value, transaction_id))
        if peer.family not in alloc.families:
            raise TurnError(443)
        # The peer policy was applied to every XOR-PEER-ADDRESS before dispatch.
        return peer

    def _permit(self, alloc: _Allocation, ip: IPAddress, now: float) -> None:
        alloc.permissions[ip] = now + PERMISSION_LIFETIME
        self._schedule(alloc, now + PERMISSION_LIFETIME)

    def _owned_allocation(self, request: _Request, now: float) -> _Allocation:
        alloc = self._live_allocation(request.flow, now)
        if alloc is None:
            raise TurnError(437)
        if alloc.username != request.username:
            raise TurnError(441)
        return alloc

    def _live_allocation(self, flow: ClientFlow, now: float) -> _Allocation | None:
        alloc = self._by_flow.get(flow)
        return alloc if alloc is not None and alloc.expires > now else None

    # Responses

    def _respond(
        self,
        flow: ClientFlow,
        response: Message | bytes,
        request: _Request | None,
        message: Message,
    ) -> None:
        if isinstance(response, Message):
            response = self._encode_response(response, request, message)
        self._push(SendToClient(flow, response))

    def _respond_error(
        self, flow: ClientFlow, message: Message, error: TurnError, request: _Request | None
    ) -> None:
        self.stats.errors[_method(message.method), error.code] += 1
        response = stun.error_response(message, error.code, error.reason)
        for attr, value in error.attributes:
            response.add(attr, value)
        self._respond(flow, response, request, message)

    def _encode_response(
        self, response: Message, request: _Request | None, message: Message
    ) -> bytes:
        fingerprint = message.get(AttrType.FINGERPRINT) is not None
        if request is None:
            return stun.encode(response, fingerprint=fingerprint)
        return stun.encode(
            response, integrity_key=request.key, sha256=request.sha256, fingerprint=fingerprint
        )

    # Lifecycle

    def _schedule(self, alloc: _Allocation, when: float) -> None:
        if alloc.wakeup is None or when < alloc.wakeup:
            alloc.wakeup = when
            heapq.heappush(self._timers, (when, next(self._seq), alloc.relay_port))

    def _sweep(self, alloc: _Allocation, now: float) -> None:
        """Expire what is due in one allocation, then schedule its next deadline."""
        if alloc.expires <= now:
            self._delete_allocation(alloc, "expired")
            return
        self._revoke_paths(alloc)  # before a channel is forgotten with its paths
        for ip in [ip for ip, expires in alloc.permissions.items() if expires <= now]:
            del alloc.permissions[ip]
        for channel in list(alloc.channels.values()):
            if channel.expires + CHANNEL_COOLDOWN <= now:
                del alloc.channels[channel.number]
                del alloc.channel_by_peer[channel.peer]
        self._sync_routes(alloc, now)
        deadlines = [alloc.expires, *alloc.permissions.values()]
        for channel in alloc.channels.values():
            deadlines.append(
                channel.expires if channel.expires > now else channel.expires + CHANNEL_COOLDOWN
            )
        self._schedule(alloc, min(deadlines))

    def _sync_routes(self, alloc: _Allocation, now: float) -> None:
        """A channel is in the fast path iff it is bound, its peer has a permission and the
        client uses UDP. Every change of those goes through here, and so does every change of
        the permissions the runtime is told of; the paths handed out are revoked with it."""
        self._revoke_paths(alloc)
        live = {ip for ip, expires in alloc.permissions.items() if expires > now}
        for ip in live - alloc.announced:
            self._push(AddPermission(alloc.relay_port, ip))
        for ip in alloc.announced - live:
            self._push(RemovePermission(alloc.relay_port, ip))
        alloc.announced = live
        for channel in alloc.channels.values():
            wanted = (
                alloc.flow.transport == Transport.UDP
                and channel.expires > now
                and alloc.has_permission(channel.peer.ip, now)
            )
            if wanted != channel.routed:
                channel.routed = wanted
                route = ChannelRoute(
                    alloc.flow.client, channel.number, alloc.relay_port, channel.peer
                )
                self._push(InstallChannel(route) if wanted else RemoveChannel(route))

    def _revoke_paths(self, alloc: _Allocation) -> None:
        for channel in alloc.channels.values():
            if channel.to_peer is not None:
                channel.to_peer.revoke()
                channel.to_peer = None
            if channel.to_client is not None:
                channel.to_client.revoke()
                channel.to_client = None

    def _delete_allocation(
        self, alloc: _Allocation, reason: str, *, port_open: bool = True
    ) -> None:
        self._revoke_paths(alloc)
        for channel in alloc.channels.values():
            if channel.routed:
                channel.routed = False
                route = ChannelRoute(
                    alloc.flow.client, channel.number, alloc.relay_port, channel.peer
                )
                self._push(RemoveChannel(route))
        for ip in alloc.announced:
            self._push(RemovePermission(alloc.relay_port, ip))
        alloc.announced = set()
        del self._by_flow[alloc.flow]
        del self._by_port[alloc.relay_port]
        self._quotas.release(alloc.username, alloc.flow.client.ip)
        if self._siblings is not None:
            self._siblings.closed(alloc.relay_port)
        self._ports.release(alloc.relay_port)
        if port_open:
            self._push(CloseRelayPort(alloc.relay_port))
        self._push(AllocationClosed(alloc.flow, alloc.relay_port, reason, alloc.traffic))

    # Plumbing

    def _push(self, command: Command) -> None:
        self._commands.append(command)

    def _drop(self, reason: Drop) -> None:
        self.stats.drops[reason] += 1


# The 508 reason when `RelayPorts.acquire` finds nothing, by (even, pair).
_NO_PORT = {
    (False, False): "No relay port free",
    (True, False): "No even relay port free",
    (True, True): "No even/odd relay port pair free",
}

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _decode(decoder: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """An attribute decoder whose StunDecodeError becomes 400 Bad Request."""
    try:
        return decoder(*args, **kwargs)
    except stun.StunDecodeError as exc:
        raise TurnError(400, str(exc)[:100] or "Malformed attribute") from exc


def _granted_lifetime(message: Message, *, default: int) -> int:
    value = message.get(AttrType.LIFETIME)
    if value is None:
        return default
    requested = _decode(stun.decode_u32, value)
    return max(default, min(requested, MAX_ALLOCATION_LIFETIME))


def _method(number: int) -> int:
    """The `Method` of `number` when it is one (so counters show its name), else the number."""
    try:
        return Method(number)
    except ValueError:
        return number


__all__ = [
    "AllocationInfo",
    "Drop",
    "RelayPorts",
    "ServerConfig",
    "SiblingAllocations",
    "TurnError",
    "TurnServer",
]
