"""`xdpturn-lab demo`: the relay at work in a throw-away testbed, watched live.

It builds a Client site and a Gateway site, each behind its own masquerading NAT, and one relay
(testbed topology, see docs/demo.md); starts `xdpturn serve` there with the fast path and a
metrics listener on the relay namespace's loopback; opens three Client/Gateway pairs on that
relay (over IPv4, over IPv6, and Client over IPv6 with Gateway over IPv4), each end bound by a
channel to the other's relayed address, so every datagram takes a hairpin route; sends numbered
datagrams at a steady rate for --seconds while showing, once a second, what the relay's /status
reports; then prints which routes carried how much and what each pair delivered, and tears it
all down (also on Ctrl-C or SIGTERM).

The testbed is imported only when the demo runs, so `xdpturn --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from xdpturn.cli.args import UsageError, parse_arg
from xdpturn.cli.ops import StatusError, fetch
from xdpturn.config import parse_positive
from xdpturn.proto.addr import Family, TransportAddr

if TYPE_CHECKING:
    from xdpturn_lab.testbed import Testbed
    from xdpturn_lab.testbed.scenario import RelayProcess, Report, TurnEndpoint

DEFAULT_SECONDS = 10
MAX_SECONDS = 3600
DEFAULT_RATE = 500  # datagrams per second, per direction of each pair
PROG = "xdpturn-lab"
MAX_RATE = 20_000  # the demo shows routes, it is not a benchmark (see `xdpturn-lab bench`)
DATAGRAM_SIZE = 200  # bytes of application data, about a video RTP packet's worth
PREFIX = "xdemo"  # namespace prefix: never confused with test or bench runs
METRICS = TransportAddr.parse("127.0.0.1:9478")  # on the relay namespace's own loopback
TICK = 1.0  # seconds between live view refreshes
SEND_TICK = 0.005  # seconds between pacing steps
MAX_BURST = 0.05  # seconds of traffic one pacing step may catch up, so a stall makes no flood
TAIL_TIMEOUT = 2.0  # seconds to wait for datagrams still in flight after sending stops
SETUP_TIMEOUT = 60.0  # seconds for allocations, permissions and channels of all pairs
REQUIRED_TOOLS = ("ip", "nft", "ethtool")  # what the testbed runs
SETUP_HINT = "run scripts/setup.sh (or `make setup`) as root first"

V4, V6 = Family.IPV4, Family.IPV6


class DemoError(Exception):
    """Why the demo cannot run or went wrong: one line for the user, no traceback."""


@dataclass(frozen=True)
class PairPlan:
    name: str
    client: Family  # the Client's transport to the relay
    gateway: Family
    relayed: Family  # family of the relayed addresses the channels are bound to


PAIRS = (
    PairPlan("ipv4", V4, V4, V4),
    PairPlan("ipv6", V6, V6, V6),
    PairPlan("mixed", V6, V4, V4),
)


# --- command line --------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seconds",
        default=str(DEFAULT_SECONDS),
        metavar="N",
        help=f"seconds of traffic (default {DEFAULT_SECONDS})",
    )
    p.add_argument(
        "--fastpath",
        default="auto",
        choices=("auto", "off"),
        help="auto: the XDP program relays bound channels (default); off: Python relays all",
    )
    p.add_argument(
        "--rate",
        default=str(DEFAULT_RATE),
        metavar="PPS",
        help=f"datagrams per second in each direction of each pair (default {DEFAULT_RATE})",
    )


@dataclass(frozen=True)
class Options:
    seconds: int
    fastpath: bool
    rate: int


def options_from(args: argparse.Namespace) -> Options:
    seconds = parse_arg("demo", "--seconds", parse_positive, args.seconds, prog=PROG)
    rate = parse_arg("demo", "--rate", parse_positive, args.rate, prog=PROG)
    if seconds > MAX_SECONDS:
        raise UsageError("demo", f"--seconds: at most {MAX_SECONDS}, got {seconds}", PROG)
    if rate > MAX_RATE:
        raise UsageError("demo", f"--rate: at most {MAX_RATE}, got {rate}", PROG)
    return Options(seconds, args.fastpath == "auto", rate)


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    opts = options_from(args)
    out = out if out is not None else sys.stdout
    # SIGTERM stops the demo as Ctrl-C does: same teardown, and the summary so far.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        check_prerequisites(opts)
        return run(opts, out)
    except DemoError as e:
        print(f"xdpturn-lab demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xdpturn-lab demo: interrupted; testbed torn down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def check_prerequisites(opts: Options) -> None:
    """Refuse early, in one line, what would otherwise fail halfway with a traceback."""
    if os.geteuid() != 0:
        raise DemoError(
            "needs root (it creates network namespaces and NAT rules and attaches XDP); "
            "run it as root, e.g. sudo .venv/bin/xdpturn-lab demo"
        )
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        raise DemoError(f"{', '.join(missing)} not found; {SETUP_HINT}")
    if opts.fastpath:
        from xdpturn.fastpath.xdp import OBJECT_PATH

        if not OBJECT_PATH.exists():
            raise DemoError(
                f"the XDP program {OBJECT_PATH} is not built; {SETUP_HINT} "
                "(or run the demo with --fastpath off)"
            )


# --- traffic -------------------------------------------------------------------------------------


@dataclass
class Stream:
    """One direction of a pair: numbered datagrams at a steady rate, and what arrived."""

    pair: str
    src: TurnEndpoint
    dst: TurnEndpoint
    report: Report
    seen: set[int] = field(default_factory=set)
    highest: int = -1

    def take(self, data: bytes) -> None:
        from xdpturn_lab.testbed.scenario import datagram, sequence_of

        r = self.report
        seq = sequence_of(data)
        if seq is None or seq >= r.sent:
            r.corrupted += 1
        elif seq in self.seen:
            r.duplicates += 1
        elif data != datagram(seq, DATAGRAM_SIZE):
            r.corrupted += 1
            self.seen.add(seq)
        else:
            self.seen.add(seq)
            r.delivered += 1
            if seq < self.highest:
                r.reordered += 1  # veth can reorder across CPUs; shown, not hidden
            self.highest = max(self.highest, seq)

    def settled(self) -> bool:
        return self.report.delivered + self.report.corrupted >= self.report.sent


async def _pace(stream: Stream, rate: int, seconds: int) -> None:
    """Send rate * seconds datagrams, evenly spread over `seconds`."""
    from xdpturn_lab.testbed.scenario import datagram

    loop = asyncio.get_running_loop()
    total = rate * seconds
    origin = loop.time()  # when datagram 0 was due; moved forward after a stall
    burst = max(1, int(rate * MAX_BURST))
    while stream.report.sent < total:
        now = loop.time()
        due = min(total, int((now - origin) * rate)) - stream.report.sent
        if due > burst:
            # Behind schedule (the loop stalled): skip the backlog instead of flooding.
            origin = now - (stream.report.sent + burst) / rate
            due = burst
        for _ in range(max(0, due)):
            stream.src.send(datagram(stream.report.sent, DATAGRAM_SIZE))
            stream.report.sent += 1
        await asyncio.sleep(SEND_TICK)


async def _receive(stream: Stream) -> None:
    while True:
        stream.take(await stream.dst.recv())


# --- status from the relay -----------------------------------------------------------------------


def fetch_status(ns: str) -> dict[str, Any]:
    """GET /status from the relay's metrics listener, from inside its namespace (this thread)."""
    from xdpturn_lab.testbed import netns

    try:
        code, body = netns.call(ns, fetch, METRICS, "/status?top=0")
    except StatusError as e:
        raise DemoError(str(e)) from None
    if code != 200:
        raise DemoError(f"/status answered HTTP {code}")
    snapshot: dict[str, Any] = json.loads(body)
    return snapshot


