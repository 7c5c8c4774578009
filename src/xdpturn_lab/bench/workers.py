"""How the Python path's relayed throughput grows with `xdpturn serve --workers N`, and how it
compares with coturn on the same cores under coturn's own load client.

    sudo .venv/bin/python -m xdpturn_lab.bench.workers --workers 1,2 --duration 5
    sudo .venv/bin/python -m xdpturn_lab.bench.workers --uclient --workers 1,2 --runs 3

In a network namespace of its own, on loopback, for each N: `xdpturn serve --fastpath off
--workers N`; `--allocations` TURN clients (distinct source ports, which the kernel spreads over
the workers), each with a channel to one sink (`xdpturn-blast recv`); one `xdpturn-blast send` per
allocation offers ChannelData at `--rate`/allocations per second for `--duration` seconds. Prints,
per N, the datagrams the sink received per second through the relay and the loss. Everything
shares the machine's cores: the relay's workers, the senders, the sink and the kernel's loopback
path, so on a small machine the figure is a lower bound on what the workers alone would do; the
CPU time the relay's processes used is printed beside it (cores busy, datagrams per core-second).

With `--uclient`: for each N, `xdpturn serve --fastpath off --workers N` and coturn's `turnserver
--relay-threads N`, each pinned to the first N CPUs, take turns (the order alternates run by run)
under `turnutils_uclient -m 10 -z 0 -l 100 -n MESSAGES` to a `turnutils_peer` echo, in uclient's
default mode (RTP/RTCP pairs) and with `-c`; uclient, the echo and a tcpdump of the relay's port
run on the remaining CPUs (unpinned when none remain). Prints per N, mode and relay uclient's loss
and round trips, the round trips' percentiles from the capture, and datagrams relayed per CPU
second of the relay's processes, with xdpturn/coturn ratios, and writes the runs to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdpturn.proto.addr import Family, TransportAddr
from xdpturn_lab.bench import tools
from xdpturn_lab.bench.suite import report, system, uclient
from xdpturn_lab.bench.suite.relays import RELAY_PORTS, coturn_argv
from xdpturn_lab.bench.suite.run import LOCK_WAIT_S, results_path, write_new
from xdpturn_lab.bench.suite.workloads import Turn, bind, open_turn
from xdpturn_lab.testbed import netns

SECRET = "workers-bench"
LISTEN = TransportAddr.parse("127.0.0.1:3478")
METRICS = "127.0.0.1:9478"
PUBLIC = "203.0.113.1"  # not the loopback address, so the sink on loopback is a plain peer
START_TIMEOUT = 15.0


@dataclass
class Figure:
    workers: int
    offered: int
    received: int
    duration: float
    relay_cpu: float  # CPU seconds the relay's processes used while the senders ran

    @property
    def pps(self) -> float:
        return self.received / self.duration

    @property
    def cores(self) -> float:
        return self.relay_cpu / self.duration

    @property
    def per_core(self) -> float:
        """Datagrams relayed per CPU second of the relay: what a core does, busy or shared."""
        return self.received / self.relay_cpu if self.relay_cpu else 0.0

    @property
    def loss(self) -> float:
        return 1 - self.received / self.offered if self.offered else 0.0


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"xdpturn-workers-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the supervisor and its workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(p for child in children for p in process_tree(int(child)))]


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def pinned(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


@contextlib.contextmanager
def relay(ns: str, workers: int, cpus: str | None = None) -> Iterator[int]:
    """`xdpturn serve --workers N` with the fast path off (pinned to `cpus` if given); the
    limits on unauthenticated answers and on STUN per source are off, as in the bench suite
    (relays.py): every client here has the one address 127.0.0.1, and coturn has neither."""
    low, high = RELAY_PORTS
    argv = [*tools.netns_prefix(ns), *pinned(cpus), sys.executable, "-m", "xdpturn", "serve"]
    argv += ["--listen", str(LISTEN), "--public-ipv4", PUBLIC, "--auth-secret", SECRET]
    argv += ["--allow-peer", "127.0.0.0/8", "--ports", f"{low}-{high}", "--fastpath", "off"]
    argv += ["--metrics", METRICS, "--workers", str(workers), "--log-level", "WARNING"]
    argv += ["--unauthenticated-rate", "0", "--stun-rate-per-source", "0"]
    # A run that failed midway leaves allocations behind; draining them is not measured.
    argv += ["--drain-timeout", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(ns):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"xdpturn serve --workers {workers} did not become ready")
            time.sleep(0.1)
        yield proc.pid
    finally:
        _stop(proc)  # SIGTERM drains (at most --drain-timeout)


@contextlib.contextmanager
def coturn(ns: str, threads: int, cpus: str | None = None) -> Iterator[int]:
    """coturn's `turnserver` as the bench suite runs it (relays.coturn_argv) with `threads`
    relay threads, on 127.0.0.1 (so loopback peers must be allowed), pinned to `cpus`."""
    with tempfile.TemporaryDirectory(prefix="xdpturn-workers-coturn-") as state:
        argv = coturn_argv(
            listen=[str(LISTEN.ip)],
            port=LISTEN.port,
            secret=SECRET,
            threads=threads,
            state_dir=state,
        )
        argv = [*tools.netns_prefix(ns), *pinned(cpus), *argv, "--allow-loopback-peers"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            try:
                uclient.wait_bound(tools.netns_prefix(ns), LISTEN.port, START_TIMEOUT)
            except RuntimeError:
                log = Path(state, "turnserver.log")
                tail = log.read_text()[-1000:] if log.exists() else "(no log)"
                raise RuntimeError(f"turnserver did not start: {tail}") from None
            yield proc.pid  # `ip netns exec` and taskset exec in place: the relay's own pid
        finally:
            _stop(proc)  # SIGTERM: coturn ignores SIGINT


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _ready(ns: str) -> bool:
    with netns.entered(ns):
        try:
            with urllib.request.urlopen(f"http://{METRICS}/readyz", timeout=1) as response:
                return int(response.status) == 200
        except OSError:  # not listening yet, or 503 (HTTPError is an OSError)
            return False


async def measure(
    ns: str, relay_pid: int, workers: int, allocations: int, rate: float, duration: float
) -> Figure:
    sink_cmd = tools.recv(("127.0.0.1", 0), duration=duration + 10, idle_timeout=1.0)
    with sink_cmd.start(tools.netns_prefix(ns)) as sink:
        sink_port = sink.wait_ready().port
        turns: list[Turn] = []
        try:
            for i in range(allocations):
                turn = await open_turn(ns, LISTEN, SECRET, Family.IPV4, f"bench{i}")
                turns.append(turn)
                await bind(turn, TransportAddr.parse(f"127.0.0.1:{sink_port}"))
            pids = process_tree(relay_pid)
            cpu_before = cpu_seconds(pids)
            senders = [
                tools.send(
                    (str(LISTEN.ip), LISTEN.port),
                    size=100,
                    rate=rate / allocations,
                    duration=duration,
                    channel=turn.channel,
                    fd=turn.sock.fileno(),
                ).start()
                for turn in turns
            ]
            sent = [s.result() for s in senders]
            relay_cpu = cpu_seconds(pids) - cpu_before
            received = sink.result()
        finally:
            for turn in turns:
                turn.transport.close()
    return Figure(workers, sum(s.sent for s in sent), received.received, duration, relay_cpu)


# --- turnutils_uclient: xdpturn and coturn on the same cores -------------------------------------

UCLIENT_RELAYS = ("xdpturn", "coturn")
Run = dict[str, Any]  # one uclient run's record, as in the JSON
# uclient busier than this (CPU time over the span of its data messages): it set the pace.
CLIENT_LIMIT_BUSY = 0.9


def placement(workers: int) -> tuple[str, str | None]:
    """The CPUs of the relay (the first `workers` this process may use) and of the load tools
    (the rest; None when no CPU is left: then they are not pinned)."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers > len(cpus):
        raise SystemExit(f"--workers {workers}: this process may use only {len(cpus)} CPUs")
    rest = cpus[workers:]
    return ",".join(map(str, cpus[:workers])), ",".join(map(str, rest)) or None


