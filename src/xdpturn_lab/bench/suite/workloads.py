"""The workloads, run the same way against every relay.

Throughput load comes from the live-frames generator (`livegen`: BPF_PROG_TEST_RUN transmitting a
crafted frame from the sender's namespace) pinned to the generator core. The frame carries the
5-tuple the relay expects: a TURN client's socket address for ChannelData (the relay knows the
allocation by it), or the peer's socket address for UDP to a relayed address. Round trips come
from `xdpturn-blast` (C), handed the TURN client's socket with `--fd`. Delivered datagrams
are counted by an nftables counter at the receiving host's prerouting hook, where they are also
dropped, so no receiving process competes for the cores; the receiving interface's rx counters are
recorded beside it. The TURN clients' event loop is blocked while a tool runs on their socket, so
the loop never reads datagrams meant for the tool (the runs are far shorter than any lifetime).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from xdpturn.client.turn import LostHandler, Receiver, TurnClient, UdpTransport
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn.proto.auth import mint_rest_credentials
from xdpturn_lab.bench import cpdriver, livegen, tools
from xdpturn_lab.bench.suite import search, system
from xdpturn_lab.bench.suite.relays import GENERATOR_CPU, RELAY_CPU, RelayUnderTest
from xdpturn_lab.testbed.counters import LinkCounters, link_counters
from xdpturn_lab.testbed.scenario import netns_socket
from xdpturn_lab.testbed.testbed import RelayNode, Testbed

HOST_IF = "eth0"
STEP_TIMEOUT = 10.0
PEER_PORT = 9000  # the plain UDP peer's port on the peer host (outside the ephemeral range)
CEILING_PORT = 9100

# family name -> (family clients reach the relay with, relayed/peer family)
FAMILIES: dict[str, tuple[Family, Family]] = {
    "ipv4": (Family.IPV4, Family.IPV4),
    "ipv6": (Family.IPV6, Family.IPV6),
    "cross": (Family.IPV4, Family.IPV6),  # client side IPv4, peer side IPv6
}


@dataclass(frozen=True)
class Hosts:
    """The testbed's nodes: the relay, and the public hosts of the client and the peer."""

    tb: Testbed
    relay: RelayNode
    client: RelayNode
    peer: RelayNode
    relay_napi: tuple[int, ...] = ()  # the NAPI thread(s) receiving on the relay's interface
    return_napi: tuple[int, ...] = ()  # the next hop's, taking in the relay's output

    def ip(self, host: RelayNode, family: Family) -> str:
        return str(host.public_ipv4 if family is Family.IPV4 else host.public_ipv6)


def _af(family: Family) -> int:
    return socket.AF_INET6 if family is Family.IPV6 else socket.AF_INET


def _addr(a: TransportAddr) -> tools.Address:
    return (str(a.ip), a.port)


def gen_prefix(netns_name: str) -> list[str]:
    return [*tools.netns_prefix(netns_name), "taskset", "-c", GENERATOR_CPU]


# --- TURN endpoints whose socket a tool can use --------------------------------------------------


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, receiver: Receiver, lost: LostHandler) -> None:
        self._receiver = receiver
        self._lost = lost

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._receiver(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors; the client's retransmissions cope

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)


@dataclass
class Turn:
    client: TurnClient
    sock: socket.socket
    transport: UdpTransport
    channel: int | None = None

    @property
    def local_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def relayed(self, family: Family) -> TransportAddr:
        return next(a for a in self.client.relayed if a.family is family)


