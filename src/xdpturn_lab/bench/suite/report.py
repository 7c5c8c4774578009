"""Derived figures (CPU per million packets, ratios to coturn) and the printed table."""

from __future__ import annotations

import os
import statistics
from typing import Any

from xdpturn_lab.bench import tools
from xdpturn_lab.bench.suite.search import NDR_LOSS

CPU_ACCOUNTING = (
    "relay_us_per_pkt: the relay core's busy time during the trial (wall time less the core's "
    "idle and iowait time in /proc/stat, cpuN, which the kernel measures exactly), less the "
    "same core's background rate (the mean of 0.5 s windows before the relay started and after "
    "it stopped) times the trial's wall time, per datagram delivered. The relay process and the"
    " NAPI thread receiving on the relay's interface (XDP runs there) are pinned to that core "
    "and nothing else of the benchmark runs on it, so this is everything the relay does and "
    "makes the kernel do on the relay host: its receive path, its system calls, its transmit "
    "path up to the veth, softirq and IRQ work on that core, for all three relays alike. "
    "next_hop_us_per_pkt: the NAPI thread on the generator core that takes in the relay's "
    "output at the router's veth (/proc/TID/stat; with a NIC, part of it would be the relay "
    "host's transmit completion), including the router's forwarding to the receiving host; it "
    "is the same kind of work for every relay and is shown beside, not added in. The "
    "generator's own sends (which wake the relay's NAPI thread) are charged to nobody. Task "
    "times (/proc/TID/stat) are exact run times in 10 ms steps. Datagrams received and dropped "
    "cost CPU too and are included. If what is left after the subtraction is less than the "
    "relay's own tasks (process + NAPI thread) used, the background changed during the run: the"
    " workload gets no cost (cost_invalid says why), never a 0 or a guess."
)
BUSY_MACHINE = 0.1  # background on the relay core above this: the run is not a measurement
LOAD_LIMITED_BUSY = 0.8  # a relay core less busy than this at NDR: the load, not the relay, limits
DRIVER_BUSY = 0.9  # control-plane drivers busier than this (and the relay not): the driver's pace
# The relay core's time left after the background is subtracted may fall this far below the relay
# tasks' own time before it is no measurement: /proc counts in 1/USER_HZ steps (10 ms here), and
# the background windows, the trial and the tasks are each read to one step.
OWN_TIME_SLACK = 0.05
OWN_TIME_SLACK_S = 3 / os.sysconf("SC_CLK_TCK")


def ping_json(p: tools.PingResult, rate: float, size: int) -> dict[str, Any]:
    rtt = p.rtt_us
    return {
        "rate": rate,
        "size": size,
        "sent": p.sent,
        "received": p.received,
        "lost": p.lost,
        "rtt_us": None
        if rtt is None
        else {
            "min": rtt.min,
            "p50": rtt.p50,
            "p90": rtt.p90,
            "p99": rtt.p99,
            "p999": rtt.p999,
            "max": rtt.max,
            "mean": rtt.mean,
        },
    }