Counts = dict[tuple[str, str], tuple[int, int]]  # (path, route) -> (packets, bytes)


def relayed(snapshot: Mapping[str, Any]) -> Counts:
    return {(r["path"], r["route"]): (r["packets"], r["bytes"]) for r in snapshot["relayed"]}


def delta(after: Counts, before: Counts) -> Counts:
    return {
        key: (p - before.get(key, (0, 0))[0], b - before.get(key, (0, 0))[1])
        for key, (p, b) in after.items()
    }


def si(value: float, unit: str = "") -> str:
    """1234567 -> "1.2M"; with a unit, "1.2 MB"."""
    for prefix in ("", "k", "M", "G"):
        if abs(value) < 1000 or prefix == "G":
            number = f"{value:.0f}" if prefix == "" else f"{value:.1f}"
            return f"{number} {prefix}{unit}" if unit else f"{number}{prefix}"
        value /= 1000
    raise AssertionError("unreachable")


# --- the live view -------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the demo knows so far; the summary is printed from it, also after Ctrl-C."""

    streams: list[Stream] = field(default_factory=list)
    baseline: Counts = field(default_factory=dict)
    latest: dict[str, Any] | None = None
    started: float = 0.0  # monotonic time traffic began
    ended: float = 0.0


class LiveView:
    """Once a second: allocations, channels and per-route rates. On a terminal the block is
    redrawn in place (plain ANSI); otherwise one line per tick, for logs and pipes."""

    def __init__(self, out: TextIO, seconds: int) -> None:
        self.out = out
        self.seconds = seconds
        self.in_place = out.isatty()
        self._drawn = 0  # lines of the previous block, to move back over
        self._previous: dict[str, Any] | None = None

    def update(self, snapshot: dict[str, Any], progress: Progress) -> None:
        previous, self._previous = self._previous, snapshot
        started = progress.started
        elapsed = min(self.seconds, time.monotonic() - started) if started else 0.0
        now = relayed(snapshot)
        since = delta(now, progress.baseline)
        step = delta(now, relayed(previous)) if previous else {}
        dt = snapshot["time"] - previous["time"] if previous else 0.0

        def rate(key: tuple[str, str], index: int) -> float:
            return step.get(key, (0, 0))[index] / dt if dt > 0 else 0.0

        allocs = snapshot["allocations"]
        sent = sum(s.report.sent for s in progress.streams)
        delivered = sum(s.report.delivered for s in progress.streams)
        if not self.in_place:
            xdp = [k for k in now if k[0] == "xdp"]
            py = [k for k in now if k[0] == "python"]
            line = (
                f"[{elapsed:4.0f}/{self.seconds} s] allocations {allocs['total']} "
                f"channels {allocs['channels']}  "
                f"xdp {si(sum(rate(k, 0) for k in xdp))} pkt/s "
                f"{si(sum(rate(k, 1) for k in xdp), 'B')}/s  "
                f"python {si(sum(rate(k, 0) for k in py))} pkt/s "
                f"{si(sum(rate(k, 1) for k in py), 'B')}/s  "
                f"delivered {delivered}/{sent}"
            )
            self.out.write(line + "\n")
            self.out.flush()
            return
        families = ", ".join(f"{k} {v}" for k, v in allocs["by_family"].items() if v)
        lines = [
            f"live  {elapsed:.0f}/{self.seconds} s   fast path {snapshot['fastpath']['mode']}   "
            f"allocations {allocs['total']} ({families})   permissions {allocs['permissions']}   "
            f"channels {allocs['channels']}",
            f"  {'path':<7}{'route':<30}{'pkt/s':>9}{'bytes/s':>11}{'packets':>10}{'bytes':>10}",
        ]
        for key in sorted(now):
            packets, nbytes = since.get(key, (0, 0))
            if not packets and key[0] == "xdp":
                continue  # routes the demo does not use
            lines.append(
                f"  {key[0]:<7}{key[1]:<30}{si(rate(key, 0)):>9}{si(rate(key, 1), 'B/s'):>11}"
                f"{si(packets):>10}{si(nbytes, 'B'):>10}"
            )
        lines.append(f"  delivered {delivered} of {sent} datagrams sent")
        back = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.out.write(back + "\x1b[J" + "\n".join(lines) + "\n")
        self.out.flush()
        self._drawn = len(lines)