async def open_turn(
    ns: str, server: TransportAddr, secret: str, relayed: Family, user: str
) -> Turn:
    """A connected UDP socket in namespace `ns`, a TurnClient on it, and one allocation."""
    creds = mint_rest_credentials(secret, now=time.time(), ttl=3600, user_id=user)
    kept: list[tuple[socket.socket, UdpTransport]] = []

    async def opener(srv: TransportAddr, receiver: Receiver, lost: LostHandler) -> UdpTransport:
        sock = netns_socket(ns, _af(srv.family))
        try:
            sock.connect((str(srv.ip), srv.port))
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(receiver, lost), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        kept.append((sock, UdpTransport(transport)))
        return kept[-1][1]

    client = await TurnClient.connect(server, creds.username, creds.password, opener=opener)
    try:
        await asyncio.wait_for(client.allocate(relayed), STEP_TIMEOUT)
    except BaseException:
        await client.close()
        raise
    return Turn(client, kept[0][0], kept[0][1])


async def bind(turn: Turn, peer: TransportAddr) -> int:
    await asyncio.wait_for(turn.client.create_permission(peer), STEP_TIMEOUT)
    turn.channel = await asyncio.wait_for(turn.client.bind_channel(peer), STEP_TIMEOUT)
    return turn.channel


# --- throughput ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """What a trial measures beside the generator and the sink: the relay process, its network
    namespace, the NAPI thread(s) receiving on its interface (relay core) and the one(s) taking in
    its output at the next hop (generator core)."""

    relay_pid: int | None = None
    relay_ns: str | None = None
    relay_napi: tuple[int, ...] = ()
    return_napi: tuple[int, ...] = ()
    router_ns: str | None = None  # the internet router, whose `to-relay` feeds the relay


# The router's interface toward the relay: what it could not hand to the relay's veth (that
# veth's receive ring, 256 frames, was full) is its transmit drop.
ROUTER_TO_RELAY = "to-relay"


class LoadRunner:
    """One workload's traffic: the sink on the receiving host and one generator process, kept for
    all the trials of a rate search; `trial(rate, seconds)` runs one and measures it."""

    def __init__(
        self,
        send: livegen.LiveSend,
        sender_ns: str,
        receiver_ns: str,
        port: int,
        probe: Probe,
        *,
        warm: str | None = None,
    ) -> None:
        self._send = send
        self._sender_ns = sender_ns
        self._receiver_ns = receiver_ns
        self._port = port
        self._probe = probe
        self._warm = warm
        self._gen: livegen.LiveProcess | None = None

    def __enter__(self) -> LoadRunner:
        if self._warm is not None:
            livegen.poke(self._receiver_ns, self._warm)
        system.sink_on(self._receiver_ns, self._port)
        try:
            self._gen = self._send.start(gen_prefix(self._sender_ns))
            self._gen.wait_ready()  # the generator's start-up is outside every trial
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._gen is not None:
                self._gen.__exit__(None, None, None)
        finally:
            system.sink_off(self._receiver_ns)

    def trial(self, rate: float | None, seconds: float) -> search.Trial:
        assert self._gen is not None
        p = self._probe
        count0 = system.sink_count(self._receiver_ns)
        link0 = _link(self._receiver_ns)
        relay0 = _link(p.relay_ns) if p.relay_ns else None
        ring0 = link_counters(p.router_ns, ROUTER_TO_RELAY) if p.router_ns else None
        cpu0 = system.cpu_sample(p.relay_pid, RELAY_CPU, p.relay_napi, p.return_napi)
        self._gen.go_at(rate, seconds)
        sent = self._gen.result()
        delivered = system.sink_settled(self._receiver_ns) - count0
        cpu = system.cpu_sample(p.relay_pid, RELAY_CPU, p.relay_napi, p.return_napi) - cpu0
        link = _link(self._receiver_ns) - link0
        relay = _link(p.relay_ns) - relay0 if relay0 and p.relay_ns else None
        ring = None
        if ring0 is not None and p.router_ns:
            ring = link_counters(p.router_ns, ROUTER_TO_RELAY) - ring0
        relay_rx = relay.rx_packets if relay else 0
        lost_at = None
        if relay is not None and ring is not None:
            # Where the datagrams that did not arrive were lost, from the links' own counters
            # (a stray frame on a link, ARP or neighbour discovery, can make a difference -1).
            lost_at = {
                "before_relay": max(0, sent.sent - relay_rx - ring.tx_dropped),
                "relay_receive_ring": ring.tx_dropped,
                "relay_output_ring": relay.tx_dropped,
                "in_or_after_relay": max(0, relay_rx - delivered - relay.tx_dropped),
            }
        return search.Trial(
            requested_pps=rate,
            duration_s=seconds,
            sent=sent.sent,
            delivered=delivered,
            elapsed_s=max(sent.elapsed_s, 1e-9),
            extra={
                "rx_link_packets": link.rx_packets,
                "relay_rx_packets": relay_rx,
                "lost_at": lost_at,
                "cpu": {
                    "wall_s": cpu.wall,
                    "relay_core_busy_s": cpu.relay_cpu,
                    "relay_core_softirq_s": cpu.relay_softirq,
                    "relay_process_s": cpu.process,
                    "relay_napi_s": cpu.napi,
                    "return_napi_s": cpu.return_napi,
                    "machine_busy_s": cpu.softirq + cpu.system + cpu.user,
                },
            },
        )


def _link(ns: str) -> LinkCounters:
    return link_counters(ns, HOST_IF)


def ceiling(hosts: Hosts, size: int, duration: float) -> search.Trial:
    """The generator with no relay in the way: the same frames from the client host through the
    internet router straight to the peer host's sink, as fast as they go."""
    client_ip = hosts.ip(hosts.client, Family.IPV4)
    send = livegen.make(
        hosts.client.netns,
        (client_ip, CEILING_PORT),
        (hosts.ip(hosts.peer, Family.IPV4), CEILING_PORT),
        size,
        rate=None,
        duration=duration,
    )
    with LoadRunner(
        send, hosts.client.netns, hosts.peer.netns, CEILING_PORT, Probe(), warm=client_ip
    ) as runner:
        return runner.trial(None, duration)


