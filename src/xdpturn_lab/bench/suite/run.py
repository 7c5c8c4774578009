"""`xdpturn-lab bench`: the same workloads against xdpturn's fast path, its Python path and coturn,
on one testbed, in one run; a table with ratios, `bench/results/<UTC time>.json` and a PNG chart.

The testbed is three public hosts on the internet router: the relay, a client host and a peer
host (no NAT in front of them, so no conntrack hop is measured; the relay, not the topology, is
what the run compares). See docs/performance.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdpturn.proto.addr import Family
from xdpturn_lab.bench import tools
from xdpturn_lab.bench.suite import RELAYS, report, system, uclient, workloads
from xdpturn_lab.bench.suite.relays import (
    GENERATOR_CPU,
    RELAY_CPU,
    CoturnRelay,
    RelayUnderTest,
    XdpturnRelay,
    raise_fd_limit,
)
from xdpturn_lab.bench.suite.search import SearchSettings
from xdpturn_lab.testbed import Relay, Testbed, Topology, cleanup_stale

PING_SIZE = 100
BACKGROUND_WINDOW = 0.5  # seconds
LOCK_WAIT_S = 900.0  # at most this long for another benchmark on the machine (a full run: ~9 min)
# One lean driver process keeps the relay, not itself, as the limit (docs/performance.md); a
# second splits the work so one process descheduled by other load does not stall the run.
DRIVER_PROCESSES = 2
SIZES_FULL = (100, 1200)
Workload = workloads.Workload
WORKLOADS_FULL = (
    Workload("cd->udp", "ipv4", 100),
    Workload("udp->cd", "ipv4", 100),
    Workload("cd->udp", "ipv4", 1200),
    Workload("udp->cd", "ipv4", 1200),
    Workload("cd->udp", "ipv6", 1200),
    Workload("udp->cd", "ipv6", 1200),
    Workload("cd->udp", "cross", 1200),
    Workload("udp->cd", "cross", 1200),
    Workload("hairpin", "ipv4", 1200),
)
WORKLOADS_QUICK = (
    Workload("cd->udp", "ipv4", 100),
    Workload("udp->cd", "ipv4", 100),
    Workload("hairpin", "ipv4", 100),
)


@dataclass(frozen=True)
class Settings:
    quick: bool
    workloads: tuple[workloads.Workload, ...]
    search: SearchSettings
    ceiling_s: float
    ping_rate: float
    ping_count: int
    ping_runs: int
    allocations: int
    concurrency: int
    driver_processes: int  # control-plane driver processes on the generator core
    uclient_messages: int  # per client, in each mode

    @classmethod
    def make(cls, quick: bool, duration: float | None) -> Settings:
        if quick:
            confirm = duration or 0.5
            return cls(
                quick=True,
                workloads=WORKLOADS_QUICK,
                search=SearchSettings(
                    trial_s=min(0.5, confirm),
                    confirm_s=confirm,
                    confirm=3,
                    max_trials=6,
                    precision=0.2,
                ),
                ceiling_s=0.5,
                ping_rate=2000,
                ping_count=2000,
                ping_runs=3,
                allocations=500,
                concurrency=100,
                driver_processes=DRIVER_PROCESSES,
                uclient_messages=200,
            )
        confirm = duration or 1.5
        return cls(
            quick=False,
            workloads=WORKLOADS_FULL,
            search=SearchSettings(
                trial_s=min(1.0, confirm),
                confirm_s=confirm,
                confirm=3,
                max_trials=7,
                precision=0.05,
            ),
            ceiling_s=2.0,
            ping_rate=5000,
            ping_count=10000,
            ping_runs=3,
            # An xdpturn allocation holds two descriptors (relay socket, client's connected
            # socket): 8,000 fit a hard open-file limit of 20,000 with room to spare.
            allocations=8000,
            concurrency=200,
            driver_processes=DRIVER_PROCESSES,
            uclient_messages=1000,
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["workloads"] = [w.name for w in self.workloads]
        return d


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _round_down(x: float) -> float:
    """Two significant digits, down: the top rate every relay's search starts from."""
    if x <= 0:
        return 1.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return float(math.floor(x / scale) * scale)