def uclient_run(ns: str, name: str, workers: int, mode: str, messages: int, repeat: int) -> Run:
    """One relay started on its CPUs, one uclient run in `mode` against it, and the relay's CPU
    time over that run."""
    relay_cpus, load_cpus = placement(workers)
    start = relay(ns, workers, relay_cpus) if name == "xdpturn" else coturn(ns, workers, relay_cpus)
    load = [*tools.netns_prefix(ns), *pinned(load_cpus)]
    with start as pid:
        pids = process_tree(pid)
        before = cpu_seconds(pids)
        r = uclient.run(
            SECRET,
            str(LISTEN.ip),
            load,
            str(LISTEN.ip),
            load,
            mode,
            messages,
            timeout=30 + messages / 200,  # ~5 s of stagger, up to 10 s of tail, the sending
            capture_prefix=load,
            relay_port=LISTEN.port,
        )
        relay_cpu = cpu_seconds(pids) - before
    f, wire = r.figures, r.wire or {}
    # Every message sent crossed the relay on its way to the echo (unless dropped there), every
    # one received crossed it again on its way back.
    relayed = f.get("sent", 0.0) + f.get("received", 0.0)
    span = wire.get("span_s", 0.0)
    return {
        "relay": name,
        "workers": workers,
        "mode": mode,
        "repeat": repeat,
        "relay_cpus": relay_cpus,
        "load_cpus": load_cpus,
        "relay_processes": len(pids),
        "relay_cpu_s": relay_cpu,
        "relayed": relayed,
        "relayed_per_cpu_s": relayed / relay_cpu if relay_cpu > 0 else None,
        "relayed_per_s": relayed / span if span > 0 else None,
        "client_busy": r.client_cpu_s / span if span > 0 else None,
        "relay_busy_cores": relay_cpu / span if span > 0 else None,
        "uclient": r.to_json(),
    }