def ping_direct(hosts: Hosts, rate: float, count: int, size: int) -> tools.PingResult:
    """Round trips client host <-> echo on the peer host with no relay: the tools' own floor."""
    peer_ip = hosts.ip(hosts.peer, Family.IPV4)
    echo = tools.echo((peer_ip, CEILING_PORT + 1), duration=count / rate + 5)
    with echo.start(tools.netns_prefix(hosts.peer.netns)) as peer:
        peer.wait_ready()
        result = tools.ping((peer_ip, CEILING_PORT + 1), rate=rate, count=count, size=size).run(
            gen_prefix(hosts.client.netns)
        )
        peer.interrupt()
    return result


@dataclass(frozen=True)
class Workload:
    direction: str  # "cd->udp", "udp->cd" or "hairpin"
    family: str  # a key of FAMILIES
    size: int  # application payload bytes

    @property
    def name(self) -> str:
        return f"{self.direction} {self.family} {self.size}B"


@dataclass(frozen=True)
class LoadPlan:
    workloads: tuple[Workload, ...]
    top_pps: dict[int, float | None]  # per size: the highest rate a search starts from
    search_settings: search.SearchSettings


@dataclass
class WorkloadResult:
    workload: Workload
    result: search.SearchResult
    # The XDP program's per-route packet counters moved by the whole search (xdp only).
    fastpath_routes: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        w = self.workload
        d: dict[str, Any] = {
            "name": w.name,
            "direction": w.direction,
            "family": w.family,
            "size": w.size,
            **self.result.to_json(),
        }
        every = [*self.result.trials, *(t for g in self.result.goals.values() for t in g.confirms)]
        # Confirming trials shared by both goals are counted once.
        unique = list({id(t): t for t in every}.values())
        d["totals"] = {
            "sent": sum(t.sent for t in unique),
            "delivered": sum(t.delivered for t in unique),
        }
        if self.fastpath_routes is not None:
            d["fastpath_routes"] = self.fastpath_routes
        return d


