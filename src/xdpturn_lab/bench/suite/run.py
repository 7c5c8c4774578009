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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdpturn_lab.bench import tools
from xdpturn_lab.bench.suite import RELAYS, report, system, workloads
from xdpturn_lab.bench.suite.relays import (
    GENERATOR_CPU,
    RELAY_CPU,
    CoturnRelay,
    RelayUnderTest,
    XdpturnRelay,
    raise_fd_limit,
)
from xdpturn_lab.testbed import Relay, Testbed, Topology, cleanup_stale

PING_SIZE = 100
BACKGROUND_WINDOW = 0.5  # seconds


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration: float  # seconds per throughput run
    sizes: tuple[int, ...]
    families: tuple[str, ...]
    hairpin_families: tuple[str, ...]
    ping_rate: float
    ping_count: int
    allocations: int
    concurrency: int

    @classmethod
    def make(cls, quick: bool, duration: float | None) -> Settings:
        if quick:
            return cls(True, duration or 1.0, (100,), ("ipv4",), ("ipv4",), 2000, 2000, 500, 100)
        return cls(
            False,
            duration or 3.0,
            (100, 1200),
            ("ipv4", "ipv6", "cross"),
            ("ipv4",),
            5000,
            10000,
            10000,
            200,
        )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _round_down(x: float) -> float:
    """Two significant digits, down: the fixed offered rate every relay gets."""
    if x <= 0:
        return 1.0
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    return float(math.floor(x / scale) * scale)


def _same_load(plan: workloads.LoadPlan, runs: list[dict[str, Any]]) -> workloads.LoadPlan:
    """The plan for the relays after the first: each run at the rate the first relay was offered
    (rounded down). The generator's core also carries the path back from the relay, so with the
    fast path first (it leaves that core the least) that is the most this testbed offers through
    a relay, and every relay gets the same load."""
    per_run = {r["name"]: _round_down(r["offered_pps"]) for r in runs if r["sent"]}
    return dataclasses.replace(plan, per_run=per_run)


def _make_relay(name: str, tb: Testbed) -> RelayUnderTest:
    node = tb.relay("relay")
    if name == "coturn":
        return CoturnRelay(tb, node, relay_threads=len(RELAY_CPU.split(",")))
    return XdpturnRelay(tb, node, fastpath=name == "xdp")


async def _bench_relay(
    hosts: workloads.Hosts,
    relay: RelayUnderTest,
    settings: Settings,
    plan: workloads.LoadPlan,
) -> dict[str, Any]:
    rss_idle = system.rss_bytes(relay.pid)
    errors: list[str] = []
    # Latency first, with NAPI in softirq as a NIC's interrupt would run it: threaded NAPI adds
    # two thread wake-ups per hop, which would swamp a fast path's round trip.
    _log(f"  {relay.name}: latency")
    latency: dict[str, Any] | None = None
    try:
        ping = await workloads.latency(
            hosts, relay, settings.ping_rate, settings.ping_count, PING_SIZE
        )
        latency = report.ping_json(ping, settings.ping_rate, PING_SIZE)
    except Exception as e:
        errors.append(f"latency: {e!r}")
    # For throughput, the relay host's receive path (NAPI, which runs XDP) gets its own thread on
    # the relay's core, and the path draining the relay's output one ahead of the generator on
    # the generator's core (see system.pin_napi). Undone before the next relay.
    relay_napi = system.pin_napi(hosts.relay.netns, workloads.HOST_IF, RELAY_CPU)
    try:
        out_napi = system.pin_napi(hosts.tb.inet_netns, "to-relay", GENERATOR_CPU, realtime=True)
        try:
            pinned = dataclasses.replace(hosts, relay_napi=tuple(relay_napi))
            loads, load_errors = await workloads.throughput(pinned, relay, plan, _log)
        finally:
            system.unpin_napi(hosts.tb.inet_netns, "to-relay")
    finally:
        system.unpin_napi(hosts.relay.netns, workloads.HOST_IF)
    errors += load_errors
    out: dict[str, Any] = {
        "info": relay.info(),
        "throughput": [r.to_json() for r in loads],
        "errors": errors,
        "napi_threads": {"relay_rx": relay_napi, "relay_output": out_napi},
    }
    if latency is not None:
        out["latency"] = latency
    if isinstance(relay, XdpturnRelay) and relay.name == "xdp":
        out["fastpath_counters"] = relay.fastpath_counters()
    _log(f"  {relay.name}: control plane, {settings.allocations} allocations")
    try:
        cp = await workloads.control_plane(
            hosts, relay, settings.allocations, settings.concurrency, rss_idle
        )
        out["control_plane"] = cp.to_json()
    except Exception as e:
        errors.append(f"control plane: {e!r}")
    return out


