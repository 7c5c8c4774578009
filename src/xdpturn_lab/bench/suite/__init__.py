"""`xdpturn-lab bench`: xdpturn's XDP fast path, its Python path and coturn side by side on the
testbed. `run` drives it, `workloads` holds the measurements, `relays` starts the relays under
test, `system` reads /proc and sets up the receiving sink, `report` derives ratios and the table.
"""

from __future__ import annotations

import argparse

RELAYS = ("xdp", "python", "coturn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `xdpturn-lab bench` (kept here so the CLI need not import the suite)."""
    p.add_argument(
        "--quick", action="store_true", help="a short run (IPv4, 100 B, 500 allocations)"
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds per confirming trial of the rate search (search trials: at most 1 s)",
    )
    p.add_argument(
        "--only",
        default=",".join(RELAYS),
        metavar="LIST",
        help=f"relays to run, comma-separated, from {','.join(RELAYS)} (default: all)",
    )
    p.add_argument(
        "--out",
        default="bench/results",
        metavar="DIR|FILE.json",
        help="a directory (the file is named by UTC time) or the results file; never overwritten",
    )
    p.add_argument(
        "--readme",
        metavar="FILE.json",
        help="no run: rewrite README.md's benchmark table from this committed results file",
    )