Counters = Callable[[], dict[str, int]]  # route -> packets, cumulative


async def throughput(
    hosts: Hosts,
    relay: RelayUnderTest,
    plan: LoadPlan,
    log: Callable[[str], None],
    counters: Counters | None = None,
) -> tuple[list[WorkloadResult], list[str]]:
    """A rate search for every workload of the plan, one family's allocation at a time; a family
    that fails to set up (e.g. a relay without IPv6 relaying) is reported in the errors."""
    results: list[WorkloadResult] = []
    errors: list[str] = []
    families = list(dict.fromkeys((w.family, w.direction == "hairpin") for w in plan.workloads))
    for fam, hairpin in families:
        mine = [
            w for w in plan.workloads if w.family == fam and (w.direction == "hairpin") == hairpin
        ]
        try:
            setup = _hairpin if hairpin else _one_family
            results += await setup(hosts, relay, plan, fam, mine, log, counters)
        except Exception as e:
            label = f"hairpin {fam}" if hairpin else fam
            errors.append(f"{label}: {e!r}")
            log(f"  {relay.name}: {label} failed: {e!r}")
    return results, errors


def _searched(
    w: Workload,
    relay: RelayUnderTest,
    hosts: Hosts,
    plan: LoadPlan,
    log: Callable[[str], None],
    counters: Counters | None,
    send: livegen.LiveSend,
    sender_ns: str,
    receiver_ns: str,
    port: int,
    warm: str,
) -> WorkloadResult:
    probe = Probe(
        relay.pid, hosts.relay.netns, hosts.relay_napi, hosts.return_napi, hosts.tb.inet_netns
    )
    before = counters() if counters else None
    with LoadRunner(send, sender_ns, receiver_ns, port, probe, warm=warm) as runner:

        def run(rate: float | None, seconds: float) -> search.Trial:
            t = runner.trial(rate, seconds)
            log(
                f"  {relay.name}: {w.name}: asked {'max' if rate is None else f'{rate:,.0f}'}"
                f" pps, offered {t.offered_pps:,.0f}, delivered {t.delivered_pps:,.0f},"
                f" loss {100 * t.loss:.3f} %"
            )
            return t

        result = search.search(run, plan.top_pps[w.size], plan.search_settings)
    moved = None
    if counters is not None and before is not None:
        after = counters()
        moved = {
            k: after.get(k, 0) - before.get(k, 0)
            for k in after
            if after.get(k, 0) != before.get(k, 0)
        }
    return WorkloadResult(w, result, moved)


async def _one_family(
    hosts: Hosts,
    relay: RelayUnderTest,
    plan: LoadPlan,
    fam: str,
    workloads: Sequence[Workload],
    log: Callable[[str], None],
    counters: Counters | None,
) -> list[WorkloadResult]:
    results: list[WorkloadResult] = []
    client_family, peer_family = FAMILIES[fam]
    server = relay.server(client_family)
    peer_addr = TransportAddr.parse(_fmt(hosts.ip(hosts.peer, peer_family), PEER_PORT))
    peer_sock = netns_socket(hosts.peer.netns, _af(peer_family), _addr(peer_addr))
    turn = await open_turn(hosts.client.netns, server, relay.secret, peer_family, f"tp-{fam}")
    try:
        channel = await bind(turn, peer_addr)
        relayed = turn.relayed(peer_family)
        for w in workloads:
            log(f"  {relay.name}: {w.name}")
            if w.direction == "cd->udp":
                send = livegen.make(
                    hosts.client.netns,
                    turn.sock.getsockname()[:2],
                    _addr(server),
                    w.size,
                    rate=None,
                    duration=plan.search_settings.trial_s,
                    channel=channel,
                )
                results.append(
                    _searched(
                        w,
                        relay,
                        hosts,
                        plan,
                        log,
                        counters,
                        send,
                        hosts.client.netns,
                        hosts.peer.netns,
                        PEER_PORT,
                        str(relayed.ip),
                    )
                )
            else:
                send = livegen.make(
                    hosts.peer.netns,
                    _addr(peer_addr),
                    _addr(relayed),
                    w.size,
                    rate=None,
                    duration=plan.search_settings.trial_s,
                )
                results.append(
                    _searched(
                        w,
                        relay,
                        hosts,
                        plan,
                        log,
                        counters,
                        send,
                        hosts.peer.netns,
                        hosts.client.netns,
                        turn.local_port,
                        str(server.ip),
                    )
                )
    finally:
        await turn.client.close()
        peer_sock.close()
    return results


