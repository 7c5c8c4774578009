"""Derived figures (CPU per million packets, ratios to coturn) and the printed table."""

from __future__ import annotations

from typing import Any

from xdpturn_lab.bench import tools

CPU_ACCOUNTING = (
    "cpu_s_per_Mpkt: CPU seconds of the relay process (utime+stime, all threads, /proc/PID/stat) "
    "plus those of the kernel thread that receives on the relay's interface (threaded NAPI, "
    "/proc/TID/stat), per million datagrams delivered. That thread runs the XDP program and its "
    "XDP_TX, and for the Python path and coturn the kernel's receive path up to the socket; the "
    "process's time holds its system calls and its sends up to the veth. Both are pinned to the "
    "relay core; the next hop drains the relay's output on the generator's core. Per-task times "
    "leave out whatever else runs on the machine. Datagrams received but dropped in overload "
    "cost CPU too and are in it (relay_rx_packets says how many arrived). The kernel samples by "
    "tick (250 Hz), so a figure over a 3 s run is good to a few per cent. Also kept: the relay "
    "core's busy time (relay_core_busy_s, includes other load) and the machine's softirq and "
    "busy time (/proc/stat is not per namespace)."
)

# metric key -> (label, unit, higher is better)
THROUGHPUT_METRICS = {
    "delivered_pps": ("delivered", "kpps", True),
    "cpu_s_per_Mpkt": ("CPU", "s/Mpkt", False),
}


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
        else {"p50": rtt.p50, "p90": rtt.p90, "p99": rtt.p99, "max": rtt.max, "mean": rtt.mean},
    }


def derive(result: dict[str, Any]) -> None:
    """Add CPU per million packets to every load run, and the ratios to coturn."""
    for c in result["generator"]["ceiling"]:
        _cpu_figures(c)
    for relay in result["relays"].values():
        for r in relay["throughput"]:
            _cpu_figures(r)
    result["ratios"] = ratios(result)


def _cpu_figures(r: dict[str, Any]) -> None:
    mpkt = r["delivered"] / 1e6
    cpu = r["cpu"]
    relay_s = cpu["relay_process_s"] + cpu["relay_napi_s"]
    r["cpu_s_per_Mpkt"] = relay_s / mpkt if mpkt else None
    for key, source in (
        ("relay_core_busy_s_per_Mpkt", "relay_core_busy_s"),
        ("relay_process_s_per_Mpkt", "relay_process_s"),
        ("softirq_s_per_Mpkt", "softirq_s"),
        ("machine_busy_s_per_Mpkt", "machine_busy_s"),
    ):
        r[key] = cpu[source] / mpkt if mpkt else None
    r["relay_core_busy"] = cpu["relay_core_busy_s"] / cpu["wall_s"] if cpu["wall_s"] else 0.0
    busy = relay_s / cpu["wall_s"] if cpu["wall_s"] else 0.0
    r["relay_busy"] = busy
    # What one whole relay core would carry at this per-packet cost: an extrapolation for a relay
    # the generator could not saturate (per-packet cost usually falls as batches grow).
    r["projected_pps_one_core"] = r["delivered_pps"] / busy if busy > 0.05 else None


def _metrics(relay: dict[str, Any]) -> dict[str, tuple[float | None, bool]]:
    """Flat metric name -> (value, higher is better) for one relay."""
    m: dict[str, tuple[float | None, bool]] = {}
    for r in relay.get("throughput", []):
        for key, (_, _, higher) in THROUGHPUT_METRICS.items():
            m[f"throughput/{r['name']}/{key}"] = (r.get(key), higher)
    rtt = (relay.get("latency") or {}).get("rtt_us")
    if rtt:
        for q in ("p50", "p90", "p99"):
            m[f"latency/rtt_{q}_us"] = (rtt[q], False)
    cp = relay.get("control_plane")
    if cp:
        m["control_plane/ops_per_s"] = (cp["ops_per_s"], True)
        if cp["succeeded"]:
            m["control_plane/relay_cpu_us_per_op"] = (
                1e6 * cp["relay_cpu_s"] / cp["succeeded"],
                False,
            )
        m["control_plane/rss_bytes"] = (float(cp["rss_bytes"]), False)
        m["control_plane/rss_per_allocation_bytes"] = (cp["rss_per_allocation_bytes"], False)
    return m