def _median(runs: list[Run], get: Callable[[Run], float | None]) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


# column -> how to read it from a run (None when the run did not yield it)
SUMMARY: dict[str, Callable[[Run], float | None]] = {
    "lost %": lambda r: r["uclient"]["figures"].get("lost_percent"),
    "RTT avg ms": lambda r: r["uclient"]["figures"].get("rtt_avg_ms"),
    "RTT max ms": lambda r: r["uclient"]["figures"].get("rtt_max_ms"),
    "wire p50 ms": lambda r: (r["uclient"]["wire"] or {}).get("rtt_p50_ms"),
    "wire p99 ms": lambda r: (r["uclient"]["wire"] or {}).get("rtt_p99_ms"),
    "relayed/s": lambda r: r["relayed_per_s"],
    "per relay CPU-s": lambda r: r["relayed_per_cpu_s"],
    "uclient busy": lambda r: r["client_busy"],
    "relay cores": lambda r: r["relay_busy_cores"],
}


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """Per worker count, mode and relay: the runs that finished, and each column's median."""
    rows = []
    keys = dict.fromkeys((r["workers"], r["mode"], r["relay"]) for r in runs)
    for workers, mode, name in keys:
        mine = [r for r in runs if (r["workers"], r["mode"], r["relay"]) == (workers, mode, name)]
        ok = [r for r in mine if r["uclient"]["error"] is None]
        busy = _median(ok, SUMMARY["uclient busy"])
        rows.append(
            {
                "workers": workers,
                "mode": mode,
                "relay": name,
                "runs": len(mine),
                "finished": len(ok),
                # uclient's error and its last line ("... error 508 (...)"), once each
                "failures": list(
                    dict.fromkeys(
                        report.uclient_text(r["uclient"]) for r in mine if r["uclient"]["error"]
                    )
                ),
                "median": {col: _median(ok, get) for col, get in SUMMARY.items()},
                "uclient_limit": busy is not None and busy >= CLIENT_LIMIT_BUSY,
            }
        )
    return rows


def _cell(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def uclient_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    cols = list(SUMMARY)
    lines = [
        f"turnutils_uclient -m {uclient.CLIENTS} -z 0 -l {uclient.PAYLOAD} -n {s['messages']} to "
        f"a turnutils_peer echo, {s['runs']} runs per cell, medians; fast path off",
        "relayed = uclient's sent + received messages (each crosses the relay once per "
        "direction); wire p50/p99: round trips in the capture; busy: CPU time over the span of "
        "the data messages",
    ]
    widths = [max(len(c), 8) for c in cols]
    header = f"  {'mode':<8} {'relay':<15} {'done':>5} " + " ".join(
        f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)
    )
    for workers in dict.fromkeys(r["workers"] for r in result["summary"]):
        place = result["placement"][str(workers)]
        load_cpus = place["load_cpus"]
        lines += [
            "",
            f"workers {workers}: relays on CPU {place['relay_cpus']}; uclient, echo and capture "
            + (f"on CPU {load_cpus}" if load_cpus else "unpinned (no CPU left)"),
            header,
        ]
        rows = [r for r in result["summary"] if r["workers"] == workers]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            by = {r["relay"]: r for r in rows if r["mode"] == mode}
            for name, row in by.items():
                cells = " ".join(
                    f"{_cell(row['median'][c]):>{w}}" for c, w in zip(cols, widths, strict=True)
                )
                flag = " (uclient set the pace)" if row["uclient_limit"] else ""
                done = f"{row['finished']}/{row['runs']}"
                lines.append(f"  {mode:<8} {name:<15} {done:>5} {cells}{flag}")
            x, c = by.get("xdpturn"), by.get("coturn")
            if x and c:
                ratios = []
                for col in cols:
                    a, b = x["median"][col], c["median"][col]
                    ratios.append(f"{a / b:.2f}x" if a is not None and b else "-")
                ratio_cells = " ".join(f"{v:>{w}}" for v, w in zip(ratios, widths, strict=True))
                lines.append(f"  {mode:<8} {'xdpturn/coturn':<15} {'':>5} {ratio_cells}")
            for row in by.values():
                for failure in row["failures"]:
                    lines.append(f"  {mode:<8} {row['relay']:<15} {failure}")
    return "\n".join(lines)


