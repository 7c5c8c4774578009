"""What the benchmark measures around a workload: the machine, CPU time, memory, and a cheap sink.

CPU time comes from /proc: the relay process's utime+stime (/proc/PID/stat, all threads) and the
machine's softirq time (/proc/stat). Namespaces do not isolate /proc/stat, so softirq time is
system-wide: it holds the relay's XDP program, but also the generator's and the receiver's network
stacks and the router hops in between. `CpuDelta` keeps both, and the report says which is which.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = float(os.sysconf("SC_CLK_TCK"))
SINK_TABLE = "xbsink"


def machine() -> dict[str, Any]:
    """CPU model, cores, kernel and memory, for the JSON and the table's header."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count() or 0,
        "kernel": platform.release(),
        "memory_mib": mem_kib // 1024,
        "python": platform.python_version(),
    }


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall: float
    softirq: float  # seconds, all CPUs
    system: float  # seconds, all CPUs (kernel outside irq)
    user: float  # seconds, all CPUs
    process: float  # seconds of utime+stime of the relay process (0 without one)
    napi: float  # seconds of the relay interface's NAPI thread (receive path, XDP, XDP_TX)
    return_napi: float  # seconds of the next hop's NAPI thread taking in the relay's output
    relay_cpu: float  # busy seconds of the relay's core (wall less idle and iowait)
    relay_softirq: float  # softirq seconds of the relay's core

    def __sub__(self, earlier: CpuSample) -> CpuDelta:
        return CpuDelta(
            wall=self.wall - earlier.wall,
            relay_cpu=self.relay_cpu - earlier.relay_cpu,
            relay_softirq=self.relay_softirq - earlier.relay_softirq,
            napi=self.napi - earlier.napi,
            return_napi=self.return_napi - earlier.return_napi,
            softirq=self.softirq - earlier.softirq,
            system=self.system - earlier.system,
            user=self.user - earlier.user,
            process=self.process - earlier.process,
        )


@dataclass(frozen=True, slots=True)
class CpuDelta:
    wall: float
    relay_cpu: float
    relay_softirq: float
    napi: float
    return_napi: float
    softirq: float
    system: float
    user: float
    process: float


def process_cpu(pid: int | None) -> float:
    """utime + stime of `pid` in seconds (all its threads); 0 for None."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the comm field: state is fields[0], utime is field 14 of stat, i.e. fields[11].
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_sample(
    pid: int | None, relay_cpu: str, napi: Sequence[int] = (), return_napi: Sequence[int] = ()
) -> CpuSample:
    """Machine-wide times, the relay core's busy and softirq time, the relay process's time and
    that of the NAPI threads `napi` and `return_napi` (kernel threads: their work shows as their
    system time)."""
    with open("/proc/stat") as f:
        lines = f.read().splitlines()
    # cpu user nice system idle iowait irq softirq steal ...
    cpu = lines[0].split()
    user, nice, system, softirq = (int(cpu[i]) for i in (1, 2, 3, 7))
    idle = relay_softirq = 0
    for line in lines[1:]:
        words = line.split()
        if words and words[0] == f"cpu{relay_cpu}":
            idle = int(words[4]) + int(words[5])  # idle + iowait
            relay_softirq = int(words[7])
    wall = time.monotonic()
    return CpuSample(
        # Busy = wall time less idle time: the kernel measures a core's idle periods exactly,
        # while the busy fields are sampled per tick, and with idle cores polling they missed up
        # to 15 % of the NAPI thread's short runs (less than the thread's own exact time). As a
        # running total, so that differences of samples are busy time.
        relay_cpu=wall - idle / _TICK,
        relay_softirq=relay_softirq / _TICK,
        napi=sum(process_cpu(t) for t in napi),
        return_napi=sum(process_cpu(t) for t in return_napi),
        wall=wall,
        softirq=softirq / _TICK,
        system=system / _TICK,
        user=(user + nice) / _TICK,
        process=process_cpu(pid),
    )


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


# --- a sink on the receiving host --------------------------------------------------------------


def sink_on(netns_name: str, port: int) -> None:
    """Drop UDP datagrams to `port` at prerouting (raw priority) in `netns_name`, counting them.

    No process reads them: a socket saturates around 1.4 M/s on this VM and would compete for the
    cores, and a closed port would answer every datagram with ICMP. Everything else (TURN control,
    ARP/ND) passes.
    """
    rules = (
        f"table inet {SINK_TABLE} {{\n"
        "  chain pre {\n"
        "    type filter hook prerouting priority raw; policy accept;\n"
        f"    udp dport {port} counter drop\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", netns_name, "nft", "-f", "-"], input=rules, text=True, check=True
    )


def sink_count(netns_name: str) -> int:
    """Datagrams the sink has dropped so far."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "nft", "list", "table", "inet", SINK_TABLE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    packets = 0
    for line in out.splitlines():
        words = line.split()
        if "counter" in words and "packets" in words:
            packets = int(words[words.index("packets") + 1])
    return packets


def sink_settled(netns_name: str, *, quiet: float = 0.1, timeout: float = 2.0) -> int:
    """The sink's count once it stops rising for `quiet` seconds (datagrams still queued in the
    relay drain after the sender stops), or after `timeout`, whichever comes first."""
    deadline = time.monotonic() + timeout
    last = sink_count(netns_name)
    while time.monotonic() < deadline:
        time.sleep(quiet)  # the poll interval of a bounded wait, not a guess at readiness
        now = sink_count(netns_name)
        if now == last:
            break
        last = now
    return last


