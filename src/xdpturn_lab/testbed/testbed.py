"""Bring a `Topology` up in network namespaces, run things inside it, and always tear it down.

Namespaces are named `PREFIX-PID-START-TAG-NODE`: PID and START (the owner's start time in clock
ticks, so a reused pid is not mistaken for the owner) identify the process that owns the run, TAG
tells apart runs of one process. A run whose owner is gone is removed by the next `Testbed.up()`
(`cleanup_stale`). Every interface lives inside a namespace of the run, so interface names are
fixed and short (`eth0`, `wan0`, `lan0`, `to-NODE`) and there is no link to the root namespace.

Node ids (accepted wherever a node is expected, as are the namespace names themselves):
`inet` (the internet router), each relay's name, `RELAY-nat` (its 1:1 NAT), each site's name (the
host) and `SITE-nat` (its NAT router).
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, ParamSpec, TypeVar

from xdpturn_lab.testbed import netns, xdp
from xdpturn_lab.testbed.counters import LinkCounters, ethtool_stats, link_counters
from xdpturn_lab.testbed.topology import (
    Link,
    Topology,
    relay_inside,
    relay_uplink,
    site_lan,
    site_uplink,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

DEFAULT_PREFIX = "xtb"
INET = "inet"
HOST_IF = "eth0"  # a relay's or a site host's only interface
WAN_IF = "wan0"  # a NAT router's internet side
LAN_IF = "lan0"  # a NAT router's inside

_PREFIX_RE = re.compile(r"[a-z]{1,8}\Z")
_NS_RE = re.compile(
    r"(?P<prefix>[a-z]+)-(?P<pid>\d+)-(?P<start>\d+)-(?P<tag>[0-9a-f]+)-(?P<node>.+)\Z"
)

_BASE_SYSCTLS = {
    # Addresses usable at once, and no surprise autoconfiguration or redirects.
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.accept_ra": "0",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv6.conf.all.accept_redirects": "0",
    "net.ipv6.conf.default.accept_redirects": "0",
    "net.ipv4.conf.all.accept_redirects": "0",
    "net.ipv4.conf.default.accept_redirects": "0",
    # IPv4 conf is inherited from the root namespace; make it the same on every machine.
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
_ROUTER_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
    # A 1:1 NAT hairpins out of the interface it received on; no redirect should short-cut that.
    "net.ipv4.conf.all.send_redirects": "0",
    "net.ipv4.conf.default.send_redirects": "0",
}


IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RelayNode:
    name: str
    netns: str
    interface: str  # where the relay's XDP program goes
    local_ipv4: IPv4  # on `interface`; equals the public one unless behind 1:1 NAT
    local_ipv6: IPv6
    public_ipv4: IPv4  # what clients send to
    public_ipv6: IPv6
    nat_netns: str | None  # the 1:1 NAT router, if any
    # The veth end facing `interface`: it receives the relay's XDP_TX frames (it has an XDP_PASS
    # program for that) and sends into the relay (TX checksum offload off for that).
    upstream_netns: str
    upstream_interface: str


@dataclass(frozen=True, slots=True)
class SiteNode:
    name: str
    netns: str  # the host
    interface: str
    ipv4: IPv4  # private, never seen on the internet
    ipv6: IPv6
    nat_netns: str
    nat_public_ipv4: IPv4  # the NAT router's internet-side addresses, which peers see
    nat_public_ipv6: IPv6
    nat_wan_interface: str
    nat_lan_interface: str


NodeRef = str | RelayNode | SiteNode


# --- owner tracking and stale runs -------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses; the fields after the last ')' are fixed (starttime 22).
    return int(stat.rpartition(")")[2].split()[19])


def _kill_inside(name: str) -> None:
    """SIGKILL processes left in namespace `name` (their namespace would outlive its name)."""
    for pid in netns.pids(name):
        if pid == os.getpid():
            continue
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces of runs whose owner process is gone (and kill what still runs in them)."""
    removed: list[str] = []
    for name in netns.names():
        m = _NS_RE.match(name)
        if m is None or m["prefix"] != prefix:
            continue
        if _start_time(int(m["pid"])) == int(m["start"]):
            continue
        _kill_inside(name)
        netns.delete(name)
        removed.append(name)
    return removed


