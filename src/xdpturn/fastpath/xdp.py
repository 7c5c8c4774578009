"""The XDP-backed fast path: loads bpf/xdpturn.bpf.o, attaches it, and keeps its maps.

Only the server calls this (through `open_fastpath`). Map updates that fail are logged, never
raised: Python relays whatever the kernel does not.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath import maps
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


class XdpFastPath:
    """Implements the FastPath protocol with the XDP program. Raises on load/attach failure."""

    def __init__(self, config: FastPathConfig, object_path: Path = OBJECT_PATH) -> None:
        if config.mode is FastPathMode.OFF:
            raise ValueError("XdpFastPath with mode off")
        self._config = config
        self._attachments: list[_Attachment] = []
        self._routes: dict[tuple[ClientAddr, int], ChannelRoute] = {}
        self._port_users: dict[int, int] = {}
        self._next_hops: NextHops | None = None
        self._keeper: NextHopKeeper | None = None  # _next_hops, unless keep_next_hops_with
        self._route_count: Callable[[], int] | None = None  # see count_routes_with
        self._check = CarryingCheck()
        self._obj = bpf.BpfObject(object_path)
        try:
            btf = bpf.read_btf(object_path)
            maps.check_layout(object_path, btf)
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
            self._write_config()
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
                self._attach(ifname)
            self._next_hops.start()
            self._keeper = self._next_hops
        except BaseException:
            self.close()
            raise

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

    def _attach(self, ifname: str) -> None:
        ifindex = socket.if_nametoindex(ifname)
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
            prog_id = bpf.xdp_query(ifindex).prog_id
            self._attachments.append(_Attachment(ifname, ifindex, flags, prog_id))
            kind = "native" if flags == bpf.XDP_FLAGS_DRV_MODE else "generic"
            log.info("XDP program attached to %s (%s mode)", ifname, kind)
            return
        assert last is not None
        raise last

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


def open_fastpath(config: FastPathConfig) -> FastPath:
    """Load and attach the XDP program per `config`; on failure log why and return NullFastPath."""
    if config.mode is FastPathMode.OFF:
        log.info("fast path off (configured)")
        return NullFastPath()
    try:
        return XdpFastPath(config)
    except (OSError, ValueError) as e:
        log.warning("fast path unavailable, Python relays everything: %s", e)
        return NullFastPath()