async def _hairpin(
    hosts: Hosts,
    relay: RelayUnderTest,
    plan: LoadPlan,
    fam: str,
    workloads: Sequence[Workload],
    log: Callable[[str], None],
    counters: Counters | None,
) -> list[WorkloadResult]:
    """Both hosts allocate on the same relay and bind channels to each other's relayed address."""
    client_family, peer_family = FAMILIES[fam]
    server = relay.server(client_family)
    a, b = await asyncio.gather(
        open_turn(hosts.client.netns, server, relay.secret, peer_family, f"hpa-{fam}"),
        open_turn(hosts.peer.netns, server, relay.secret, peer_family, f"hpb-{fam}"),
    )
    results: list[WorkloadResult] = []
    try:
        await asyncio.gather(bind(a, b.relayed(peer_family)), bind(b, a.relayed(peer_family)))
        assert a.channel is not None
        for w in workloads:
            log(f"  {relay.name}: {w.name}")
            send = livegen.make(
                hosts.client.netns,
                a.sock.getsockname()[:2],
                _addr(server),
                w.size,
                rate=None,
                duration=plan.search_settings.trial_s,
                channel=a.channel,
            )
            results.append(
                _searched(
                    w,
                    relay,
                    hosts,
                    plan,
                    log,
                    counters,
                    send,
                    hosts.client.netns,
                    hosts.peer.netns,
                    b.local_port,
                    str(server.ip),
                )
            )
    finally:
        await asyncio.gather(a.client.close(), b.client.close(), return_exceptions=True)
    return results


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --- latency -------------------------------------------------------------------------------------


async def latency(
    hosts: Hosts, relay: RelayUnderTest, rate: float, count: int, size: int
) -> tools.PingResult:
    """ChannelData pings from the client through the relay to a UDP echo on the peer host."""
    server = relay.server(Family.IPV4)
    peer_addr = TransportAddr.parse(_fmt(hosts.ip(hosts.peer, Family.IPV4), PEER_PORT + 1))
    peer_sock = netns_socket(hosts.peer.netns, socket.AF_INET, _addr(peer_addr))
    turn = await open_turn(hosts.client.netns, server, relay.secret, Family.IPV4, "lat")
    try:
        channel = await bind(turn, peer_addr)
        echo = tools.echo(fd=peer_sock.fileno(), duration=count / rate + 5)
        with echo.start(tools.netns_prefix(hosts.peer.netns)) as peer:
            peer.wait_ready()
            # The echo answers the relayed address, which the relay wraps back into ChannelData.
            result = tools.ping(
                _addr(server),
                rate=rate,
                count=count,
                size=size,
                channel=channel,
                fd=turn.sock.fileno(),
            ).run(gen_prefix(hosts.client.netns))
            peer.interrupt()
        return result
    finally:
        await turn.client.close()
        peer_sock.close()


# --- control plane -------------------------------------------------------------------------------