async def _watch(ns: str, view: LiveView, progress: Progress, until: float) -> None:
    loop = asyncio.get_running_loop()
    next_tick = loop.time() + TICK
    while next_tick <= until + TICK / 2:
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
        next_tick += TICK
        # A thread, because the request runs inside the relay's namespace and may block.
        progress.latest = await asyncio.to_thread(fetch_status, ns)
        view.update(progress.latest, progress)


# --- the run -------------------------------------------------------------------------------------


async def traffic(
    tb: Testbed, relay: RelayProcess, opts: Options, view: LiveView, progress: Progress
) -> None:
    """Open the pairs, send for opts.seconds while the view refreshes, then settle the tail."""
    from contextlib import AsyncExitStack

    from xdpturn_lab.testbed.scenario import EndpointSpec, Report, pair

    ns = relay.relay.netns
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        for plan in PAIRS:
            specs = (
                EndpointSpec(tb, "client", relay.server(plan.client), relay.secret, plan.relayed),
                EndpointSpec(tb, "gateway", relay.server(plan.gateway), relay.secret, plan.relayed),
            )
            client, gateway = await asyncio.wait_for(
                stack.enter_async_context(pair(*specs)), SETUP_TIMEOUT
            )
            for src, dst in ((client, gateway), (gateway, client)):
                progress.streams.append(Stream(plan.name, src, dst, Report(src.name, dst.name)))
        progress.latest = await asyncio.to_thread(fetch_status, ns)
        progress.baseline = relayed(progress.latest)
        view.update(progress.latest, progress)  # the first frame: allocations, no traffic yet
        progress.started = time.monotonic()
        until = loop.time() + opts.seconds
        receivers = [loop.create_task(_receive(s)) for s in progress.streams]
        try:
            await asyncio.gather(
                *(_pace(s, opts.rate, opts.seconds) for s in progress.streams),
                _watch(ns, view, progress, until),
            )
            tail_end = loop.time() + TAIL_TIMEOUT
            while not all(s.settled() for s in progress.streams) and loop.time() < tail_end:
                await asyncio.sleep(0.05)
            progress.latest = await asyncio.to_thread(fetch_status, ns)
        finally:
            progress.ended = time.monotonic()
            for task in receivers:
                task.cancel()
            await asyncio.gather(*receivers, return_exceptions=True)


