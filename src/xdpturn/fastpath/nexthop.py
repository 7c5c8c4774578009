"""How the XDP program reaches clients and peers without `bpf_fib_lookup`: the `next_hops` map.

`bpf_fib_lookup` answers only for an ingress device with forwarding on, and switching forwarding on
makes a host a router (and, for IPv6, deaf to router advertisements). So the loader does the
lookup the kernel would do for a socket: for every address an installed route sends to, it asks
the kernel for the route (`RTM_GETROUTE`: egress device, gateway, preferred source, MTU) and the
neighbour entry of the next hop (its MAC), and writes the answer into `next_hops`. A destination
whose neighbour is not resolved gets no entry: its packets go to Python, whose sending resolves
the neighbour; the netlink event that follows writes the entry and the kernel carries the rest.

A thread watches netlink (routes, neighbours, addresses, links) and rewrites what an event may
have changed: a new default gateway, a neighbour that changed MAC or went away, an MTU, an
address. The same thread keeps `relay_addrs` (the relay's own addresses) current.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from xdpturn.fastpath import maps
from xdpturn.fastpath.libbpf import Map
from xdpturn.fastpath.rtnl import RT_SCOPE_UNIVERSE, RTN_UNICAST, Link, Neighbour, Rtnl
from xdpturn.proto.addr import IPAddress

log = logging.getLogger("xdpturn.fastpath")

# rtnetlink multicast groups (linux/rtnetlink.h): links, neighbours, addresses and routes.
RTMGRP_LINK, RTMGRP_NEIGH = 0x1, 0x4
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
# Neighbour states whose MAC the kernel itself would use (bpf_fib_lookup accepts the same).
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE, STALE, DELAY, PROBE, PERMANENT
TICK = 5.0
MIN_REFRESH_INTERVAL = 0.05  # seconds between two rounds of resolution
_S = TypeVar("_S", socket.socket, Rtnl)
_GROUPS = (
    RTMGRP_LINK
    | RTMGRP_NEIGH
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_ROUTE
)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A destination's next hop, as written to `next_hops`."""

    ifindex: int
    neighbour: IPAddress  # the gateway, or the destination itself on a link
    src: IPAddress
    smac: bytes
    dmac: bytes
    mtu: int


class _Lookups:
    """Answers for one round of resolution: destinations behind one gateway share its neighbour
    and link lookups."""

    def __init__(self, rtnl: Rtnl) -> None:
        self.rtnl = rtnl
        self._neighbours: dict[tuple[int, IPAddress], Neighbour | None] = {}
        self._links: dict[int, Link] = {}

    def neighbour(self, ifindex: int, ip: IPAddress) -> Neighbour | None:
        key = (ifindex, ip)
        if key not in self._neighbours:
            self._neighbours[key] = self.rtnl.neighbour(ifindex, ip)
        return self._neighbours[key]

    def link(self, ifindex: int) -> Link:
        if ifindex not in self._links:
            self._links[ifindex] = self.rtnl.link(ifindex)
        return self._links[ifindex]


def resolve(lookups: _Lookups, ip: IPAddress) -> Resolved | None:
    """What the kernel would do to send to `ip`, or None when the program cannot do the same."""
    try:
        route = lookups.rtnl.route_get(ip)
        if route.type != RTN_UNICAST or route.oif is None or route.prefsrc is None:
            return None  # local, blackhole, prohibit...: Python answers as the stack says
        neighbour = route.gateway or ip
        if neighbour.version != ip.version:
            return None  # an IPv4 route via an IPv6 gateway (RTA_VIA): left to the stack
        neigh = lookups.neighbour(route.oif, neighbour)
        link = lookups.link(route.oif)
    except OSError:
        return None  # unreachable, no route, a link that just went away
    if neigh is None or not neigh.state & _NUD_USABLE or not neigh.lladdr:
        return None  # not resolved yet: the stack resolves it when Python sends
    if link.address is None or len(link.address) != 6 or len(neigh.lladdr) != 6:
        return None  # not Ethernet
    mtu = min(link.mtu, route.mtu) if route.mtu else link.mtu
    return Resolved(route.oif, neighbour, route.prefsrc, link.address, neigh.lladdr, mtu)