def _make_relay(name: str, tb: Testbed) -> RelayUnderTest:
    node = tb.relay("relay")
    if name == "coturn":
        return CoturnRelay(tb, node, relay_threads=len(RELAY_CPU.split(",")))
    return XdpturnRelay(tb, node, fastpath=name == "xdp")


async def _latency_runs(
    hosts: workloads.Hosts, relay: RelayUnderTest, settings: Settings
) -> list[dict[str, Any]]:
    runs = []
    for i in range(settings.ping_runs):
        _log(f"  {relay.name}: latency run {i + 1} of {settings.ping_runs}")
        ping = await workloads.latency(
            hosts, relay, settings.ping_rate, settings.ping_count, PING_SIZE
        )
        runs.append(report.ping_json(ping, settings.ping_rate, PING_SIZE))
    return runs


async def _bench_relay(
    hosts: workloads.Hosts,
    relay: RelayUnderTest,
    settings: Settings,
    plan: workloads.LoadPlan,
) -> dict[str, Any]:
    rss_idle = system.rss_bytes(relay.pid)
    errors: list[str] = []
    out: dict[str, Any] = {"info": relay.info(), "errors": errors}
    # Latency first, with NAPI in softirq as a NIC's interrupt would run it: threaded NAPI adds
    # two thread wake-ups per hop, which would swamp a fast path's round trip.
    try:
        out["latency_runs"] = await _latency_runs(hosts, relay, settings)
    except Exception as e:
        errors.append(f"latency: {e!r}")
    # For throughput, the relay host's receive path (NAPI, which runs XDP) gets its own thread on
    # the relay's core, and the path draining the relay's output one ahead of the generator on
    # the generator's core (see system.pin_napi). Both are SCHED_FIFO, as a NIC's receive softirq
    # preempts any task: at SCHED_OTHER the receiving thread sometimes waited behind the relay
    # core's other tasks long enough for its 256-frame veth ring to overflow (0.2-0.7 % lost at
    # a quarter of the core). Undone before the next relay.
    counters = None
    if isinstance(relay, XdpturnRelay) and relay.name == "xdp":
        counters = relay.route_packets
    relay_napi = system.pin_napi(hosts.relay.netns, workloads.HOST_IF, RELAY_CPU, realtime=True)
    try:
        out_napi = system.pin_napi(hosts.tb.inet_netns, "to-relay", GENERATOR_CPU, realtime=True)
        try:
            pinned = dataclasses.replace(
                hosts, relay_napi=tuple(relay_napi), return_napi=tuple(out_napi)
            )
            loads, load_errors = await workloads.throughput(pinned, relay, plan, _log, counters)
        finally:
            system.unpin_napi(hosts.tb.inet_netns, "to-relay")
    finally:
        system.unpin_napi(hosts.relay.netns, workloads.HOST_IF)
    errors += load_errors
    out["throughput"] = [r.to_json() for r in loads]
    out["napi_threads"] = {"relay_rx": relay_napi, "relay_output": out_napi}
    if counters is not None:
        out["fastpath_counters"] = relay.fastpath_counters()  # type: ignore[attr-defined]
    _log(f"  {relay.name}: control plane, {settings.allocations} allocations")
    try:
        cp = workloads.control_plane(
            hosts,
            relay,
            settings.allocations,
            settings.concurrency,
            settings.driver_processes,
            rss_idle,
        )
        out["control_plane"] = cp.to_json()
    except Exception as e:
        errors.append(f"control plane: {e!r}")
    return out


def _background() -> float:
    """The relay core's busy fraction over a fixed window with no relay running."""
    before = system.cpu_sample(None, RELAY_CPU)
    time.sleep(BACKGROUND_WINDOW)  # a measurement window, not a wait for readiness
    idle = system.cpu_sample(None, RELAY_CPU) - before
    return idle.relay_cpu / idle.wall


