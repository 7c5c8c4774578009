"""`xdpturn status` and `xdpturn drain`: talk to a running relay through its --metrics listener.

What the relay answers on GET /status is `xdpturn.server.snapshot.status_snapshot`; this module
asks for it and draws it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from xdpturn.cli.args import UsageError, parse_arg
from xdpturn.config import parse_positive, parse_seconds
from xdpturn.proto.addr import TransportAddr

DEFAULT_METRICS = "127.0.0.1:9478"
METRICS_ENV = "XDPTURN_METRICS"
HTTP_TIMEOUT = 5.0


# The command line's side


class StatusError(Exception):
    """The relay could not be asked (not running, no --metrics, refused)."""


def fetch(address: TransportAddr, path: str, *, method: str = "GET") -> tuple[int, bytes]:
    """(HTTP status, body) of one request to the relay's --metrics listener."""
    url = f"http://{address}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"cannot reach {url}: {reason} (is serve running with --metrics?)") from e


def _units(value: float, unit: str = "") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            text = f"{value:.0f}" if prefix == "" else f"{value:.1f}"
            return f"{text}{prefix}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render(snapshot: Mapping[str, Any], previous: Mapping[str, Any] | None, source: str) -> str:
    """The status table; rates are per second since `previous` (same relay, earlier)."""
    lines = []
    state = "DRAINING" if snapshot["draining"] else ("ready" if snapshot["ready"] else "NOT READY")
    if snapshot["draining"] and snapshot["drain_remaining_seconds"] is not None:
        state += f" ({snapshot['drain_remaining_seconds']:.0f} s left)"
    elif not snapshot["ready"]:
        state += f" ({'; '.join(snapshot['not_ready'])})"
    fp = snapshot["fastpath"]
    lines.append(
        f"xdpturn {snapshot['version']} at {source}   up {_duration(snapshot['uptime_seconds'])}"
        f"   {state}   fast path: {fp['mode']} (configured {fp['configured']})"
        + ("" if fp.get("problem") is None else "   NOT CARRYING")
    )
    allocs = snapshot["allocations"]
    families = ", ".join(f"{k} {v}" for k, v in allocs["by_family"].items() if v)
    lines.append(
        f"allocations {allocs['total']}"
        + (f" ({families})" if families else "")
        + f"   permissions {allocs['permissions']}   channels {allocs['channels']}"
        + f"   auth failures {snapshot['auth_failures']}"
    )
    workers = snapshot.get("workers")  # only with --workers N > 1
    if workers:
        lines.append(
            f"workers {len(workers)}:   "
            + "   ".join(
                f"#{w['worker']} {'up' if w['running'] else 'DOWN'} allocations "
                f"{w['allocations']} python {_units(w['python_packets'])} pkts"
                for w in workers
            )
        )
    if snapshot.get("max_bps"):
        measured = snapshot.get("throughput_bps")
        rate = "-" if measured is None else _units(measured, "bit/s")
        lines.append(f"relayed {rate} of --max-bps {_units(snapshot['max_bps'], 'bit/s')}")
    lines.append("")
    elapsed = snapshot["time"] - previous["time"] if previous else 0.0
    before = {(r["path"], r["route"]): r for r in previous["relayed"]} if previous else {}
    lines.append(
        f"{'path':<7} {'route':<28} {'packets':>10} {'bytes':>10} {'pkt/s':>9} {'bit/s':>9}"
    )
    for row in snapshot["relayed"]:
        old = before.get((row["path"], row["route"]))
        if old is not None and elapsed > 0:
            pps = _units((row["packets"] - old["packets"]) / elapsed)
            bps = _units(8 * (row["bytes"] - old["bytes"]) / elapsed)
        else:
            pps = bps = "-"
        lines.append(
            f"{row['path']:<7} {row['route']:<28} {_units(row['packets']):>10} "
            f"{_units(row['bytes'], 'B'):>10} {pps:>9} {bps:>9}"
        )
    problems = {f"pass:{k}": v for k, v in fp["passes"].items() if v}
    problems.update({f"drop:{k}": v for k, v in snapshot["drops"].items() if v})
    problems.update({f"xdp-drop:{k}": v for k, v in fp.get("drops", {}).items() if v})
    if problems:
        lines.append("")
        lines.append("  ".join(f"{k} {_units(v)}" for k, v in sorted(problems.items())))
    lines.append("")
    lines.append("top allocations (by payload bytes relayed on both paths, then channels)")
    lines.append(
        f"{'client':<42} {'user':<20} {'port':>5} {'family':<6} {'perm':>4} {'chan':>4} "
        f"{'bytes':>9} {'dropped':>8} {'expires':>7}"
    )
    for t in snapshot["top"]:
        dropped = sum(d["dropped_bytes"] for d in t["traffic"].values())
        lines.append(
            f"{t['client'][:42]:<42} {t['username'][:20]:<20} {t['relay_port']:>5} "
            f"{t['family']:<6} {t['permissions']:>4} {t['channels']:>4} "
            f"{_units(t['bytes'], 'B'):>9} {_units(dropped, 'B'):>8} "
            f"{_duration(max(0, t['expires_in'])):>7}"
        )
    if not snapshot["top"]:
        lines.append("(none)")
    return "\n".join(lines)


