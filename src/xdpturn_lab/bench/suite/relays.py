"""The relays under test, started the same way in the relay's namespace and pinned to one core.

`xdp` and `python` are `xdpturn serve` through the testbed's `scenario.RelayProcess` (fast path on
or off); `coturn` is Debian's `turnserver` with the same REST secret, realm, listening addresses,
relay port range and no TLS/DTLS/TCP relay.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Protocol

from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family, TransportAddr
from xdpturn_lab.testbed import netns
from xdpturn_lab.testbed.scenario import DEFAULT_SECRET, TURN_PORT, RelayProcess
from xdpturn_lab.testbed.testbed import RelayNode, Testbed

# The relay gets one core, the generator the other (this VM has two). XDP still runs in softirq on
# whichever core the packet arrives on, which over veth is the sending core.
RELAY_CPU = "1"
GENERATOR_CPU = "0"
REALM = "xdpturn"
# Room for 10,000 allocations, below the kernel's ephemeral range (32768-60999) so no client
# socket can take an allocation's port.
RELAY_PORTS = (20000, 31999)
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
NOFILE = 65536  # 10,000 allocations are 10,000 sockets in the relay and in the driver


def raise_fd_limit() -> None:
    """Raise RLIMIT_NOFILE for this process and the relays it starts (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RelayUnderTest(Protocol):
    name: str  # "xdp", "python" or "coturn"
    secret: str

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def pid(self) -> int: ...

    def server(self, family: Family) -> TransportAddr: ...

    def info(self) -> dict[str, Any]: ...


def _only_pid(tb: Testbed, relay: RelayNode) -> int:
    pids = [p for p in netns.pids(relay.netns) if p != os.getpid()]
    if len(pids) != 1:
        raise RuntimeError(f"expected one process in {relay.netns}, found {pids}")
    return pids[0]


class _PinnedServe(RelayProcess):
    """`xdpturn serve` pinned to the relay core, with the bench's port range and a short drain
    (the control-plane workload leaves thousands of allocations behind on purpose). The limits
    on unauthenticated answers and on STUN from sources without an allocation are off: the
    control-plane workload opens thousands of allocations from one client address, each after a
    401, and coturn has neither limit (with them, most of the driver's requests were dropped and
    retransmitted, and the run measured the limit, not the relay)."""

    def argv(self) -> list[str]:
        low, high = RELAY_PORTS
        extra = ["--ports", f"{low}-{high}", "--drain-timeout", "1", "--unauthenticated-rate", "0"]
        extra += ["--stun-rate-per-source", "0"]
        return ["taskset", "-c", RELAY_CPU, *super().argv(), *extra]


class XdpturnRelay:
    def __init__(self, tb: Testbed, relay: RelayNode, *, fastpath: bool) -> None:
        self.name = "xdp" if fastpath else "python"
        self.secret = DEFAULT_SECRET
        self._tb = tb
        self._relay = relay
        self._proc = _PinnedServe(tb, relay, fastpath=fastpath, secret=self.secret)
        self._pid: int | None = None

    def start(self) -> None:
        self._proc.start()
        self._pid = _only_pid(self._tb, self._relay)
        if self.name == "xdp" and self._proc.fastpath_mode != "native":
            raise RuntimeError(f"fast path is {self._proc.fastpath_mode!r}, not native XDP")

    def stop(self) -> None:
        self._proc.stop()

    @property
    def pid(self) -> int:
        assert self._pid is not None, "not started"
        return self._pid

    def server(self, family: Family) -> TransportAddr:
        return self._proc.server(family)

    def info(self) -> dict[str, Any]:
        return {
            "program": "xdpturn serve",
            "fastpath": self._proc.fastpath_mode,
            "argv": self._proc.argv(),
            "cpu": RELAY_CPU,
        }

    def route_packets(self) -> dict[str, int]:
        """Packets per route of the XDP program so far (all CPUs)."""
        return {route: packets for route, (packets, _) in self._proc.counters().routes.items()}

    def counters(self) -> FastPathCounters:
        return self._proc.counters()

    def fastpath_counters(self) -> dict[str, Any]:
        c = self._proc.counters()
        return {"routes": {k: list(v) for k, v in c.routes.items()}, "passes": dict(c.passes)}


def coturn_argv(
    *, listen: Sequence[str], port: int, secret: str, threads: int, state_dir: str
) -> list[str]:
    """`turnserver`'s command line as the benchmarks run it (without CPU pinning): everything
    on the line, the REST secret and realm, listening and relaying on the `listen` addresses,
    the bench's relay port range, `threads` relay threads, UDP only, pid file and log in
    `state_dir`."""
    low, high = RELAY_PORTS
    return [
        "turnserver",
        "-n",  # no configuration file: everything is on this line
        f"--listening-port={port}",
        *(f"--listening-ip={ip}" for ip in listen),
        *(f"--relay-ip={ip}" for ip in listen),
        f"--min-port={low}",
        f"--max-port={high}",
        "--use-auth-secret",
        f"--static-auth-secret={secret}",
        f"--realm={REALM}",
        f"--relay-threads={threads}",
        "--no-tls",
        "--no-dtls",
        "--no-tcp-relay",
        "--no-cli",
        "--no-multicast-peers",
        "--no-software-attribute",
        f"--pidfile={state_dir}/turnserver.pid",
        f"--log-file={state_dir}/turnserver.log",
        "--simple-log",
    ]


class CoturnRelay:
    def __init__(self, tb: Testbed, relay: RelayNode, *, relay_threads: int = 1) -> None:
        self.name = "coturn"
        self.secret = DEFAULT_SECRET
        self._tb = tb
        self._relay = relay
        self._threads = relay_threads
        self._dir = tempfile.TemporaryDirectory(prefix="xdpturn-bench-coturn-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._version = ""

    def argv(self) -> list[str]:
        r = self._relay
        return [
            "taskset",
            "-c",
            RELAY_CPU,
            *coturn_argv(
                listen=[str(r.local_ipv4), str(r.local_ipv6)],
                port=TURN_PORT,
                secret=self.secret,
                threads=self._threads,
                state_dir=self._dir.name,
            ),
        ]

    def start(self) -> None:
        out = subprocess.run(["turnserver", "--version"], capture_output=True, text=True)
        self._version = (out.stdout or out.stderr).strip().splitlines()[-1] if out else ""
        self._proc = self._tb.popen(
            self._relay, self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        """Bounded wait until UDP sockets on the TURN port exist for both families."""
        deadline = time.monotonic() + START_TIMEOUT
        want = {str(self._relay.local_ipv4), str(self._relay.local_ipv6)}
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"turnserver exited ({self._proc.returncode}): {self.log()}")
            out = self._tb.run(
                self._relay,
                ["ss", "-Hlun", f"sport = :{TURN_PORT}"],
                capture_output=True,
                text=True,
            ).stdout
            seen = {line.split()[3].rpartition(":")[0].strip("[]") for line in out.splitlines()}
            if want <= seen:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"turnserver not listening after {START_TIMEOUT} s: {self.log()}"
                )
            time.sleep(0.05)  # poll interval of a bounded wait

    def log(self, n: int = 20) -> str:
        try:
            with open(f"{self._dir.name}/turnserver.log") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._dir.cleanup()

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid  # `ip netns exec` and taskset exec in place: same pid

    def server(self, family: Family) -> TransportAddr:
        r = self._relay
        return TransportAddr(r.local_ipv4 if family is Family.IPV4 else r.local_ipv6, TURN_PORT)

    def info(self) -> dict[str, Any]:
        return {
            "program": "turnserver",
            "version": self._version,
            "relay_threads": self._threads,
            "argv": self.argv(),
            "cpu": RELAY_CPU,
        }