_live: set[Testbed] = set()
_live_lock = threading.Lock()
_atexit_installed = False
_signals_installed = False


def _teardown_all() -> None:
    with _live_lock:
        live = list(_live)
    for tb in live:
        tb.down()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds `with Testbed(...)` blocks, then atexit runs for the rest.
    raise SystemExit(128 + signum)


def _install_exit_hooks() -> None:
    global _atexit_installed, _signals_installed
    with _live_lock:
        if not _atexit_installed:
            atexit.register(_teardown_all)
            _atexit_installed = True
    # Only the main thread may set handlers; never override one the application installed.
    if not _signals_installed and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _exit_on_signal)
        _signals_installed = True


# --- small command helpers ---------------------------------------------------------------------


def _check(argv: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _settled(ns: str) -> bool:
    links: list[dict[str, Any]] = json.loads(_check(["ip", "-j", "-n", ns, "addr", "show"]))
    for link in links:
        if link["ifname"] == "lo":
            continue
        if link.get("operstate") != "UP":
            return False
        for addr in link.get("addr_info", []):
            if addr.get("tentative") or addr.get("dadfailed"):
                return False
    return True


def _site_nat_rules(random_ports: bool) -> str:
    flags = " fully-random" if random_ports else ""
    return f"""
table inet xtb_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{WAN_IF}" masquerade{flags}
    }}
}}
"""


def _one_to_one_rules(public: Link, inside: Link) -> str:
    # No interface match on DNAT and an unconditional SNAT: the relay sending to its own public
    # address hairpins through the NAT and sees itself as the public address, as with elastic IPs.
    return f"""
table inet xtb_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {public.b4} dnat ip to {inside.b4}
        ip6 daddr {public.b6} dnat ip6 to {inside.b6}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {inside.b4} snat ip to {public.b4}
        ip6 saddr {inside.b6} snat ip6 to {public.b6}
    }}
}}
"""


# --- the testbed -------------------------------------------------------------------------------


class Testbed:
    """A `Topology` in namespaces. Use as a context manager; `up()`/`down()` also work.

    `down()` always runs: on leaving the `with` block (also on an exception), at interpreter exit,
    and on SIGTERM/SIGHUP (turned into SystemExit when no handler was set). After SIGKILL, the next
    `up()` with the same prefix removes the leftovers.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        topology: Topology,
        *,
        prefix: str = DEFAULT_PREFIX,
        settle_timeout: float = 5.0,
    ) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"bad prefix {prefix!r}: want [a-z]{{1,8}}")
        self.topology = topology
        self.prefix = prefix
        self._owner = os.getpid()
        self.run_id = f"{self._owner}-{_start_time(self._owner)}-{secrets.token_hex(3)}"
        self._settle_timeout = settle_timeout
        self._nodes: dict[str, str] = {INET: self._ns(INET)}
        self._relays: dict[str, RelayNode] = {}
        self._sites: dict[str, SiteNode] = {}
        self._plan()
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._is_up = False

    def _ns(self, node: str) -> str:
        return f"{self.prefix}-{self.run_id}-{node}"

    def _plan(self) -> None:
        """Names and addresses of every node; pure, so they are known before `up()`."""
        for i, relay in enumerate(self.topology.relays):
            ns = self._nodes[relay.name] = self._ns(relay.name)
            public = relay_uplink(i)
            if relay.nat_1to1:
                inside = relay_inside(i)
                nat = self._nodes[f"{relay.name}-nat"] = self._ns(f"{relay.name}-nat")
                local4, local6, upstream = inside.b4, inside.b6, (nat, LAN_IF)
            else:
                nat = None
                local4, local6, upstream = (
                    public.b4,
                    public.b6,
                    (self._nodes[INET], f"to-{relay.name}"),
                )
            self._relays[relay.name] = RelayNode(
                relay.name, ns, HOST_IF, local4, local6, public.b4, public.b6, nat, *upstream
            )
        for j, site in enumerate(self.topology.sites):
            ns = self._nodes[site.name] = self._ns(site.name)
            nat = self._nodes[f"{site.name}-nat"] = self._ns(f"{site.name}-nat")
            lan, uplink = site_lan(j), site_uplink(j)
            self._sites[site.name] = SiteNode(
                site.name, ns, HOST_IF, lan.b4, lan.b6, nat, uplink.b4, uplink.b6, WAN_IF, LAN_IF
            )

    # --- lifecycle ---

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._is_up

    def up(self) -> None:
        if self._is_up:
            raise RuntimeError("testbed is already up")
        if os.geteuid() != 0:
            raise PermissionError("a testbed needs root (network namespaces, nftables, XDP)")
        cleanup_stale(self.prefix)
        _install_exit_hooks()
        with _live_lock:
            _live.add(self)
        self._is_up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop started processes and delete every namespace of the run. Idempotent."""
        if os.getpid() != self._owner:
            return  # a forked child must not tear down its parent's world
        with _live_lock:
            _live.discard(self)
        self._stop_processes()
        for ns in reversed(self._created):
            _kill_inside(ns)
            netns.delete(ns)
        self._created.clear()
        self._is_up = False

    def _stop_processes(self, grace: float = 2.0) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def _build(self) -> None:
        routers = {INET} | {n for n in self._nodes if n.endswith("-nat")}
        for node, ns in self._nodes.items():
            self._created.append(ns)  # before creating, so a half-made namespace is removed too
            netns.create(ns)
            netns.sysctl(ns, _BASE_SYSCTLS | (_ROUTER_SYSCTLS if node in routers else {}))

        setup: defaultdict[str, list[str]] = defaultdict(list)  # addresses and links, per netns
        routes: defaultdict[str, list[str]] = defaultdict(list)  # after all links are up
        inet = self._nodes[INET]

        def wire(a: tuple[str, str], b: tuple[str, str], link: Link) -> None:
            """veth a <-> b; `a` is the upstream end. Made in a's namespace, never in the root."""
            (a_ns, a_if), (b_ns, b_if) = a, b
            veth = ["type", "veth", "peer", "name", b_if, "netns", b_ns]
            _check(["ip", "-n", a_ns, "link", "add", "name", a_if, *veth])
            for ns, ifname, ip4, ip6 in (
                (a_ns, a_if, link.a4, link.a6),
                (b_ns, b_if, link.b4, link.b6),
            ):
                setup[ns] += [
                    f"addr add {link.cidr4(ip4)} dev {ifname}",
                    f"addr add {link.cidr6(ip6)} dev {ifname} nodad",
                    f"link set dev {ifname} up",
                ]
            routes[b_ns] += [f"route add default via {link.a4}", f"route add default via {link.a6}"]

        nft: dict[str, str] = {}
        for i, relay in enumerate(self.topology.relays):
            rnode = self._relays[relay.name]
            if rnode.nat_netns is not None:
                wire((inet, f"to-{relay.name}"), (rnode.nat_netns, WAN_IF), relay_uplink(i))
                wire((rnode.nat_netns, LAN_IF), (rnode.netns, HOST_IF), relay_inside(i))
                nft[rnode.nat_netns] = _one_to_one_rules(relay_uplink(i), relay_inside(i))
            else:
                wire((inet, f"to-{relay.name}"), (rnode.netns, HOST_IF), relay_uplink(i))
        for j, site in enumerate(self.topology.sites):
            snode = self._sites[site.name]
            wire((inet, f"to-{site.name}"), (snode.nat_netns, WAN_IF), site_uplink(j))
            wire((snode.nat_netns, LAN_IF), (snode.netns, HOST_IF), site_lan(j))
            nft[snode.nat_netns] = _site_nat_rules(site.random_ports)

        for ns, lines in setup.items():
            _check(["ip", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n")
        for ns, lines in routes.items():
            _check(["ip", "-n", ns, "-batch", "-"], "\n".join(lines) + "\n")
        for ns, rules in nft.items():
            _check(["ip", "netns", "exec", ns, "nft", "-f", "-"], rules)
        for rnode in self._relays.values():
            # veth leaves UDP checksums to "hardware"; the relay's XDP program would rewrite
            # them incrementally into bad ones. Completing them on the sending end avoids that.
            ns, ifname = rnode.upstream_netns, rnode.upstream_interface
            _check(["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off"])
            xdp.attach_pass(ns, ifname)
        self._wait_settled()

    def _wait_settled(self) -> None:
        deadline = time.monotonic() + self._settle_timeout
        pending = list(self._created)
        while True:
            pending = [ns for ns in pending if not _settled(ns)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"links or addresses not ready after {self._settle_timeout}s: {pending}"
                )
            time.sleep(0.01)

    # --- lookups ---

    @property
    def nodes(self) -> dict[str, str]:
        """Node id -> namespace name."""
        return dict(self._nodes)

    @property
    def namespaces(self) -> list[str]:
        return list(self._nodes.values())

    @property
    def inet_netns(self) -> str:
        return self._nodes[INET]

    @property
    def relays(self) -> list[RelayNode]:
        return list(self._relays.values())

    @property
    def sites(self) -> list[SiteNode]:
        return list(self._sites.values())

    def relay(self, name: str) -> RelayNode:
        return self._relays[name]

    def site(self, name: str) -> SiteNode:
        return self._sites[name]

    def netns_of(self, node: NodeRef) -> str:
        """Namespace of a node id, a RelayNode/SiteNode, or one of this run's namespace names."""
        if isinstance(node, RelayNode | SiteNode):
            return node.netns
        if node in self._nodes:
            return self._nodes[node]
        if node in self._nodes.values():
            return node
        raise KeyError(f"no node or namespace {node!r} here; nodes: {sorted(self._nodes)}")

    # --- running things inside ---

    def popen(self, node: NodeRef, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` inside the node's namespace; stopped (TERM, then KILL) by `down()`."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.netns_of(node), *argv], **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self, node: NodeRef, argv: Sequence[str], *, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` inside the node's namespace (checked by default)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns_of(node), *argv], check=check, **kwargs
        )

    def call(self, node: NodeRef, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call `fn` in this thread, moved into the node's namespace for the duration.

        Sockets made inside stay in that namespace, so they can be used from any thread later.
        """
        return netns.call(self.netns_of(node), fn, *args, **kwargs)

    def entered(self, node: NodeRef) -> AbstractContextManager[None]:
        """`with tb.entered("client"):` runs the block's code (this thread) in that namespace."""
        return netns.entered(self.netns_of(node))

    # --- counters and XDP ---

    def link_counters(self, node: NodeRef, ifname: str) -> LinkCounters:
        return link_counters(self.netns_of(node), ifname)

    def ethtool_stats(self, node: NodeRef, ifname: str) -> dict[str, int]:
        return ethtool_stats(self.netns_of(node), ifname)

    def attach_xdp_pass(self, node: NodeRef, ifname: str) -> None:
        """Let `ifname` receive frames its veth peer sends with XDP_TX/redirect (see `xdp`)."""
        xdp.attach_pass(self.netns_of(node), ifname)

    def __repr__(self) -> str:
        state = "up" if self._is_up else "down"
        return f"<Testbed {self.prefix}-{self.run_id} {state} nodes={sorted(self._nodes)}>"