def ratios(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """relay/coturn for every metric both have ("xdp/coturn", "python/coturn")."""
    relays = result["relays"]
    if "coturn" not in relays:
        return {}
    base = _metrics(relays["coturn"])
    out: dict[str, dict[str, float | None]] = {}
    for name in ("xdp", "python"):
        if name not in relays:
            continue
        mine = _metrics(relays[name])
        row: dict[str, float | None] = {}
        for k, (v, _) in mine.items():
            b = base.get(k, (None, True))[0]
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


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    relays: dict[str, Any] = result["relays"]
    names: list[str] = [n for n in ("xdp", "python", "coturn") if n in relays]
    lines = [
        f"xdpturn bench  {result['started']}  {m['cpu_model']}, {m['cores']} cores, "
        f"kernel {m['kernel']}, {m['memory_mib']} MiB",
        f"relay on CPU {result['placement']['relay_cpu']}, load tools on CPU "
        f"{result['placement']['generator_cpu']}; {s['duration_s']} s per throughput run",
    ]
    ceil = ", ".join(
        f"{c['size']} B {c['delivered_pps'] / 1e3:,.0f} kpps (sent {c['offered_pps'] / 1e3:,.0f})"
        for c in result["generator"]["ceiling"]
    )
    lines.append(f"generator ceiling, no relay (client host -> peer host, IPv4): {ceil}")
    g_rtt = result["generator"]["latency"]["rtt_us"]
    if g_rtt:
        lines.append(
            f"ping with no relay at {s['ping_rate']:.0f}/s: p50 {g_rtt['p50']:.0f} us, "
            f"p99 {g_rtt['p99']:.0f} us"
        )
    target = ", ".join(f"{k} B {v / 1e3:,.0f} kpps" for k, v in s["target_pps"].items())
    first = next(iter(names), "")
    lines.append(
        f"offered rate: {first} at the ceiling ({target}, as far as the generator's core keeps "
        "up); every other relay at what it was offered, per run"
        if s.get("offered_pps_per_run")
        else f"offered rate (fixed, from the ceiling): {target}"
    )
    bg = ", ".join(
        f"{n} {100 * relays[n]['background_relay_core_busy']:.0f}%"
        for n in names
        if "background_relay_core_busy" in relays[n]
    )
    lines.append(f"relay core busy before each relay's runs, relay idle (other load): {bg}")
    lines.append("")
    rat = result.get("ratios", {})
    cols = [*names, *(k for k in ("xdp/coturn", "python/coturn") if k in rat)]
    head = f"{'workload':<26}{'metric':<16}" + "".join(f"{c:>14}" for c in cols)
    lines += [head, "-" * len(head)]

    def row(label: str, metric: str, key: str, values: dict[str, float | None]) -> None:
        cells = [_num(values.get(n)) for n in names]
        cells += [_ratio(rat[c].get(key)) for c in cols[len(names) :]]
        lines.append(f"{label:<26}{metric:<16}" + "".join(f"{c:>14}" for c in cells))

    runs: list[str] = []
    for n in names:
        for r in relays[n]["throughput"]:
            if r["name"] not in runs:
                runs.append(r["name"])
    by_name = {n: {r["name"]: r for r in relays[n]["throughput"]} for n in names}
    for run in runs:
        got = {n: by_name[n].get(run) for n in names}
        offered = {n: (r["offered_pps"] / 1e3 if r else None) for n, r in got.items()}
        row(run, "offered kpps", "-", offered)
        pps = {n: (r["delivered_pps"] / 1e3 if r else None) for n, r in got.items()}
        row("", "delivered kpps", f"throughput/{run}/delivered_pps", pps)
        loss = {n: (100 * r["loss"] if r else None) for n, r in got.items()}
        row("", "loss %", "-", loss)
        cpu = {n: (r["cpu_s_per_Mpkt"] if r else None) for n, r in got.items()}
        row("", "CPU s/Mpkt", f"throughput/{run}/cpu_s_per_Mpkt", cpu)
        busy = {n: (100 * r["relay_busy"] if r else None) for n, r in got.items()}
        row("", "relay CPU %", "-", busy)
    for q in ("p50", "p90", "p99"):
        vals = {n: ((relays[n].get("latency") or {}).get("rtt_us") or {}).get(q) for n in names}
        row(
            f"latency {s['ping_rate']:.0f}/s" if q == "p50" else "",
            f"RTT {q} us",
            f"latency/rtt_{q}_us",
            vals,
        )
    cps = {n: (relays[n].get("control_plane") or {}) for n in names}
    row(
        f"control plane x{s['allocations']}",
        "ops/s",
        "control_plane/ops_per_s",
        {n: c.get("ops_per_s") for n, c in cps.items()},
    )
    row(
        "",
        "driver CPU %",
        "-",
        {n: (100 * c["driver_cpu_s"] / c["elapsed_s"] if c else None) for n, c in cps.items()},
    )
    row(
        "",
        "relay CPU us/op",
        "control_plane/relay_cpu_us_per_op",
        {
            n: (1e6 * c["relay_cpu_s"] / c["succeeded"] if c.get("succeeded") else None)
            for n, c in cps.items()
        },
    )
    row(
        "",
        "RSS MiB",
        "control_plane/rss_bytes",
        {n: (c["rss_bytes"] / 2**20 if c else None) for n, c in cps.items()},
    )
    row(
        "",
        "RSS B/alloc",
        "control_plane/rss_per_allocation_bytes",
        {n: c.get("rss_per_allocation_bytes") for n, c in cps.items()},
    )
    row("", "live allocations", "-", {n: c.get("succeeded") for n, c in cps.items()})
    for n in names:
        for e in relays[n].get("errors", []):
            lines.append(f"! {n}: {e}")
    lines += [
        "",
        "generator: live frames (BPF_PROG_TEST_RUN, XDP_TX of a crafted frame from the sender's "
        "namespace), pinned to the load tools' CPU with routing and the sink.",
        "kpps: datagrams counted by a sink on the receiving host per second of sending; loss: "
        "1 - delivered/sent.",
        "CPU s/Mpkt: relay process + the NAPI thread receiving on the relay's interface (runs "
        "XDP), per million delivered (see cpu_accounting in the JSON).",
        "relay CPU %: that time over the run's; well below 100 means the relay was not the "
        "bottleneck (the generator's core was).",
        "control plane: driver CPU near 100% means the Python driver set the pace; relay CPU "
        "us/op is the relay's own cost.",
        "ratios: relay / coturn (higher kpps and ops/s are better; lower CPU, RTT, RSS are "
        "better).",
    ]
    return "\n".join(lines)