def _uclient_runs(
    hosts: workloads.Hosts, relay: RelayUnderTest, settings: Settings
) -> list[dict[str, Any]]:
    """Issue 13's workload, after the control plane (its thousands of allocations are gone by
    then only if the relay was restarted: it runs against a fresh relay, see `run`)."""
    runs = []
    for mode in uclient.MODES:
        _log(f"  {relay.name}: turnutils_uclient ({mode} mode)")
        r = uclient.run(
            relay.secret,
            str(relay.server(Family.IPV4).ip),
            workloads.gen_prefix(hosts.client.netns),
            str(hosts.peer.public_ipv4),
            tools.netns_prefix(hosts.peer.netns),
            mode,
            settings.uclient_messages,
            timeout=60.0,
        )
        runs.append(r.to_json())
    return runs


def _command() -> list[str]:
    """The command line as typed (`python -m xdpturn_lab` for the module form)."""
    first = Path(sys.argv[0])
    head = ["python", "-m", "xdpturn_lab"] if first.name == "__main__.py" else [first.name]
    return [*head, *sys.argv[1:]]


def results_path(out: Path, started: dt.datetime, prefix: str = "") -> Path:
    """`out` itself if it names a .json file, else `<out>/<prefix><UTC time>.json`."""
    if out.suffix == ".json":
        return out
    return out / f"{prefix}{started.strftime('%Y-%m-%dT%H%M%SZ')}.json"