def compare_uclient(
    worker_counts: Sequence[int], runs: int, messages: int, modes: Sequence[str], out: Path
) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, CPU pinning, packet capture)")
    for tool in ("turnserver", "turnutils_uclient", "turnutils_peer", "tcpdump"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian's coturn and tcpdump packages)")
    for workers in worker_counts:
        placement(workers)  # refuse before measuring anything
    started = dt.datetime.now(dt.UTC)
    json_path = results_path(out, started, "uclient-workers-")
    if json_path.exists():
        raise SystemExit(f"{json_path} exists; results are never overwritten")
    result: dict[str, Any] = {
        "format": 1,
        "started": started.isoformat(timespec="seconds"),
        "command": ["python", "-m", "xdpturn_lab.bench.workers", *sys.argv[1:]],
        "cwd": os.getcwd(),
        "provenance": system.provenance(),
        "machine": system.machine(),
        "settings": {
            "workers": list(worker_counts),
            "runs": runs,
            "messages": messages,
            "modes": list(modes),
            "clients": uclient.CLIENTS,
            "payload": uclient.PAYLOAD,
        },
        "placement": {
            str(w): dict(zip(("relay_cpus", "load_cpus"), placement(w), strict=True))
            for w in worker_counts
        },
        "runs": [],
    }
    print(f"# cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} before the runs")
    try:
        with system.machine_lock(LOCK_WAIT_S, print) as waited, namespace() as ns:
            result["waited_for_other_bench_s"] = waited
            for repeat in range(runs):
                # Alternate which relay goes first, so a drift in the machine's load
                # (other work coming or going) does not always favour the same one.
                order = UCLIENT_RELAYS if repeat % 2 == 0 else UCLIENT_RELAYS[::-1]
                for workers in worker_counts:
                    for name in order:
                        for mode in modes:
                            print(f"# run {repeat + 1}/{runs}: {name}, workers {workers}, {mode}")
                            result["runs"].append(
                                uclient_run(ns, name, workers, mode, messages, repeat)
                            )
    except system.MachineBusy as e:
        raise SystemExit(str(e)) from None
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["summary"] = summarize(result["runs"])
    result["table"] = uclient_table(result)
    result["files"] = {"json": str(json_path)}
    write_new(json_path, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xdpturn_lab.bench.workers", description=__doc__
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--allocations", type=int, default=8, help="clients (default 8)")
    parser.add_argument("--rate", type=float, default=200_000, help="offered datagrams/s in all")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    uc = parser.add_argument_group("--uclient: xdpturn and coturn under turnutils_uclient")
    uc.add_argument("--uclient", action="store_true", help="run this comparison instead")
    uc.add_argument("--runs", type=int, default=3, help="runs per relay, worker count and mode")
    uc.add_argument("--messages", type=int, default=10_000, help="uclient's -n (per client)")
    uc.add_argument(
        "--modes", default="default,-c", help="uclient modes: default (RTP/RTCP pairs), -c"
    )
    uc.add_argument(
        "--out",
        default="bench/results",
        metavar="DIR|FILE.json",
        help="a directory (the file is named by UTC time) or the results file; never overwritten",
    )
    args = parser.parse_args(argv)
    try:
        worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: expected comma-separated counts, got {args.workers!r}")
    if args.uclient:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or any(m not in uclient.MODES for m in modes):
            parser.error(f"--modes: expected names from {','.join(uclient.MODES)}")
        if args.runs < 1 or args.messages < 1 or min(worker_counts) < 1:
            parser.error("--runs, --messages and --workers must be at least 1")
        result = compare_uclient(worker_counts, args.runs, args.messages, modes, Path(args.out))
        print(result["table"])
        print(f"\nwrote {result['files']['json']}")
        return 0
    tools.build()
    print(f"# cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} before the runs")
    with namespace() as ns:
        for workers in worker_counts:
            with relay(ns, workers) as pid:
                figure = asyncio.run(
                    measure(ns, pid, workers, args.allocations, args.rate, args.duration)
                )
            if args.json:
                derived = {"pps": figure.pps, "loss": figure.loss, "per_core": figure.per_core}
                print(json.dumps({**figure.__dict__, **derived}))
            else:
                print(
                    f"workers {workers}: offered {figure.offered / figure.duration:,.0f}/s, "
                    f"relayed {figure.pps:,.0f}/s, loss {figure.loss:.1%}, relay on "
                    f"{figure.cores:.2f} cores, {figure.per_core:,.0f}/s per core"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