def sink_off(netns_name: str) -> None:
    """Remove the sink."""
    subprocess.run(
        ["ip", "netns", "exec", netns_name, "nft", "delete", "table", "inet", SINK_TABLE],
        check=True,
    )


# --- where the relay host's packet work runs ----------------------------------------------------


def _napi_threads() -> dict[int, str]:
    """pid -> name of the kernel's threaded-NAPI pollers (`napi/IF-ID`), machine-wide."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # gone meanwhile
        if comm.startswith("napi/"):
            found[int(entry)] = comm
    return found


def napi_mode(netns_name: str, ifname: str) -> None:
    """GRO on: a veth then receives through NAPI (as with XDP attached), for every relay alike."""
    subprocess.run(
        ["ip", "netns", "exec", netns_name, "ethtool", "-K", ifname, "gro", "on"], check=True
    )


def pin_napi(netns_name: str, ifname: str, cpu: str, *, realtime: bool = False) -> list[int]:
    """Give `ifname`'s receive path its own kernel thread (GRO on puts a veth in NAPI mode,
    `threaded` moves the poller from softirq into a kthread) and pin it to `cpu`; returns the
    thread ids.

    Over veth, softirq work runs on the sending core, so without this the relay's receive path
    (and the XDP program) would run on the generator's core and be charged to it. With it, the
    relay host's packet work runs on the relay's core, where it can be measured. `realtime`
    (SCHED_FIFO) lets the thread preempt the load generator on its core, so a generator running
    flat out slows itself down rather than starving the path that drains the relay's output.
    """
    before = _napi_threads()
    napi_mode(netns_name, ifname)
    exec_ = ["ip", "netns", "exec", netns_name]
    subprocess.run([*exec_, "sh", "-c", f"echo 1 > /sys/class/net/{ifname}/threaded"], check=True)
    new = sorted(set(_napi_threads()) - set(before))
    if not new:
        raise RuntimeError(f"no NAPI thread appeared for {ifname} in {netns_name}")
    for pid in new:
        subprocess.run(["taskset", "-pc", cpu, str(pid)], check=True, capture_output=True)
        if realtime:
            subprocess.run(["chrt", "-f", "-p", "50", str(pid)], check=True, capture_output=True)
    return new


def unpin_napi(netns_name: str, ifname: str) -> None:
    """Back to NAPI in softirq (the kernel stops the thread; `pin_napi` makes a new one)."""
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            netns_name,
            "sh",
            "-c",
            f"echo 0 > /sys/class/net/{ifname}/threaded",
        ],
        check=True,
    )


def alive(pids: Sequence[int]) -> bool:
    return all(os.path.exists(f"/proc/{pid}") for pid in pids)


# --- one benchmark per machine at a time --------------------------------------------------------

LOCK_PATH = Path("/run/lock/xdpturn-lab-bench.lock")


class MachineBusy(Exception):
    """Another benchmark kept the machine-wide lock for longer than we would wait."""


@contextlib.contextmanager
def no_idle_halt() -> Iterator[bool]:
    """Keep every core out of halting while the benchmark runs (a PM QoS CPU latency request of
    0 us, what tuned's latency-performance profile makes; closing the file withdraws it); yields
    whether the request was accepted.

    An idle core that halts must be woken by an interrupt, and in a VM that halt exits to the
    host, whose scheduler decides when the virtual CPU runs again. Measured here with the relay
    core a quarter busy: the NAPI poller woke so late that the relay's 256-frame veth receive
    ring overflowed at 93,000 pps (1 % lost); with the request held, idle cores poll and the
    same trials lost nothing. Idle polling is idle time in /proc/stat, so the CPU accounting is
    unchanged, and the request applies to every relay alike."""
    try:
        request = open("/dev/cpu_dma_latency", "wb", buffering=0)  # noqa: SIM115 (held open)
    except OSError:
        yield False
        return
    with request:
        request.write(struct.pack("i", 0))
        yield True


@contextlib.contextmanager
def machine_lock(
    wait_s: float, log: Callable[[str], None], path: Path = LOCK_PATH
) -> Iterator[float]:
    """Hold the machine-wide benchmark lock; yields the seconds spent waiting for it.

    Two benchmarks at once (several engineers' test suites run `--quick`) pin their relays to the
    same core and their generators to the other, and each measures the other's load. Waiting
    for the lock (bounded by `wait_s`) keeps them apart; other load is still only detected.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        t0 = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > wait_s:
                    raise MachineBusy(
                        f"another benchmark still holds {path} after {wait_s:.0f} s"
                    ) from None
                if not told:
                    f.seek(0)
                    log(f"waiting for another benchmark to finish ({path}: {f.read()!r})")
                    told = True
                time.sleep(0.5)  # the poll interval of a bounded wait
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield time.monotonic() - t0
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


# --- provenance ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[4]


def _out(argv: Sequence[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What produced a results file: the commit, whether the tree differed from it (and where),
    and the versions of the tools involved."""
    git = ["git", "-c", f"safe.directory={REPO}"]
    status = _out([*git, "status", "--porcelain"])
    changed = [line[3:] for line in (status or "").splitlines()]
    turnserver = _out(["turnserver", "--version"])
    return {
        "commit": _out([*git, "rev-parse", "HEAD"]),
        "branch": _out([*git, "rev-parse", "--abbrev-ref", "HEAD"]),
        "dirty": bool(changed) if status is not None else None,
        "changed_files": changed,
        "turnserver_version": turnserver.splitlines()[-1] if turnserver else None,
        "kernel_version": platform.version(),
    }