def run(opts: Options, out: TextIO) -> int:
    from xdpturn_lab.testbed import Relay, Site, Testbed, Topology
    from xdpturn_lab.testbed.scenario import RelayProcess

    topology = Topology([Relay("relay")], [Site("client"), Site("gateway")])
    tb = Testbed(topology, prefix=PREFIX)
    progress = Progress()
    view = LiveView(out, opts.seconds)
    interrupted = False
    mode = "off"
    say = _printer(out)
    say(f"building the testbed ({len(tb.namespaces)} network namespaces, prefix {PREFIX}) ...")
    try:
        tb.up()
    except (RuntimeError, OSError, TimeoutError, PermissionError) as e:
        raise DemoError(f"building the testbed failed: {e}") from None
    try:
        _describe(tb, say)
        relay = RelayProcess(
            tb, "relay", fastpath=opts.fastpath, extra_args=["--metrics", str(METRICS)]
        )
        try:
            relay.start()
        except AssertionError as e:
            relay_stop_quietly(relay)
            raise DemoError(f"the relay did not start: {e}") from None
        try:
            mode = relay.fastpath_mode
            say(f"relay: xdpturn serve, fast path {mode}, metrics {METRICS} in {relay.relay.netns}")
            if opts.fastpath and mode == "off":
                say("  the XDP program did not load (see why below); Python relays everything")
                for record in relay.records:
                    if str(record.get("level")) in ("WARNING", "ERROR"):
                        say(f"  relay log: {record.get('message')}")
            say(
                f"status: ip netns exec {relay.relay.netns} {_self_command()} status "
                f"--metrics {METRICS}"
            )
            say(
                f"traffic: {len(PAIRS)} pairs x 2 directions x {opts.rate} datagrams/s of "
                f"{DATAGRAM_SIZE} bytes, for {opts.seconds} s"
            )
            say("")

            async def bounded() -> None:
                budget = SETUP_TIMEOUT + opts.seconds + TAIL_TIMEOUT + 30
                await asyncio.wait_for(traffic(tb, relay, opts, view, progress), budget)

            try:
                asyncio.run(bounded())
            except KeyboardInterrupt:
                interrupted = True
            except Exception as e:
                # A TURN error, a timeout, the relay gone: one message and the relay's last
                # words, not a traceback (teardown still runs below).
                raise DemoError(f"traffic failed: {e!r}\nrelay log:\n{relay.tail(5)}") from None
        finally:
            relay_stop_quietly(relay)
    finally:
        names = tb.namespaces
        tb.down()
    say("")
    summary(progress, mode, say, interrupted=interrupted)
    left = [ns for ns in names if os.path.exists(f"/run/netns/{ns}")]
    say(f"torn down: {len(names) - len(left)} of {len(names)} namespaces removed")
    if left:
        raise DemoError(f"namespaces left behind: {', '.join(left)}")
    if interrupted:
        raise KeyboardInterrupt
    if not progress.streams or any(s.report.delivered == 0 for s in progress.streams):
        raise DemoError("a pair delivered nothing: the relay is not relaying (see above)")
    return 0


