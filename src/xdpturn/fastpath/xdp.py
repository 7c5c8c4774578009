"""The XDP-backed fast path: loads bpf/xdpturn.bpf.o, attaches it, and keeps its maps.

Only the server calls this (through `open_fastpath`). Map updates that fail are logged, never
raised: Python relays whatever the kernel does not.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath import maps, pinning
from xdpturn.fastpath.api import (
    FastPath,
    FastPathConfig,
    FastPathCounters,
    FastPathMode,
    NullFastPath,
)
from xdpturn.fastpath.guard import Guard
from xdpturn.fastpath.health import CarryingCheck
from xdpturn.fastpath.nexthop import NextHops
from xdpturn.proto.addr import ClientAddr, ClientFlow, IPAddress
from xdpturn.proto.commands import ChannelRoute
from xdpturn.proto.meter import AllocationTraffic

log = logging.getLogger("xdpturn.fastpath")

OBJECT_PATH = Path(__file__).parent / "bpf" / "xdpturn.bpf.o"
PROGRAM_NAME = "xdpturn"


class NextHopKeeper(Protocol):
    """Keeps the next hop of every destination of an installed route (`NextHops`)."""

    def add(self, ip: IPAddress) -> None: ...
    def release(self, ip: IPAddress) -> None: ...


@dataclass
class _Attachment:
    ifname: str
    ifindex: int
    flags: int  # the mode flag it was attached with
    prog_id: int


@dataclass(frozen=True)
class KeptEntries:
    """The keys and ports of the adopted maps that one process needs after restoring its
    allocations (`XdpFastPath.kept_entries`): settling removes everything else. Plain data, so
    a worker can hand its own to the supervisor."""

    chan_to_udp: frozenset[bytes] = frozenset()
    udp_to_chan: frozenset[bytes] = frozenset()
    routed_ports: frozenset[int] = frozenset()
    clients: frozenset[bytes] = frozenset()  # guard_clients keys
    permissions: frozenset[bytes] = frozenset()  # guard_permissions keys
    allocation_ports: frozenset[int] = frozenset()

    @staticmethod
    def union(kept: Iterable[KeptEntries]) -> KeptEntries:
        parts = list(kept)
        return KeptEntries(
            *(frozenset().union(*(getattr(k, name) for k in parts)) for name in _KEPT_FIELDS)
        )

    def to_plain(self) -> dict[str, list[Any]]:
        return {
            name: sorted(v.hex() if isinstance(v, bytes) else v for v in getattr(self, name))
            for name in _KEPT_FIELDS
        }

    @staticmethod
    def from_plain(data: dict[str, list[Any]]) -> KeptEntries:
        """Raises ValueError/TypeError/KeyError on what to_plain does not make."""
        values: list[frozenset[Any]] = []
        for name in _KEPT_FIELDS:
            items = data[name]
            if name.endswith("ports"):
                values.append(frozenset(int(p) for p in items))
            else:
                values.append(frozenset(bytes.fromhex(k) for k in items))
        return KeptEntries(*values)


_KEPT_FIELDS = (
    "chan_to_udp",
    "udp_to_chan",
    "routed_ports",
    "clients",
    "permissions",
    "allocation_ports",
)


class XdpFastPath:
    """Implements the FastPath protocol with the XDP program. Raises on load/attach failure.

    With `handover` (what `keep_for_restart` of the previous process returned), the program and
    maps it pinned are adopted: this object is loaded on the pinned maps and replaces the pinned
    program where it is attached. Raises pinning.AdoptError when the pins are gone (start
    clean) and pinning.LayoutMismatch when this object's maps cannot take them over."""

    def __init__(
        self,
        config: FastPathConfig,
        object_path: Path | None = None,
        handover: dict[str, Any] | None = None,
    ) -> None:
        if config.mode is FastPathMode.OFF:
            raise ValueError("XdpFastPath with mode off")
        object_path = object_path or config.object_path or OBJECT_PATH
        self._config = config
        self._object_path = object_path
        self._attachments: list[_Attachment] = []
        self._routes: dict[tuple[ClientAddr, int], ChannelRoute] = {}
        self._port_users: dict[int, int] = {}
        self._next_hops: NextHops | None = None
        self._keeper: NextHopKeeper | None = None  # _next_hops, unless keep_next_hops_with
        self._route_count: Callable[[], int] | None = None  # see count_routes_with
        self._check = CarryingCheck()
        self.adopted = False
        self._adopted_ports: list[int] = []
        btf = bpf.read_btf(object_path)
        maps.check_layout(object_path, btf)
        self._shapes = bpf.BpfObject.map_shapes(object_path)
        pins = self._open_pins(handover, btf) if handover is not None else None
        try:
            self._obj = bpf.BpfObject(object_path, reuse=pins.maps if pins else None)
        except BaseException:
            if pins is not None:
                pins.close()
            raise
        try:
            self._route_names = maps.route_names(btf)
            self._reason_names = maps.reason_names(btf)
            self._drop_names = maps.drop_names(btf)
            self.prog_fd = self._obj.program_fd(PROGRAM_NAME)
            self.chan_to_udp = self._obj.map("chan_to_udp")
            self.udp_to_chan = self._obj.map("udp_to_chan")
            self.relay_ports = self._obj.map("relay_ports")
            self.config_map = self._obj.map("config")
            self.route_stats = self._obj.map("route_stats")
            self.pass_stats = self._obj.map("pass_stats")
            self.drop_stats = self._obj.map("drop_stats")
            self.alloc_meters = self._obj.map("alloc_meters")
            self.alloc_limits = self._obj.map("alloc_limits")
            self.meter_config = self._obj.map("meter_config")
            self._write_config()
            self._write_meter_config()
            fixed: list[IPAddress] = [
                ip
                for ip in (
                    config.public_ipv4,
                    config.public_ipv6,
                    config.local_ipv4,
                    config.local_ipv6,
                )
                if ip is not None
            ]
            self.next_hops_map = self._obj.map("next_hops")
            self.relay_addrs_map = self._obj.map("relay_addrs")
            self._next_hops = NextHops(
                self.next_hops_map,
                self.relay_addrs_map,
                config.interfaces,
                fixed,
                tick=self.problem,
            )
            self.guard = Guard(self._obj, config.guard)
            for ifname in config.interfaces:
                self._attach(ifname, pins)
            if pins is not None and handover is not None:
                # Interfaces the previous process used and this one is not told to: let go.
                for ifname in set(handover.get("interfaces", [])) - set(config.interfaces):
                    pinning.detach_if_attached(str(ifname), pins.program_id)
            self._next_hops.start()
            self._keeper = self._next_hops
        except BaseException:
            self.close()
            raise
        finally:
            if pins is not None:
                pins.close()
        if pins is not None:
            # Adopted: the pins have done their job; this process pins again when it stops.
            pinning.remove_pins(pins.dir)
            self.adopted = True

    def _open_pins(self, handover: dict[str, Any], btf: bpf.BtfInfo) -> pinning.Pins:
        pin_dir = self._config.pin_dir
        if pin_dir is None:
            raise pinning.AdoptError("no pin directory configured")
        names = handover.get("maps")
        saved_layouts = handover.get("layouts")
        ports = handover.get("ports_in_use")
        if (
            not isinstance(names, list)
            or not isinstance(saved_layouts, dict)
            or not isinstance(ports, list)
            or not all(isinstance(p, int) and 0 <= p <= 0xFFFF for p in ports)
        ):
            raise pinning.AdoptError("the saved fast path section is malformed")
        self._adopted_ports = ports
        pins = pinning.open_pins(pin_dir, [str(n) for n in names])
        try:
            if pins.program_id != handover.get("program_id"):
                raise pinning.AdoptError(
                    f"the pinned program is {pins.program_id}, the state names "
                    f"{handover.get('program_id')}"
                )
            pinning.check_fits(pins, saved_layouts, self._shapes, btf)
        except BaseException:
            pins.close()
            raise
        return pins

    def _write_config(self) -> None:
        c = self._config
        # Without a configured source address, each destination's next hop supplies one: the
        # address the kernel would choose, as for a socket bound to the wildcard.
        cfg = maps.make_config(c.turn_port, c.local_ipv4, c.local_ipv6)
        self.config_map.update(b"\x00" * 4, bytes(cfg))
        log.info(
            "fast path config: turn port %d, source IPv4 %s, IPv6 %s",
            c.turn_port,
            c.local_ipv4 or "per route",
            c.local_ipv6 or "per route",
        )

    def _write_meter_config(self) -> None:
        rate = self._config.allocation_rate_bps or 0
        cfg = maps.MeterConfig(
            rate_bps=rate,
            burst_ns=round(self._config.allocation_burst * 1e9),
            flags=maps.METER_ENABLED,
        )
        self.meter_config.update(b"\x00" * 4, bytes(cfg))

    def _attach(self, ifname: str, pins: pinning.Pins | None = None) -> None:
        ifindex = socket.if_nametoindex(ifname)
        if pins is not None:
            attached = bpf.xdp_query(ifindex)
            if attached.prog_id == pins.program_id:
                # One atomic swap: every packet meets the old program or the new one.
                flags = pinning.mode_flags(attached.mode)
                bpf.xdp_attach(ifindex, self.prog_fd, flags, old_prog_fd=pins.program_fd)
                self._attached(ifname, ifindex, flags, "replaced the previous process's program")
                return
        mode = self._config.mode
        tries: list[int] = []
        if mode in (FastPathMode.AUTO, FastPathMode.XDP):
            tries.append(bpf.XDP_FLAGS_DRV_MODE)
        if mode in (FastPathMode.AUTO, FastPathMode.GENERIC):
            tries.append(bpf.XDP_FLAGS_SKB_MODE)
        last: OSError | None = None
        for flags in tries:
            try:
                # UPDATE_IF_NOEXIST: never replace someone else's program.
                bpf.xdp_attach(ifindex, self.prog_fd, flags | bpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
            except OSError as e:
                if flags == bpf.XDP_FLAGS_DRV_MODE and len(tries) > 1:
                    log.info("native XDP on %s failed (%s), trying generic", ifname, e)
                last = e
                continue
            self._attached(ifname, ifindex, flags, "attached")
            return
        assert last is not None
        raise last

    def _attached(self, ifname: str, ifindex: int, flags: int, how: str) -> None:
        prog_id = bpf.xdp_query(ifindex).prog_id
        self._attachments.append(_Attachment(ifname, ifindex, flags, prog_id))
        kind = "native" if flags == bpf.XDP_FLAGS_DRV_MODE else "generic"
        log.info("XDP program %s on %s (%s mode)", how, ifname, kind)

    @property
    def config(self) -> FastPathConfig:
        return self._config

    @property
    def mode(self) -> str:
        if not self._attachments:
            return "off"
        native = all(a.flags == bpf.XDP_FLAGS_DRV_MODE for a in self._attachments)
        return "native" if native else "generic"

    @property
    def interfaces(self) -> dict[str, str]:
        """Attached interfaces and their mode ("native"/"generic")."""
        return {
            a.ifname: "native" if a.flags == bpf.XDP_FLAGS_DRV_MODE else "generic"
            for a in self._attachments
        }

    def install(self, route: ChannelRoute) -> None:
        ident = (route.client, route.channel)
        old = self._routes.get(ident)
        if old == route:
            return
        if old is not None:
            self.remove(old)
        ck, cv = maps.chan_entry(route.client, route.channel, route.relay_port, route.peer)
        uk, uv = maps.udp_entry(route.client, route.channel, route.relay_port, route.peer)
        if self._keeper is not None:
            self._keeper.add(route.client.ip)
            self._keeper.add(route.peer.ip)
        try:
            # The reverse direction first: a ChannelData packet never finds half a route.
            self.udp_to_chan.update(bytes(uk), bytes(uv))
            self.chan_to_udp.update(bytes(ck), bytes(cv))
            self._port_use(route.relay_port, +1)
        except OSError as e:
            log.warning("fast path: install %s failed: %s", route, e)
            self._delete_quietly(bytes(ck), bytes(uk))
            self._release_next_hops(route)
            return
        self._routes[ident] = route

    def remove(self, route: ChannelRoute) -> None:
        ident = (route.client, route.channel)
        if self._routes.get(ident) != route:
            return
        del self._routes[ident]
        ck, _ = maps.chan_entry(route.client, route.channel, route.relay_port, route.peer)
        uk, _ = maps.udp_entry(route.client, route.channel, route.relay_port, route.peer)
        self._delete_quietly(bytes(ck), bytes(uk))
        self._release_next_hops(route)
        try:
            self._port_use(route.relay_port, -1)
        except OSError as e:
            log.warning("fast path: releasing port %d failed: %s", route.relay_port, e)

    def _release_next_hops(self, route: ChannelRoute) -> None:
        if self._keeper is not None:
            self._keeper.release(route.client.ip)
            self._keeper.release(route.peer.ip)

    def keep_next_hops_with(self, keeper: NextHopKeeper) -> None:
        """Hand the destinations of this process's routes to `keeper` instead of the watcher
        this object started. A worker process (server.workers) inherits the object across fork
        but not the watcher thread, and shares its netlink sockets with the other workers: it
        passes them to the supervisor, whose one watcher counts every worker's routes."""
        self._keeper = keeper

    @property
    def next_hops(self) -> NextHops | None:
        """The next-hop keeper (None once closed)."""
        return self._next_hops

    def _delete_quietly(self, chan_key: bytes, udp_key: bytes) -> None:
        for m, key in ((self.chan_to_udp, chan_key), (self.udp_to_chan, udp_key)):
            try:
                m.delete(key)
            except OSError as e:
                log.warning("fast path: delete from %s failed: %s", m.name, e)

    def _port_use(self, port: int, delta: int) -> None:
        users = self._port_users.get(port, 0) + delta
        self.relay_ports.update(port.to_bytes(4, "little"), users.to_bytes(4, "little"))
        if users:
            self._port_users[port] = users
        else:
            self._port_users.pop(port, None)

    def allocation_opened(self, flow: ClientFlow, relay_port: int) -> None:
        self.guard.allocation_opened(flow, relay_port)

    def allocation_closed(self, flow: ClientFlow, relay_port: int) -> None:
        self.guard.allocation_closed(flow, relay_port)

    def permit(self, relay_port: int, peer: IPAddress) -> None:
        self.guard.permit(relay_port, peer)

    def unpermit(self, relay_port: int, peer: IPAddress) -> None:
        self.guard.unpermit(relay_port, peer)

    @property
    def routes(self) -> int:
        """Number of installed channel routes."""
        return len(self._routes)

    def counters(self) -> FastPathCounters:
        out = FastPathCounters()
        for i, name in enumerate(self._route_names):
            packets = nbytes = 0
            for raw in self.route_stats.lookup_percpu(i.to_bytes(4, "little")):
                s = maps.RouteStats.from_buffer_copy(raw)
                packets += s.packets
                nbytes += s.bytes
            out.routes[name] = (packets, nbytes)
        for i, name in enumerate(self._reason_names):
            raws = self.pass_stats.lookup_percpu(i.to_bytes(4, "little"))
            out.passes[name] = sum(int.from_bytes(r, "little") for r in raws)
        for i, name in enumerate(self._drop_names):
            raws = self.drop_stats.lookup_percpu(i.to_bytes(4, "little"))
            out.drops[name] = sum(int.from_bytes(r, "little") for r in raws)
        return out

    def problem(self) -> str | None:
        if not self._attachments:
            return None  # not attached: the mode says so
        routes = self._route_count() if self._route_count is not None else self.routes
        return self._check.update(self.counters(), routes)

    def count_routes_with(self, count: Callable[[], int]) -> None:
        """Judge whether the kernel carries by `count()` routes rather than this object's own:
        the supervisor of several workers installs none itself (server.workers)."""
        self._route_count = count

    def kept_entries(self) -> KeptEntries:
        """The map entries this process's routes, allocations and permissions need."""
        chan: set[bytes] = set()
        udp: set[bytes] = set()
        for route in self._routes.values():
            ck, _ = maps.chan_entry(route.client, route.channel, route.relay_port, route.peer)
            uk, _ = maps.udp_entry(route.client, route.channel, route.relay_port, route.peer)
            chan.add(bytes(ck))
            udp.add(bytes(uk))
        return KeptEntries(
            chan_to_udp=frozenset(chan),
            udp_to_chan=frozenset(udp),
            routed_ports=frozenset(self._port_users),
            clients=self.guard.client_keys(),
            permissions=frozenset(self.guard.permitted),
            allocation_ports=frozenset(self.guard.allocation_ports),
        )

    @property
    def ports_in_use(self) -> set[int]:
        """Routed ports and allocation ports (the guard's): a later settle looks at these only."""
        return set(self._port_users) | self.guard.allocation_ports

    def settle(self) -> None:
        """After an adoption, once the core has installed its routes again: delete the entries
        the adopted maps hold beyond them (channels that lapsed while no process ran)."""
        self.settle_with([self.kept_entries()])

    def settle_with(self, kept: list[KeptEntries]) -> None:
        """`settle` for the entries of several processes (the workers that share these maps,
        each having restored its share): what none of them needs goes."""
        if not self.adopted:
            return
        wanted = KeptEntries.union(kept)
        stale = 0
        for m, keys in (
            (self.chan_to_udp, wanted.chan_to_udp),
            (self.udp_to_chan, wanted.udp_to_chan),
        ):
            present = list(m.keys())
            for key in present:
                if key not in keys:
                    stale += m.delete(key)
        # relay_ports is an array of every port: only those the old process used are looked at.
        for port in self._adopted_ports:
            if port not in wanted.routed_ports:
                self.relay_ports.update(port.to_bytes(4, "little"), (0).to_bytes(4, "little"))
                stale += 1
        stale += self.guard.settle(
            self._adopted_ports, wanted.clients, wanted.permissions, wanted.allocation_ports
        )
        log.info(
            "fast path adopted: %d routes kept, %d stale entries removed",
            len(wanted.chan_to_udp),
            stale,
        )

    def keep_for_restart(self, more_ports: Iterable[int] = ()) -> dict[str, Any]:
        """Stop for a restart: pin the program and every map of the object under the configured
        pin directory, leave the program attached, free this process's handles. Returns what
        the next process needs (saved with the core's state). `more_ports`: the ports in use by
        other processes sharing the maps (the workers')."""
        pin_dir = self._config.pin_dir
        if pin_dir is None:
            raise RuntimeError("keep_for_restart without a pin directory")
        names = sorted(self._shapes)
        fds = {name: self._obj.map(name).fd for name in names}
        pinning.pin(pin_dir, self.prog_fd, fds)
        handover = {
            "maps": names,
            "map_shapes": pinning.shapes_plain(self._shapes),
            "layouts": pinning.layouts(bpf.read_btf(self._object_path)),
            "program_id": bpf.prog_id_of(self.prog_fd),
            # Routed ports and allocation ports (the guard's): settle looks at these only.
            "ports_in_use": sorted(self.ports_in_use | set(more_ports)),
            "interfaces": [a.ifname for a in self._attachments],
        }
        log.info(
            "fast path kept for a restart: program and %d maps pinned in %s", len(names), pin_dir
        )
        self._keeper = None
        if self._next_hops is not None:
            self._next_hops.close()  # the maps keep the last next hops until the next process
            self._next_hops = None
        self._attachments.clear()  # not detached: the kernel keeps relaying
        self._obj.close()
        return handover

    def open_allocation(self, relay_port: int) -> None:
        key = relay_port.to_bytes(4, "little")
        zero = bytes(self.alloc_meters.slot_size * self.alloc_meters.cpus)
        try:
            # Created only if absent: close_allocation deletes every meter, so one found here
            # is this allocation's, kept across a restart that adopted the maps; counting goes on.
            self.alloc_meters.update(key, zero, bpf.BPF_NOEXIST)
        except OSError as e:
            if e.errno != errno.EEXIST:
                log.warning("fast path: metering port %d failed: %s", relay_port, e)

    def close_allocation(self, relay_port: int) -> AllocationTraffic:
        key = relay_port.to_bytes(4, "little")
        traffic = AllocationTraffic()
        try:
            per_cpu = self.alloc_meters.lookup_percpu(key)
            if per_cpu:
                traffic = maps.meter_traffic(per_cpu)
            self.alloc_meters.delete(key)
            self.alloc_limits.delete(key)
        except OSError as e:
            log.warning("fast path: reading the meter of port %d failed: %s", relay_port, e)
        return traffic

    def allocation_traffic(self) -> dict[int, AllocationTraffic]:
        return {
            int.from_bytes(key, "little"): maps.meter_traffic(per_cpu)
            for key, per_cpu in self.alloc_meters.items_percpu()
        }

    def close(self) -> None:
        """Detach from every interface (only if our program is still the one attached), free."""
        self._keeper = None
        if self._next_hops is not None:
            self._next_hops.close()
            self._next_hops = None
        while self._attachments:
            a = self._attachments.pop()
            try:
                if bpf.xdp_query(a.ifindex).prog_id == a.prog_id:
                    bpf.xdp_detach(a.ifindex, a.flags)
                    log.info("XDP program detached from %s", a.ifname)
            except OSError as e:
                log.warning("detaching XDP from %s failed: %s", a.ifname, e)
        self._obj.close()


def attached_counters(interface: str | int, object_path: Path = OBJECT_PATH) -> FastPathCounters:
    """The counters of the xdpturn program attached to `interface` (a name or an ifindex), read
    from outside the process that loaded it, e.g. by a test while `xdpturn serve` runs.

    The interface is resolved in the calling thread's network namespace (from a testbed:
    `tb.call(relay, attached_counters, "eth0")`); BPF ids are global. Counter names come from the
    BTF of `object_path`, the object the server loads. Raises LookupError when no program is
    attached or it has no xdpturn counter maps, OSError on BPF failures (root is needed).
    """
    ifindex = interface if isinstance(interface, int) else socket.if_nametoindex(interface)
    prog_id = bpf.xdp_query(ifindex).prog_id
    if prog_id == 0:
        raise LookupError(f"no XDP program attached to {interface}")
    found: dict[str, bpf.Map] = {}
    try:
        for map_id in bpf.prog_map_ids(prog_id):
            name, m = bpf.map_by_id(map_id)
            if name in ("route_stats", "pass_stats", "drop_stats") and name not in found:
                found[name] = m
            else:
                os.close(m.fd)
        if not {"route_stats", "pass_stats"} <= set(found):
            raise LookupError(f"program {prog_id} on {interface} has no xdpturn counter maps")
        if found["route_stats"].value_size != ctypes.sizeof(maps.RouteStats):
            raise LookupError(f"program {prog_id} on {interface}: route_stats is not xdpturn's")
        btf = bpf.read_btf(object_path)
        out = FastPathCounters()
        for i, route in enumerate(maps.route_names(btf)):
            raws = found["route_stats"].lookup_percpu(i.to_bytes(4, "little"))
            stats = [maps.RouteStats.from_buffer_copy(raw) for raw in raws]
            out.routes[route] = (sum(s.packets for s in stats), sum(s.bytes for s in stats))
        for i, reason in enumerate(maps.reason_names(btf)):
            raws = found["pass_stats"].lookup_percpu(i.to_bytes(4, "little"))
            out.passes[reason] = sum(int.from_bytes(r, "little") for r in raws)
        if "drop_stats" in found:
            for i, reason in enumerate(maps.drop_names(btf)):
                raws = found["drop_stats"].lookup_percpu(i.to_bytes(4, "little"))
                out.drops[reason] = sum(int.from_bytes(r, "little") for r in raws)
        return out
    finally:
        for m in found.values():
            os.close(m.fd)


def open_fastpath(config: FastPathConfig, handover: dict[str, Any] | None = None) -> FastPath:
    """Load and attach the XDP program per `config`; on failure log why and return NullFastPath.

    With `handover`, adopt what the previous process pinned (see XdpFastPath); then
    pinning.AdoptError (any failure: start clean) and pinning.LayoutMismatch are raised."""
    if config.mode is FastPathMode.OFF:
        log.info("fast path off (configured)")
        return NullFastPath()
    if handover is not None:
        try:
            return XdpFastPath(config, handover=handover)
        except (OSError, ValueError) as e:
            raise pinning.AdoptError(f"adopting the pinned program failed: {e}") from e
    try:
        return XdpFastPath(config)
    except (OSError, ValueError) as e:
        log.warning("fast path unavailable, Python relays everything: %s", e)
        return NullFastPath()
