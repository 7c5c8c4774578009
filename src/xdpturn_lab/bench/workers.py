"""How the Python path's relayed throughput grows with `xdpturn serve --workers N`.

    sudo .venv/bin/python -m xdpturn_lab.bench.workers --workers 1,2 --duration 5

In a network namespace of its own, on loopback, for each N: `xdpturn serve --fastpath off
--workers N`; `--allocations` TURN clients (distinct source ports, which the kernel spreads over
the workers), each with a channel to one sink (`xdpturn-blast recv`); one `xdpturn-blast send` per
allocation offers ChannelData at `--rate`/allocations per second for `--duration` seconds. Prints,
per N, the datagrams the sink received per second through the relay and the loss. Everything
shares the machine's cores: the relay's workers, the senders, the sink and the kernel's loopback
path, so on a small machine the figure is a lower bound on what the workers alone would do; the
CPU time the relay's processes used is printed beside it (cores busy, datagrams per core-second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from xdpturn.proto.addr import Family, TransportAddr
from xdpturn_lab.bench import tools
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


@contextlib.contextmanager
def relay(ns: str, workers: int) -> Iterator[int]:
    argv = [*tools.netns_prefix(ns), sys.executable, "-m", "xdpturn", "serve"]
    argv += ["--listen", str(LISTEN), "--public-ipv4", PUBLIC, "--auth-secret", SECRET]
    argv += ["--allow-peer", "127.0.0.0/8", "--ports", "20000-29999", "--fastpath", "off"]
    argv += ["--metrics", METRICS, "--workers", str(workers), "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _ready(ns):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"xdpturn serve --workers {workers} did not become ready")
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.terminate()  # SIGTERM drains; allocations are gone by then, so it exits at once
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xdpturn_lab.bench.workers", description=__doc__
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--allocations", type=int, default=8, help="clients (default 8)")
    parser.add_argument("--rate", type=float, default=200_000, help="offered datagrams/s in all")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = parser.parse_args(argv)
    tools.build()
    print(f"# cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} before the runs")
    with namespace() as ns:
        for workers in (int(w) for w in args.workers.split(",")):
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