class NextHops:
    """Keeps `next_hops` and `relay_addrs` equal to what the kernel's tables say.

    Thread-safe: `add`/`release` run on the server's loop, netlink events on the watcher thread,
    each with its own netlink socket; `_lock` guards the bookkeeping and the map writes only, so
    a round of resolution never holds up the loop. A resolution that loses a race with a newer
    one is corrected by the event that made them differ. Sockets and the watcher thread are made
    in the calling thread's network namespace.
    """

    def __init__(
        self,
        next_hops: Map,
        relay_addrs: Map,
        interfaces: Iterable[str],
        fixed_addrs: Iterable[IPAddress],
        tick: Callable[[], object] | None = None,
    ) -> None:
        self._next_hops = next_hops
        self._relay_addrs = relay_addrs
        self._ifindexes = [socket.if_nametoindex(name) for name in interfaces]
        self._fixed = set(fixed_addrs)  # public and configured addresses, always the relay's
        self._tick = tick  # called every TICK seconds by the watcher (the health check's log)
        self._lock = threading.Lock()
        self._users: dict[IPAddress, int] = {}
        self._written: dict[IPAddress, Resolved] = {}
        self._own: set[IPAddress] = set()
        self._query_lock = threading.Lock()  # for _rtnl, which any thread may use through add()
        self._sockets: list[socket.socket | Rtnl] = []
        self._rtnl = self._keep(Rtnl())
        self._watch_rtnl = self._keep(Rtnl())  # the watcher's own
        # Events are only a cue to look again: the watcher reads them as raw bytes.
        self._mon = self._keep(
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._mon.bind((0, _GROUPS))
            self._mon.setblocking(False)
            self._sync_relay_addrs(self._rtnl)
        except BaseException:
            self._close_sockets()
            raise

    def _keep(self, s: _S) -> _S:
        self._sockets.append(s)
        return s

    def _close_sockets(self) -> None:
        for s in self._sockets:
            s.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="xdpturn-nexthops", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_sockets()

    @property
    def relay_addrs(self) -> set[IPAddress]:
        with self._lock:
            return set(self._own)

    def resolved(self, ip: IPAddress) -> Resolved | None:
        """The next hop written for `ip`, or None while there is none."""
        with self._lock:
            return self._written.get(ip)

    def add(self, ip: IPAddress) -> None:
        """`ip` is a destination of an installed route: keep its next hop."""
        with self._lock:
            self._users[ip] = self._users.get(ip, 0) + 1
            if self._users[ip] > 1:
                return
        with self._query_lock:
            found = resolve(_Lookups(self._rtnl), ip)
        self._apply({ip: found})

    def release(self, ip: IPAddress) -> None:
        with self._lock:
            users = self._users.get(ip, 0) - 1
            if users > 0:
                self._users[ip] = users
                return
            self._users.pop(ip, None)
            if self._written.pop(ip, None) is not None:
                self._delete(ip)

    def refresh_all(self) -> None:
        """Resolve every destination again (what a netlink event triggers). Watcher thread only."""
        self._sync_relay_addrs(self._watch_rtnl)
        with self._lock:
            ips = list(self._users)
        lookups = _Lookups(self._watch_rtnl)
        self._apply({ip: resolve(lookups, ip) for ip in ips})

    def _apply(self, found: dict[IPAddress, Resolved | None]) -> None:
        """Write what changed, for destinations still in use."""
        with self._lock:
            for ip, new in found.items():
                if ip not in self._users or self._written.get(ip) == new:
                    continue
                try:
                    if new is None:
                        del self._written[ip]
                        self._delete(ip)
                        log.info("fast path: no next hop for %s; Python relays it for now", ip)
                        continue
                    key, value = maps.next_hop_entry(
                        ip, new.ifindex, new.src, new.smac, new.dmac, new.mtu
                    )
                    self._next_hops.update(bytes(key), bytes(value))
                    self._written[ip] = new
                    log.debug("fast path: next hop for %s via %s", ip, new.neighbour)
                except OSError as e:
                    log.warning("fast path: next hop for %s not written: %s", ip, e)

    def _delete(self, ip: IPAddress) -> None:
        try:
            self._next_hops.delete(bytes(maps.addr_key(ip)))
        except OSError as e:
            log.warning("fast path: next hop for %s not deleted: %s", ip, e)

    def _sync_relay_addrs(self, rtnl: Rtnl) -> None:
        own = set(self._fixed)
        for index in self._ifindexes:
            try:
                for a in rtnl.addresses(index):
                    if a.scope == RT_SCOPE_UNIVERSE:  # link-local addresses carry no TURN
                        own.add(a.ip)
            except OSError:
                continue  # an interface that went away has no addresses
        with self._lock:
            self._write_relay_addrs(own)

    def _write_relay_addrs(self, own: set[IPAddress]) -> None:
        for ip in own - self._own:
            self._relay_addrs.update(bytes(maps.addr_key(ip)), b"\x01")
        for ip in self._own - own:
            try:
                self._relay_addrs.delete(bytes(maps.addr_key(ip)))
            except OSError as e:
                log.warning("fast path: relay address %s not deleted: %s", ip, e)
        if own != self._own:
            log.info("fast path: relay addresses %s", ", ".join(sorted(map(str, own))) or "none")
        self._own = own

    # --- netlink events ---------------------------------------------------------------------

    def _watch(self) -> None:
        fd = self._mon.fileno()
        next_tick = time.monotonic() + TICK
        last_refresh = 0.0
        while not self._stop.is_set():
            if self._tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK
                try:
                    self._tick()
                except Exception:
                    log.exception("fast path: health check")
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    continue
                # A burst of events (a link flap, many neighbours) makes one round, not many.
                self._stop.wait(max(0.0, last_refresh + MIN_REFRESH_INTERVAL - time.monotonic()))
                while True:
                    try:
                        self._mon.recv(1 << 16)
                    except BlockingIOError:
                        break
            except OSError as e:  # ENOBUFS: events were lost; resolving everything recovers
                log.warning("fast path: netlink events lost (%s); resolving all next hops", e)
            try:
                last_refresh = time.monotonic()
                self.refresh_all()
            except Exception:  # the watcher must outlive any one bad round
                log.exception("fast path: resolving next hops")