def _spread(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def _trial_cost(t: dict[str, Any], background: float) -> dict[str, float] | str:
    """The trial's cost per delivered datagram, or why it cannot be had: never 0 or negative.

    The relay's own tasks (its process and the NAPI thread receiving for it, both pinned to the
    relay core) are part of that core's busy time, so what is left after the background is
    subtracted cannot be less than their time. If it is, the background measured outside the
    trial was not the background during it (other load came or went), and the figure is no
    measurement of the relay."""
    cpu = t["cpu"]
    if not t["delivered"]:
        return "nothing delivered"
    core = cpu["relay_core_busy_s"] - background * cpu["wall_s"]
    own = cpu["relay_process_s"] + cpu["relay_napi_s"]
    if core <= 0 or core < own * (1 - OWN_TIME_SLACK) - OWN_TIME_SLACK_S:
        return (
            f"the relay core's background ({100 * background:.0f} % of "
            f"{cpu['wall_s']:.2f} s) left {core:.3f} s of its {cpu['relay_core_busy_s']:.3f} s "
            f"busy time, less than the relay's own tasks used ({own:.3f} s): other load on the "
            "relay core changed during the run"
        )
    return {
        "relay_us_per_pkt": 1e6 * core / t["delivered"],
        "next_hop_us_per_pkt": 1e6 * cpu["return_napi_s"] / t["delivered"],
        "relay_process_us_per_pkt": 1e6 * cpu["relay_process_s"] / t["delivered"],
        "relay_napi_us_per_pkt": 1e6 * cpu["relay_napi_s"] / t["delivered"],
        "relay_core_busy": core / t["elapsed_s"],
    }


LOSS_PLACES = {
    "relay_receive_ring": "ring",
    "in_or_after_relay": "relay",
    "relay_output_ring": "out",
    "before_relay": "before",
}


def lost_at(trials: list[dict[str, Any]]) -> dict[str, int] | None:
    """Where the trials' lost datagrams were lost, summed (None: not measured): before the relay
    (the generator's side), at the relay's receive ring (it was full when the router handed
    them on: the relay's NAPI poller was not running often enough), at the relay's output ring
    (the next hop was not taking them), or in or after the relay (its stack and sockets, the
    path to the sink)."""
    places = [t.get("lost_at") for t in trials]
    if not places or any(p is None for p in places):
        return None
    return {k: sum(p[k] for p in places if p) for k in LOSS_PLACES}


def _lost_at_text(w: dict[str, Any]) -> str:
    where = w.get("lost_at_ndr")
    if not where:
        return "-"
    parts = [f"{short} {where[k]:,}" for k, short in LOSS_PLACES.items() if where[k]]
    return ", ".join(parts) or "none"


def _lost_in_relay_above(w: dict[str, Any]) -> bool:
    """Whether the first search trial above the NDR that failed its goal lost most of its
    datagrams in the relay (its sockets' queues): then the relay set the rate even with its
    core under LOAD_LIMITED_BUSY (bursts overflowed its queues), not the load."""
    rate = (w.get("ndr") or {}).get("rate_pps")
    above = [
        t
        for t in w.get("search_trials", [])
        if rate is not None and t["offered_pps"] > rate and t["loss"] > NDR_LOSS
    ]
    if not above:
        return False
    where = min(above, key=lambda t: t["offered_pps"]).get("lost_at")
    if not where:
        return False
    return bool(2 * where["in_or_after_relay"] > sum(where.values()))


def derive_workload(w: dict[str, Any], background: float) -> None:
    """Cost per packet at NDR (median of the confirming trials), which limit applied, and the
    projection where the load, not the relay, was the limit. If any confirming trial's cost is
    not a measurement, there is no cost: `cost_at_ndr` is empty and `cost_invalid` says why."""
    ndr = w.get("ndr") or {}
    found = [_trial_cost(t, background) for t in ndr.get("confirms", [])]
    costs = [c for c in found if isinstance(c, dict)]
    invalid = [c for c in found if isinstance(c, str)]
    if not found:
        invalid = [f"no NDR: {ndr.get('reason') or 'not searched'}"]
    cost = {k: _spread([c[k] for c in costs]) for k in costs[0]} if costs and not invalid else {}
    w["cost_at_ndr"] = cost
    w["lost_at_ndr"] = lost_at(ndr.get("confirms", []))
    if invalid:
        w["cost_invalid"] = invalid[0]
    busy = (cost.get("relay_core_busy") or {}).get("median")
    limited = bool(w["load_limited"]) or (
        busy is not None and busy < LOAD_LIMITED_BUSY and not _lost_in_relay_above(w)
    )
    # No NDR: nothing to say what limited it (the reason says why there is none).
    w["limit"] = ("load" if limited else "relay") if ndr.get("confirms") else None
    per_pkt = (cost.get("relay_us_per_pkt") or {}).get("median")
    # What one relay core would carry at the measured cost: a projection, not a measurement.
    w["projected_pps_one_core"] = 1e6 / per_pkt if limited and per_pkt else None


def control_limit(cp: dict[str, Any]) -> str:
    """What set the control plane's pace: "relay" (its process was busy), "driver" (the driver
    processes were, and the relay was not), "other load" (the relay core was busy, but not with
    the relay), or "round trips" (nothing was busy: requests in flight and the relay's own waits
    did)."""
    elapsed = cp.get("elapsed_s") or 0.0
    relay = cp.get("relay_busy", cp["relay_cpu_s"] / elapsed if elapsed else 0.0)
    driver = cp.get("driver_busy", cp["driver_cpu_s"] / elapsed if elapsed else 0.0)
    if relay >= LOAD_LIMITED_BUSY:
        return "relay"
    if driver > DRIVER_BUSY:
        return "driver"
    if cp.get("relay_core_busy", 0.0) >= LOAD_LIMITED_BUSY:
        return "other load"
    return "round trips"


def relay_core_background(relay: dict[str, Any]) -> float:
    """The relay core's busy fraction with no relay: the mean of the windows before the relay
    started and after it stopped (older files have only the first)."""
    windows = [
        relay[k]
        for k in ("background_relay_core_busy", "background_relay_core_busy_after")
        if k in relay
    ]
    return sum(windows) / len(windows) if windows else 0.0


def derive(result: dict[str, Any]) -> None:
    for relay in result["relays"].values():
        bg = relay_core_background(relay)
        for w in relay.get("throughput", []):
            derive_workload(w, bg)
        runs = [r["rtt_us"] for r in relay.get("latency_runs", []) if r.get("rtt_us")]
        relay["latency"] = {q: _spread([r[q] for r in runs]) for q in ("p50", "p99", "p999")} | {
            "lost": sum(r["lost"] for r in relay.get("latency_runs", []))
        }
    result["ratios"] = ratios(result)


def _median(d: dict[str, Any] | None, key: str) -> float | None:
    x = (d or {}).get(key)
    return x.get("median") if isinstance(x, dict) else None


def _metrics(relay: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    for w in relay.get("throughput", []):
        m[f"{w['name']}/ndr_pps"] = _median(w.get("ndr"), "delivered_pps")
        m[f"{w['name']}/relay_us_per_pkt"] = _median(w.get("cost_at_ndr"), "relay_us_per_pkt")
    for q in ("p50", "p99"):
        m[f"latency/{q}"] = _median(relay.get("latency"), q)
    cp = relay.get("control_plane")
    if cp and cp["succeeded"]:
        m["control_plane/relay_us_per_op"] = 1e6 * cp["relay_cpu_s"] / cp["succeeded"]
    return m


def _busy_before_or_after(relay: dict[str, Any]) -> bool:
    return any(
        relay.get(k, 0.0) > BUSY_MACHINE
        for k in ("background_relay_core_busy", "background_relay_core_busy_after")
    )


def _cost_text(w: dict[str, Any], key: str, scale: float = 1.0) -> str:
    if w.get("cost_invalid"):
        return "no measurement (!)"
    return _spread_text(w["cost_at_ndr"].get(key), scale)


def ratios(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """relay/coturn for every metric both have ("xdp/coturn", "python/coturn")."""
    relays = result["relays"]
    if "coturn" not in relays:
        return {}
    base = _metrics(relays["coturn"])
    out: dict[str, dict[str, float | None]] = {}
    for name in ("xdp", "python"):
        if name in relays:
            mine = _metrics(relays[name])
            row: dict[str, float | None] = {}
            for k, v in mine.items():
                b = base.get(k)
                row[k] = v / b if v is not None and b else None
            out[f"{name}/coturn"] = row
    return out


# --- the table -----------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 1 else f"{x:.{digits + 2}f}"


def _spread_text(d: dict[str, float] | None, scale: float = 1.0) -> str:
    """median (min-max)"""
    if not d:
        return "-"
    return f"{_num(d['median'] * scale)} ({_num(d['min'] * scale)}-{_num(d['max'] * scale)})"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def uclient_text(u: dict[str, Any]) -> str:
    if u.get("error"):
        last = (u.get("output_tail") or "").strip().splitlines()[-1:] or [""]
        return f"failed: {u['error']} ({last[0][-60:]})"
    f = u["figures"]
    return (
        f"lost {f.get('lost_percent', float('nan')):.2f} %, RTT avg {f.get('rtt_avg_ms', 0):.2f}"
        f" ms (max {f.get('rtt_max_ms', 0):.0f} ms)"
    )


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    prov = result.get("provenance", {})
    se = s["search"]
    relays: dict[str, Any] = result["relays"]
    names: list[str] = [n for n in ("xdp", "python", "coturn") if n in relays]
    lines = [
        f"xdpturn bench  {result['started']}  {m['cpu_model']}, {m['cores']} cores, "
        f"kernel {m['kernel']}, {m['memory_mib']} MiB",
        f"commit {prov.get('commit') or '?'}{' (dirty tree)' if prov.get('dirty') else ''}; "
        f"command: {' '.join(result.get('command', []))}",
        f"relay on CPU {result['placement']['relay_cpu']}, load tools on CPU "
        f"{result['placement']['generator_cpu']}",
        f"rate search: NDR loss <= 0.1 %, PDR <= 1 %; search trials {se['trial_s']} s (at most "
        f"{se['max_trials']}, to {100 * se['precision']:.0f} %), then {se['confirm']} trials of "
        f"{se['confirm_s']} s at each final rate: median (min-max)",
    ]
    ceil = ", ".join(
        f"{c['size']} B {c['delivered_pps'] / 1e3:,.0f} kpps (loss {100 * c['loss']:.2f} %)"
        for c in result["generator"]["ceiling"]
    )
    lines.append(f"generator ceiling, no relay (client host -> peer host, IPv4): {ceil}")
    g_rtt = result["generator"]["latency"]["rtt_us"]
    if g_rtt:
        lines.append(
            f"ping with no relay at {s['ping_rate']:.0f}/s: p50 {g_rtt['p50']:.0f} us, "
            f"p99 {g_rtt['p99']:.0f} us"
        )
    bg = ", ".join(
        f"{n} {100 * relays[n]['background_relay_core_busy']:.0f}%"
        + (
            f"/{100 * relays[n]['background_relay_core_busy_after']:.0f}%"
            if "background_relay_core_busy_after" in relays[n]
            else ""
        )
        for n in names
        if "background_relay_core_busy" in relays[n]
    )
    lines.append(
        f"relay core busy with no relay, before/after each (other load, mean subtracted): {bg}"
    )
    busy = [n for n in names if _busy_before_or_after(relays[n])]
    if busy:
        lines.append(
            f"!! the relay core was over {100 * BUSY_MACHINE:.0f} % busy with other load around "
            f"{', '.join(busy)}: those columns do not measure the relay; rerun on an idle machine"
        )
    lines.append("")
    rat = result.get("ratios", {})
    cols = [*names, *(k for k in ("xdp/coturn", "python/coturn") if k in rat)]
    w0, w1, wc = 22, 22, 21
    head = f"{'workload':<{w0}}{'metric':<{w1}}" + "".join(f"{c:>{wc}}" for c in cols)
    lines += [head, "-" * len(head)]

    def row(label: str, metric: str, key: str | None, cells: dict[str, str]) -> None:
        out = [cells.get(n, "-") for n in names]
        out += [_ratio(rat[c].get(key)) if key else "-" for c in cols[len(names) :]]
        lines.append(f"{label:<{w0}}{metric:<{w1}}" + "".join(f"{c:>{wc}}" for c in out))

    runs: list[str] = []
    for n in names:
        for w in relays[n].get("throughput", []):
            if w["name"] not in runs:
                runs.append(w["name"])
    by = {n: {w["name"]: w for w in relays[n].get("throughput", [])} for n in names}
    for run in runs:
        got = {n: by[n].get(run) for n in names}
        have = {n: w for n, w in got.items() if w}

        def cells(f: Any, have: dict[str, Any] = have) -> dict[str, str]:
            return {n: f(w) for n, w in have.items()}

        row(
            run,
            "NDR kpps",
            f"{run}/ndr_pps",
            cells(lambda w: _spread_text((w.get("ndr") or {}).get("delivered_pps"), 1e-3)),
        )
        row(
            "",
            "PDR kpps",
            None,
            cells(lambda w: _spread_text((w.get("pdr") or {}).get("delivered_pps"), 1e-3)),
        )
        row(
            "",
            "loss % at NDR",
            None,
            cells(lambda w: _spread_text((w.get("ndr") or {}).get("loss"), 100)),
        )
        row("", "lost at NDR (**)", None, cells(_lost_at_text))
        row(
            "",
            "relay us/pkt at NDR",
            f"{run}/relay_us_per_pkt",
            cells(lambda w: _cost_text(w, "relay_us_per_pkt")),
        )
        row(
            "",
            "next hop us/pkt",
            None,
            cells(lambda w: _cost_text(w, "next_hop_us_per_pkt")),
        )
        row(
            "",
            "relay core % at NDR",
            None,
            cells(lambda w: _cost_text(w, "relay_core_busy", 100)),
        )
        limits = {"load": "load (*)", "relay": "relay", None: "-"}
        row("", "limit", None, cells(lambda w, limits=limits: limits[w["limit"]]))
        if any(w.get("projected_pps_one_core") for w in have.values()):
            row(
                "",
                "projected kpps/core *",
                None,
                cells(lambda w: _num((w.get("projected_pps_one_core") or 0) / 1e3 or None)),
            )
    for q, label in (("p50", "RTT p50 us"), ("p99", "RTT p99 us"), ("p999", "RTT p99.9 us")):
        row(
            f"latency {s['ping_rate']:.0f}/s" if q == "p50" else "",
            label,
            f"latency/{q}" if q != "p999" else None,
            {n: _spread_text((relays[n].get("latency") or {}).get(q)) for n in names},
        )
    cps = {n: (relays[n].get("control_plane") or {}) for n in names}
    row(
        f"control plane x{s['allocations']}",
        "relay CPU us/op",
        "control_plane/relay_us_per_op",
        {
            n: _num(1e6 * c["relay_cpu_s"] / c["succeeded"])
            for n, c in cps.items()
            if c.get("succeeded")
        },
    )
    row(
        "",
        "ops/s",
        None,
        {
            n: f"{_num(c['ops_per_s'])}" + (" (d)" if control_limit(c) == "driver" else "")
            for n, c in cps.items()
            if c
        },
    )
    row(
        "",
        "driver/relay/core busy%",
        None,
        {
            n: f"{100 * c['driver_busy']:.0f} / {100 * c['relay_busy']:.0f} / "
            f"{100 * c['relay_core_busy']:.0f}"
            for n, c in cps.items()
            if "relay_core_busy" in c
        },
    )
    row("", "pace set by", None, {n: control_limit(c) for n, c in cps.items() if c})
    row("", "RSS MiB", None, {n: _num(c["rss_bytes"] / 2**20) for n, c in cps.items() if c})
    row("", "live allocations", None, {n: _num(c["succeeded"]) for n, c in cps.items() if c})
    lines.append("")
    lines.append(
        f"turnutils_uclient -m 10 -z 0 -n {s['uclient_messages']} -l 100 to a turnutils_peer "
        "echo (uclient prints averages, not percentiles):"
    )
    for n in names:
        for u in relays[n].get("uclient", []):
            lines.append(f"  {n:<7} {u['mode']:<8} {uclient_text(u)}")
    for n in names:
        for e in relays[n].get("errors", []):
            lines.append(f"! {n}: {e}")
        for w in relays[n].get("throughput", []):
            if w.get("cost_invalid") and (w.get("ndr") or {}).get("confirms"):
                lines.append(f"! {n}: {w['name']}: no cost per packet: {w['cost_invalid']}")
            for goal in ("ndr", "pdr"):
                reason = (w.get(goal) or {}).get("reason")
                if reason:
                    lines.append(f"! {n}: {w['name']}: no {goal.upper()}: {reason}")
    lines += [
        "",
        "NDR/PDR kpps: datagrams counted by a sink on the receiving host per second of sending,",
        "  at the highest offered rate with loss <= 0.1 % / 1 %; each relay at its own rates.",
        "relay us/pkt: the relay core's busy time (less its background) per delivered datagram;",
        "  next hop us/pkt: the router's NAPI thread taking in the relay's output (not added in).",
        "(**) datagrams lost in the NDR's confirming trials, by place (the links' counters): "
        "'ring' the relay's",
        "  receive ring was full (the router could not hand them on), 'relay' in or after the "
        "relay, 'out' the relay's",
        "  output ring toward the next hop, 'before' on the generator's side.",
        "(*) limit 'load': the top rate passed, or at NDR the relay core was under "
        f"{100 * LOAD_LIMITED_BUSY:.0f} % busy and the first failing trial above it lost its "
        "datagrams outside the relay:",
        "  the generator's core (generator, routing, sink, return path) or the rings, not the "
        "relay, set the rate; projected kpps/core = 1 / relay us/pkt, a",
        "  projection from the measured cost, not a measurement.",
        "control plane: relay CPU us per authenticated Allocate+CreatePermission+ChannelBind (the",
        "  headline); driver/relay/core busy: CPU time / wall time of the drivers, the relay "
        "process and the relay's core;",
        f"  pace set by 'relay' when it was >= {100 * LOAD_LIMITED_BUSY:.0f} % busy, 'driver' "
        f"(and (d)) when the drivers were > {100 * DRIVER_BUSY:.0f} % busy, 'other load' when "
        "the relay core was busy but not with the relay,",
        "  else 'round trips' (requests in flight and the relay's own waits).",
        "ratios: relay / coturn.",
    ]
    return "\n".join(lines)


# --- the README's table --------------------------------------------------------------------------

README_BEGIN = "<!-- bench-table:begin (generated: xdpturn-lab bench --readme FILE) -->"
README_END = "<!-- bench-table:end -->"


def readme_table(result: dict[str, Any], source: str) -> str:
    """The README's benchmark section body, from one results file."""
    relays = result["relays"]
    names = [n for n in ("xdp", "python", "coturn") if n in relays]
    prov = result.get("provenance", {})
    m = result["machine"]
    dirty = " (tree dirty: not a committed state)" if prov.get("dirty") else ""
    out = [
        f"From `{source}` (commit `{(prov.get('commit') or '?')[:12]}`{dirty}; "
        f"`{' '.join(result.get('command', []))}`; {m['cpu_model']}, {m['cores']} cores, "
        f"kernel {m['kernel']}). Median of {result['settings']['search']['confirm']} trials "
        "(min-max).",
        "",
    ]
    busy = [n for n in names if _busy_before_or_after(relays[n])]
    if busy:
        out += [
            f"**Not a measurement for {', '.join(busy)}**: the relay core was busy with other "
            "load before or after the run.",
            "",
        ]
    out += [
        "| workload | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    by = {n: {w["name"]: w for w in relays[n].get("throughput", [])} for n in names}
    runs = list(dict.fromkeys(k for n in names for k in by[n]))
    for run in runs:
        cells = []
        for n in names:
            w = by[n].get(run)
            if not w:
                cells.append("-")
                continue
            text = _spread_text((w.get("ndr") or {}).get("delivered_pps"), 1e-3)
            cost = _median(w.get("cost_at_ndr"), "relay_us_per_pkt")
            text += f", {_num(cost)} us/pkt" if cost else ", no CPU measurement"
            if w["limit"] == "load":
                proj = w.get("projected_pps_one_core")
                text += " **load-limited**"
                if proj:
                    text += f" (projection: {_num(proj / 1e3)} kpps/core)"
            cells.append(text)
        out.append(f"| {run}: NDR kpps, relay CPU | " + " | ".join(cells) + " |")
    for q in ("p50", "p99", "p999"):
        cells = [_spread_text((relays[n].get("latency") or {}).get(q)) for n in names]
        rate = result["settings"]["ping_rate"]
        out.append(f"| RTT {q} us at {rate:.0f}/s | " + " | ".join(cells) + " |")
    cells = []
    for n in names:
        cp = relays[n].get("control_plane") or {}
        cells.append(
            _num(1e6 * cp["relay_cpu_s"] / cp["succeeded"]) if cp.get("succeeded") else "-"
        )
    out.append(
        "| relay CPU us per Allocate+CreatePermission+ChannelBind | " + " | ".join(cells) + " |"
    )
    cells = []
    for n in names:
        cp = relays[n].get("control_plane") or {}
        text = "-"
        if cp.get("succeeded"):
            text = f"{_num(cp['ops_per_s'])}, pace set by {control_limit(cp)}"
            if "driver_busy" in cp:
                text += f" (driver {100 * cp['driver_busy']:.0f} % busy)"
        cells.append(text)
    out.append("| control plane ops/s | " + " | ".join(cells) + " |")
    for mode in ("default", "-c"):
        cells = []
        for n in names:
            u = next((u for u in relays[n].get("uclient", []) if u["mode"] == mode), None)
            cells.append(uclient_text(u) if u else "-")
        out.append(f"| turnutils_uclient -m 10 ({mode}) | " + " | ".join(cells) + " |")
    out += [
        "",
        "NDR: highest offered rate with loss <= 0.1 %, each relay searched at its own rates. "
        "relay CPU: its core's busy time per delivered datagram (docs/performance.md, "
        '"Accounting"). **load-limited**: the generator\'s core, not the relay, set the rate; '
        "the projection divides one core by the measured cost and is not a measurement.",
    ]
    # A cell without a rate says why, with the search's own numbers.
    for n in names:
        for w in relays[n].get("throughput", []):
            reason = (w.get("ndr") or {}).get("reason")
            if reason:
                out += ["", f"{n}, {w['name']}: no NDR: {reason}."]
    return "\n".join(out)


def rewrite_readme(readme: str, result: dict[str, Any], source: str) -> str:
    """`readme` with the text between the markers replaced by `readme_table`."""
    try:
        head, rest = readme.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
    except ValueError:
        raise ValueError(f"README has no {README_BEGIN!r} ... {README_END!r} markers") from None
    return f"{head}{README_BEGIN}\n{readme_table(result, source)}\n{README_END}{tail}"