def run(settings: Settings, only: Sequence[str], out_dir: Path) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("xdpturn-lab bench: needs root (namespaces, XDP, nftables)")
    tools.build()
    raise_fd_limit()
    cleanup_stale()
    started = dt.datetime.now(dt.UTC)
    result: dict[str, Any] = {
        "format": 2,
        "started": started.isoformat(timespec="seconds"),
        "command": ["xdpturn-lab", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else [],
        "machine": system.machine(),
        "settings": {
            "quick": settings.quick,
            "duration_s": settings.duration,
            "sizes": list(settings.sizes),
            "families": list(settings.families),
            "hairpin_families": list(settings.hairpin_families),
            "ping_rate": settings.ping_rate,
            "ping_count": settings.ping_count,
            "allocations": settings.allocations,
            "concurrency": settings.concurrency,
            "relays": list(only),
        },
        "placement": {
            "relay_cpu": RELAY_CPU,
            "generator_cpu": GENERATOR_CPU,
            "note": "the relay process is pinned to relay_cpu and the load tools to "
            "generator_cpu. During throughput runs the NAPI thread receiving on the relay's "
            "interface (it runs XDP) is pinned to relay_cpu, and the one draining the relay's "
            "output to generator_cpu with SCHED_FIFO; routing and the receiving sink run on "
            "generator_cpu. Latency runs use NAPI in softirq (no threads), as with a NIC.",
        },
        "cpu_accounting": report.CPU_ACCOUNTING,
        "relays": {},
    }
    topo = Topology(relays=[Relay("relay"), Relay("client"), Relay("peer")])
    with Testbed(topo) as tb:
        hosts = workloads.Hosts(tb, tb.relay("relay"), tb.relay("client"), tb.relay("peer"))
        system.napi_mode(hosts.relay.netns, workloads.HOST_IF)
        system.napi_mode(tb.inet_netns, "to-relay")
        _log("generator ceiling (no relay in the way)")
        ceilings = [workloads.ceiling(hosts, size, settings.duration) for size in settings.sizes]
        direct = workloads.ping_direct(hosts, settings.ping_rate, settings.ping_count, PING_SIZE)
        result["generator"] = {
            "ceiling": [c.to_json() for c in ceilings],
            "latency": report.ping_json(direct, settings.ping_rate, PING_SIZE),
        }
        plan = workloads.LoadPlan(
            duration=settings.duration,
            sizes=settings.sizes,
            families=settings.families,
            hairpin_families=settings.hairpin_families,
            target_pps={c.size: _round_down(c.offered_pps) for c in ceilings},
        )
        result["settings"]["target_pps"] = {str(k): v for k, v in plan.target_pps.items()}
        for name in only:
            _log(f"relay {name}")
            relay = _make_relay(name, tb)
            # Whatever else keeps the relay's core busy (other tests on a shared machine) shows
            # here: a fixed measurement window before the relay starts.
            before = system.cpu_sample(None, RELAY_CPU)
            time.sleep(BACKGROUND_WINDOW)
            idle = system.cpu_sample(None, RELAY_CPU) - before
            relay.start()
            try:
                result["relays"][name] = asyncio.run(_bench_relay(hosts, relay, settings, plan))
                result["placement"].setdefault("napi_threads", {})[name] = result["relays"][
                    name
                ].pop("napi_threads")
                result["relays"][name]["background_relay_core_busy"] = idle.relay_cpu / idle.wall
            finally:
                relay.stop()
            if not plan.per_run:
                plan = _same_load(plan, result["relays"][name]["throughput"])
                result["settings"]["offered_pps_per_run"] = dict(plan.per_run)
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report.derive(result)
    result["table"] = report.table(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = started.strftime("%Y-%m-%dT%H%M%SZ")
    json_path = out_dir / f"{stem}.json"
    png_path = out_dir / f"{stem}.png"
    result["files"] = {"json": str(json_path), "chart": str(png_path)}
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    from xdpturn_lab.bench import chart

    chart.render(result, png_path)
    return result


def main(args: argparse.Namespace) -> int:
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