def relay_stop_quietly(relay: RelayProcess) -> None:
    """Stop the relay; a program left attached is reported, but teardown goes on regardless
    (deleting the namespace detaches it)."""
    try:
        relay.stop()
    except AssertionError as e:
        print(f"xdpturn-lab demo: {e}", file=sys.stderr)
    except RuntimeError:
        pass  # never started


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return say


def _self_command() -> str:
    """How to run this same xdpturn, for the status hint (the venv's script if there is one)."""
    script = Path(sys.executable).parent / "xdpturn"
    return str(script) if script.exists() else f"{sys.executable} -m xdpturn"


def _describe(tb: Testbed, say: Callable[[str], None]) -> None:
    relay = tb.relay("relay")
    say(f"  relay    {relay.netns}  {relay.public_ipv4}  {relay.public_ipv6}  (public, on eth0)")
    for site in tb.sites:
        say(
            f"  {site.name:<8} {site.netns}  {site.ipv4}  {site.ipv6}  "
            f"behind NAT {site.nat_public_ipv4}  {site.nat_public_ipv6}"
        )


def summary(
    progress: Progress, mode: str, say: Callable[[str], None], *, interrupted: bool = False
) -> None:
    """Which routes carried how much (since traffic began), and what each pair delivered."""
    seconds = max(0.0, progress.ended - progress.started) if progress.started else 0.0
    note = "  (interrupted: routes as of the last refresh)" if interrupted else ""
    say(f"summary: {seconds:.1f} s of traffic, fast path {mode}{note}")
    if progress.latest is None:
        say("  (no status from the relay)")
    else:
        since = delta(relayed(progress.latest), progress.baseline)
        rows = [(k, v) for k, v in sorted(since.items()) if v[0] or k[0] == "python"]
        total = sum(p for _, (p, _) in rows)
        total_bytes = sum(b for _, (_, b) in rows)
        say(f"  {'path':<7}{'route':<30}{'packets':>10}{'bytes':>13}{'share':>8}")
        for (path, route), (packets, nbytes) in rows:
            share = 100 * packets / total if total else 0.0
            say(f"  {path:<7}{route:<30}{packets:>10,}{nbytes:>13,}{share:>7.1f}%")
        say(f"  {'total':<37}{total:>10,}{total_bytes:>13,}")
        say("  (xdp bytes: frames as the program counts them; python bytes: application data)")
    say("")
    say(f"  {'pair':<7}{'direction':<20}{'sent':>8}{'delivered':>11}{'lost':>6}{'reordered':>11}")
    for s in progress.streams:
        r = s.report
        direction = f"{r.sender} -> {r.receiver}"
        say(
            f"  {s.pair:<7}{direction:<20}{r.sent:>8,}{r.delivered:>11,}{r.lost:>6,}"
            f"{r.reordered:>11,}"
        )


__all__ = [
    "PAIRS",
    "DemoError",
    "Options",
    "add_arguments",
    "check_prerequisites",
    "main",
    "options_from",
    "run",
    "summary",
]