def run(settings: Settings, only: Sequence[str], out: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("xdpturn-lab bench: needs root (namespaces, XDP, nftables)")
    started = dt.datetime.now(dt.UTC)
    json_path = results_path(out, started)
    if json_path.exists():
        raise SystemExit(f"xdpturn-lab bench: {json_path} exists; results are never overwritten")
    if "coturn" in only and shutil.which("turnserver") is None:
        raise SystemExit("xdpturn-lab bench: turnserver not found (Debian's coturn package)")
    tools.build()
    raise_fd_limit()
    cleanup_stale()
    result: dict[str, Any] = {
        "format": 4,
        "started": started.isoformat(timespec="seconds"),
        "command": _command(),
        "cwd": os.getcwd(),
        "provenance": system.provenance(),
        "machine": system.machine(),
        "settings": {**settings.to_json(), "relays": list(only)},
        "placement": {
            "relay_cpu": RELAY_CPU,
            "generator_cpu": GENERATOR_CPU,
            "note": "the relay process is pinned to relay_cpu and the load tools to "
            "generator_cpu. During throughput runs the NAPI thread receiving on the relay's "
            "interface (it runs XDP) is pinned to relay_cpu and the one draining the relay's "
            "output to generator_cpu, both SCHED_FIFO (as a NIC's receive softirq preempts "
            "any task); routing and the receiving sink run on "
            "generator_cpu. Latency runs use NAPI in softirq (no threads), as with a NIC.",
        },
        "cpu_accounting": report.CPU_ACCOUNTING,
        "relays": {},
    }
    topo = Topology(relays=[Relay("relay"), Relay("client"), Relay("peer")])
    try:
        with (
            system.machine_lock(LOCK_WAIT_S, _log) as waited,
            system.no_idle_halt() as polling,
        ):
            result["waited_for_other_bench_s"] = waited
            # See system.no_idle_halt: without it, idle wake-ups in the VM lose datagrams.
            result["placement"]["idle_cores_poll"] = polling
            _measure(result, settings, only, topo)
    except system.MachineBusy as e:
        raise SystemExit(f"xdpturn-lab bench: {e}") from None
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    png_path = json_path.with_suffix(".png")
    result["files"] = {"json": str(json_path), "chart": str(png_path)}
    try:
        report.derive(result)
        result["table"] = report.table(result)
    except Exception as e:  # the measurements are kept even if the report has a bug
        result["report_error"] = repr(e)
        write_new(json_path, result)
        raise
    write_new(json_path, result)
    from xdpturn_lab.bench import chart

    chart.render(result, png_path)
    return result


def _measure(
    result: dict[str, Any], settings: Settings, only: Sequence[str], topo: Topology
) -> None:
    """Everything that is measured, on one testbed, into `result`."""
    with Testbed(topo) as tb:
        hosts = workloads.Hosts(tb, tb.relay("relay"), tb.relay("client"), tb.relay("peer"))
        system.napi_mode(hosts.relay.netns, workloads.HOST_IF)
        system.napi_mode(tb.inet_netns, "to-relay")
        _log("generator ceiling (no relay in the way)")
        sizes = sorted({w.size for w in settings.workloads})
        ceilings = [workloads.ceiling(hosts, size, settings.ceiling_s) for size in sizes]
        direct = workloads.ping_direct(hosts, settings.ping_rate, settings.ping_count, PING_SIZE)
        result["generator"] = {
            "ceiling": [
                {"size": size, **c.to_json()} for size, c in zip(sizes, ceilings, strict=True)
            ],
            "latency": report.ping_json(direct, settings.ping_rate, PING_SIZE),
        }
        plan = workloads.LoadPlan(
            workloads=settings.workloads,
            top_pps={
                size: _round_down(c.offered_pps) for size, c in zip(sizes, ceilings, strict=True)
            },
            search_settings=settings.search,
        )
        result["settings"]["top_pps"] = {str(k): v for k, v in plan.top_pps.items()}
        for name in only:
            _log(f"relay {name}")
            # Whatever else keeps the relay's core busy (other tests on a shared machine) shows
            # here: fixed measurement windows before the relay starts and after it stops. Their
            # mean is subtracted from the relay core's time in every trial (report.CPU_ACCOUNTING).
            idle = _background()
            relay = _make_relay(name, tb)
            relay.start()
            try:
                result["relays"][name] = asyncio.run(_bench_relay(hosts, relay, settings, plan))
            finally:
                relay.stop()
            entry = result["relays"][name]
            result["placement"].setdefault("napi_threads", {})[name] = entry.pop(
                "napi_threads", None
            )
            entry["background_relay_core_busy"] = idle
            # And after: other load may have come or gone meanwhile (report.background).
            entry["background_relay_core_busy_after"] = _background()
            # uclient against a fresh relay: the control plane left 8,000 allocations behind.
            relay = _make_relay(name, tb)
            relay.start()
            try:
                entry["uclient"] = _uclient_runs(hosts, relay, settings)
            except Exception as e:
                entry["errors"].append(f"uclient: {e!r}")
            finally:
                relay.stop()


def write_new(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("x") as f:  # never overwrite, even if one appeared meanwhile
        f.write(json.dumps(result, indent=1) + "\n")


def write_readme(results: Path, readme: Path = system.REPO / "README.md") -> None:
    """Rewrite README.md's benchmark table from `results` (named in it by its path)."""
    result = json.loads(results.read_text())
    try:
        source = str(results.resolve().relative_to(system.REPO))
    except ValueError:
        source = str(results)
    readme.write_text(report.rewrite_readme(readme.read_text(), result, source))


def main(args: argparse.Namespace) -> int:
    if args.readme:
        try:
            write_readme(Path(args.readme))
        except (OSError, ValueError, KeyError) as e:
            print(f"xdpturn-lab bench: --readme: {e}", file=sys.stderr)
            return 2
        print(f"rewrote README.md's benchmark table from {args.readme}")
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in only if n not in RELAYS]
    if bad or not only:
        print(f"xdpturn-lab bench: --only: expected names from {','.join(RELAYS)}", file=sys.stderr)
        return 2
    if args.duration is not None and not 0.2 <= args.duration <= 60:
        print("xdpturn-lab bench: --duration: expected 0.2 to 60 seconds", file=sys.stderr)
        return 2
    settings = Settings.make(args.quick, args.duration)
    result = run(settings, [n for n in RELAYS if n in only], Path(args.out))
    print(result["table"])
    print(f"\nwrote {result['files']['json']} and {result['files']['chart']}")
    return 0