@dataclass
class ControlResult:
    attempted: int
    succeeded: int
    failed: int
    concurrency: int  # sequences in flight, all driver processes together
    driver_processes: int
    elapsed_s: float
    ops_per_s: float  # Allocate + CreatePermission + ChannelBind, all authenticated
    driver_cpu_s: float  # the driver processes' own CPU time (utime + stime) over the run
    driver_ceiling_ops_per_s: float  # succeeded / driver_cpu_s: the drivers' limit on one core
    driver_busy: float  # driver_cpu_s / elapsed_s / cores they may use: >0.9, the driver's pace
    relay_cpu_s: float  # the relay process's utime + stime over the run: the headline's numerator
    relay_busy: float  # relay_cpu_s / elapsed_s
    relay_core_busy: float  # the relay core's busy fraction, whoever kept it busy (/proc/stat)
    retransmissions: int
    rss_idle_bytes: int
    rss_bytes: int  # with `succeeded` allocations live
    rss_per_allocation_bytes: float
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def control_plane(
    hosts: Hosts,
    relay: RelayUnderTest,
    count: int,
    concurrency: int,
    processes: int,
    rss_idle: int,
) -> ControlResult:
    """`count` clients, `concurrency` at a time, each Allocate + CreatePermission + ChannelBind
    (authenticated, after the 401 challenge), from `processes` driver processes (`cpdriver`) on
    the generator's core; then the relay's RSS with all of them live. The allocations are left
    behind for the relay's shutdown to clean up."""
    server = relay.server(Family.IPV4)
    peer = TransportAddr.parse(_fmt(hosts.ip(hosts.peer, Family.IPV4), PEER_PORT + 2))
    shares = [count // processes + (i < count % processes) for i in range(processes)]
    windows = [max(1, concurrency // processes) for _ in range(processes)]
    timeout = 60.0 + count / 50  # bounded even for a relay serving 50 sequences per second
    drivers: list[cpdriver.DriverProcess] = []
    try:
        first = 0
        for share, window in zip(shares, windows, strict=True):
            args = cpdriver.driver_args(server, peer, relay.secret, first, share, window)
            drivers.append(cpdriver.DriverProcess(gen_prefix(hosts.client.netns), args, timeout))
            first += share
        for d in drivers:
            d.wait_ready()  # start-up, credentials and sockets are outside the measurement
        relay0 = system.process_cpu(relay.pid)
        core0 = system.cpu_sample(None, RELAY_CPU)
        driver0 = sum(system.process_cpu(d.proc.pid) for d in drivers)
        t0 = time.monotonic()
        for d in drivers:
            d.go()
        results = [d.result() for d in drivers]
        elapsed = time.monotonic() - t0
        driver_cpu = sum(system.process_cpu(d.proc.pid) for d in drivers) - driver0
        relay_cpu = system.process_cpu(relay.pid) - relay0
        core = system.cpu_sample(None, RELAY_CPU) - core0
        rss = system.rss_bytes(relay.pid)
    finally:
        for d in drivers:
            d.__exit__(None, None, None)
    succeeded = sum(int(r["succeeded"]) for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for what, n in r["errors"].items():
            errors[what] = errors.get(what, 0) + int(n)
    live = max(1, succeeded)
    cores = len(GENERATOR_CPU.split(","))
    return ControlResult(
        attempted=count,
        succeeded=succeeded,
        failed=count - succeeded,
        concurrency=sum(windows),
        driver_processes=processes,
        elapsed_s=elapsed,
        ops_per_s=succeeded / elapsed if elapsed else 0.0,
        driver_cpu_s=driver_cpu,
        driver_ceiling_ops_per_s=succeeded / driver_cpu if driver_cpu else 0.0,
        driver_busy=driver_cpu / elapsed / cores if elapsed else 0.0,
        relay_cpu_s=relay_cpu,
        relay_busy=relay_cpu / elapsed if elapsed else 0.0,
        relay_core_busy=core.relay_cpu / core.wall if core.wall else 0.0,
        retransmissions=sum(int(r["retransmissions"]) for r in results),
        rss_idle_bytes=rss_idle,
        rss_bytes=rss,
        rss_per_allocation_bytes=(rss - rss_idle) / live,
        errors=[f"{what} (x{n})" for what, n in sorted(errors.items(), key=lambda e: -e[1])][:5],
    )