def _metrics_address(command: str, text: str) -> TransportAddr:
    try:
        return TransportAddr.parse(text)
    except ValueError:
        raise UsageError(command, f"--metrics: expected ADDRESS:PORT, got {text!r}") from None


def _add_metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        default=os.environ.get(METRICS_ENV, DEFAULT_METRICS),
        help=f"the relay's --metrics listener [env {METRICS_ENV}; default {DEFAULT_METRICS}]",
    )


def add_status_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="show a running relay's allocations and traffic",
        description="Ask a running relay (through its --metrics listener) for allocations, "
        "per-route counters and top allocations, and show them, refreshed in place.",
    )
    _add_metrics_option(p)
    p.add_argument("--json", action="store_true", help="print JSON (one object per refresh)")
    p.add_argument("--interval", default="2", metavar="S", help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="show once and exit")
    p.add_argument("--top", default="10", metavar="N", help="allocations to list (default 10)")
    p.set_defaults(run=_status)


def _status(args: argparse.Namespace) -> int:
    address = _metrics_address("status", args.metrics)
    interval = parse_arg("status", "--interval", parse_seconds, args.interval)
    top = parse_arg("status", "--top", parse_positive, args.top)
    return watch(address, interval=interval, top=top, once=args.once, as_json=args.json)


def watch(
    address: TransportAddr,
    *,
    interval: float,
    top: int,
    once: bool,
    as_json: bool,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    out = out if out is not None else sys.stdout
    # Refresh in place only for a person at a terminal; a pipe gets one frame after another.
    in_place = not once and not as_json and out.isatty()
    previous: dict[str, Any] | None = None
    try:
        while True:
            try:
                status, body = fetch(address, f"/status?top={top}")
            except StatusError as e:
                print(f"xdpturn status: {e}", file=sys.stderr)
                return 1
            if status != 200:
                print(
                    f"xdpturn status: HTTP {status}: {body.decode(errors='replace')}",
                    file=sys.stderr,
                )
                return 1
            snapshot: dict[str, Any] = json.loads(body)
            if as_json:
                out.write(json.dumps(snapshot) + "\n")
            else:
                frame = render(snapshot, previous, str(address))
                # Home, draw, clear what is left of the previous (longer) frame.
                out.write(f"\x1b[H{frame}\x1b[J\n" if in_place else frame + "\n\n")
            out.flush()
            if once:
                return 0
            previous = snapshot
            sleep(interval)
    except KeyboardInterrupt:
        return 0


def add_drain_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "drain",
        help="make a running relay drain, as SIGTERM does",
        description="Tell a running relay (through its --metrics listener, from this host) to "
        "stop taking new allocations, keep the existing ones until they end or "
        "--drain-timeout passes, then exit.",
    )
    _add_metrics_option(p)
    p.set_defaults(run=_drain)


def _drain(args: argparse.Namespace) -> int:
    address = _metrics_address("drain", args.metrics)
    try:
        status, body = fetch(address, "/drain", method="POST")
    except StatusError as e:
        print(f"xdpturn drain: {e}", file=sys.stderr)
        return 1
    text = body.decode(errors="replace").strip()
    if status not in (200, 202):
        print(f"xdpturn drain: HTTP {status}: {text}", file=sys.stderr)
        return 1
    answer = json.loads(text)
    left = answer.get("remaining_seconds")
    print(
        ("draining" if answer.get("started") else "already draining")
        + f": {answer.get('allocations')} allocations"
        + (f", exits within {left:.0f} s" if isinstance(left, int | float) else "")
    )
    return 0


__all__ = [
    "DEFAULT_METRICS",
    "StatusError",
    "add_drain_command",
    "add_status_command",
    "fetch",
    "render",
    "watch",
]
