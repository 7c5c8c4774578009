"""The benchmark's PNG chart (matplotlib, Agg): NDR per workload on a log scale (median, with the
min-max of the confirming trials as error bars) with the generator's ceiling, round-trip
percentiles (median of the runs), and control-plane cost and memory, per relay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLOURS = {"xdp": "#1b9e77", "python": "#7570b3", "coturn": "#d95f02"}


def render(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    relays: dict[str, Any] = result["relays"]
    names = [n for n in ("xdp", "python", "coturn") if n in relays]
    runs: list[str] = []
    for n in names:
        for r in relays[n]["throughput"]:
            if r["name"] not in runs:
                runs.append(r["name"])
    fig = plt.figure(figsize=(14, 9), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        got = {
            r["name"]: (r.get("ndr") or {}).get("delivered_pps")
            or {"min": 0, "median": 0, "max": 0}
            for r in relays[n]["throughput"]
        }
        zero = {"min": 0, "median": 0, "max": 0}
        med = [got.get(r, zero)["median"] / 1e3 for r in runs]
        err = [
            [m - got.get(r, zero)["min"] / 1e3 for m, r in zip(med, runs, strict=True)],
            [got.get(r, zero)["max"] / 1e3 - m for m, r in zip(med, runs, strict=True)],
        ]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(runs))]
        ax.bar(xs, med, width, yerr=err, label=n, color=COLOURS[n])
    for c in result["generator"]["ceiling"]:
        ax.axhline(c["delivered_pps"] / 1e3, ls="--", lw=1, color="grey")
        ax.annotate(
            f"ceiling {c['size']} B",
            (len(runs) - 0.5, c["delivered_pps"] / 1e3),
            fontsize=8,
            color="grey",
            ha="right",
            va="bottom",
        )
    ax.set_yscale("log")
    ax.set_ylabel("NDR kpps (loss <= 0.1 %)")
    ax.set_xticks(range(len(runs)), runs, rotation=30, ha="right", fontsize=8)
    ax.legend()
    m = result["machine"]
    ax.set_title(
        f"xdpturn bench {result['started']} - {m['cpu_model']}, {m['cores']} cores, "
        f"kernel {m['kernel']}"
    )

    ax2 = fig.add_subplot(grid[1, 0])
    qs = ("p50", "p99", "p999")
    for i, n in enumerate(names):
        lat = relays[n].get("latency") or {}
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(qs))]
        ax2.bar(xs, [(lat.get(q) or {}).get("median", 0) for q in qs], width, color=COLOURS[n])
    ax2.set_xticks(range(len(qs)), qs)
    ax2.set_ylabel("RTT us")
    ax2.set_title(f"latency at {result['settings']['ping_rate']:.0f}/s")

    cps = {n: relays[n].get("control_plane") or {} for n in names}
    ax3 = fig.add_subplot(grid[1, 1])
    ax3.bar(
        names,
        [
            1e6 * c["relay_cpu_s"] / c["succeeded"] if c.get("succeeded") else 0
            for c in cps.values()
        ],
        color=[COLOURS[n] for n in names],
    )
    ax3.set_title("relay CPU us per Allocate+Permission+ChannelBind")
    ax4 = fig.add_subplot(grid[1, 2])
    ax4.bar(
        names,
        [cps[n].get("rss_bytes", 0) / 2**20 for n in names],
        color=[COLOURS[n] for n in names],
    )
    ax4.set_title(f"RSS MiB, {result['settings']['allocations']} allocations")
    fig.savefig(path, dpi=100)
    plt.close(fig)
