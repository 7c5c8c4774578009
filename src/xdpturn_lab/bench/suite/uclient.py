"""coturn's own load client against each relay: `turnutils_uclient -m 10 -z 0` to a
`turnutils_peer` echo on the peer host (issue 13's workload).

Two modes: the default (RTP/RTCP pairs: an Allocate with EVEN-PORT and the R bit, then one with
the RESERVATION-TOKEN it got back) and `-c` (one allocation per client). uclient prints totals and
averages, not percentiles: messages sent and received, lost packets, and the average, min and max
round trip (min and max in whole milliseconds). Those are what is parsed and reported. A relay that
refuses the default mode's Allocate (508, no EVEN-PORT) gets the error in the result, not a crash.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from xdpturn_lab.bench.suite.relays import RelayUnderTest
from xdpturn_lab.testbed.testbed import RelayNode

MODES = {"default": (), "-c": ("-c",)}
ECHO_PORT = 9400
CLIENTS = 10
PAYLOAD = 100  # bytes per message, as issue 13's run
START_TIMEOUT = 5.0

_PATTERNS = {
    "sent": r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=\d+\n",
    "received": r"start_mclient: tot_send_msgs=\d+, tot_recv_msgs=(\d+)\n",
    "lost": r"Total lost packets (\d+) \(",
    "lost_percent": r"Total lost packets \d+ \(([\d.]+)%\)",
    "send_dropped": r"total send dropped (\d+) \(",
    "rtt_avg_ms": r"Average round trip delay ([\d.]+) ms",
    "rtt_min_ms": r"Average round trip delay [\d.]+ ms; min = (\d+) ms",
    "rtt_max_ms": r"Average round trip delay [\d.]+ ms; min = \d+ ms, max = (\d+) ms",
    "jitter_avg_ms": r"Average jitter ([\d.]+) ms",
    "transmit_s": r"Total transmit time is (\d+)",
}


@dataclass
class UclientResult:
    mode: str
    argv: list[str]
    exit_code: int | None
    elapsed_s: float
    figures: dict[str, float] = field(default_factory=dict)  # what uclient printed, parsed
    error: str | None = None  # the last lines of its output when it did not finish
    output_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse(output: str) -> dict[str, float]:
    """The totals uclient prints at the end (the last match of each: it prints running totals)."""
    figures: dict[str, float] = {}
    for key, pattern in _PATTERNS.items():
        found = re.findall(pattern, output)
        if found:
            figures[key] = float(found[-1])
    return figures


def run(
    relay: RelayUnderTest,
    relay_ip: str,
    client_prefix: list[str],
    peer: RelayNode,
    peer_prefix: list[str],
    mode: str,
    messages: int,
    timeout: float,
) -> UclientResult:
    """One uclient run of `CLIENTS` clients x `messages` messages in `mode`, bounded by
    `timeout` seconds, against an echo on the peer host."""
    binary, echo = shutil.which("turnutils_uclient"), shutil.which("turnutils_peer")
    if binary is None or echo is None:
        raise FileNotFoundError("turnutils_uclient/turnutils_peer (Debian's coturn) not found")
    peer_ip = str(peer.public_ipv4)
    argv = [binary, "-W", relay.secret, "-u", "bench", "-m", str(CLIENTS), "-z", "0"]
    argv += ["-n", str(messages), "-l", str(PAYLOAD), *MODES[mode]]
    argv += ["-e", peer_ip, "-r", str(ECHO_PORT), relay_ip]
    echo_proc = subprocess.Popen(
        [*peer_prefix, echo, "-L", peer_ip, "-p", str(ECHO_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_bound(peer_prefix, ECHO_PORT)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [*client_prefix, *argv], capture_output=True, text=True, timeout=timeout
            )
            out, code, error = proc.stdout + proc.stderr, proc.returncode, None
        except subprocess.TimeoutExpired as e:
            raw = (e.stdout or b"") + (e.stderr or b"")
            out = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            code, error = None, f"did not finish within {timeout:.0f} s"
        elapsed = time.monotonic() - t0
    finally:
        echo_proc.terminate()
        try:
            echo_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            echo_proc.kill()
            echo_proc.wait()
    figures = parse(out)
    tail = "\n".join(out.strip().splitlines()[-6:])
    if error is None and "lost" not in figures:
        error = f"exit {code}, no totals printed"
    return UclientResult(mode, argv, code, elapsed, figures, error, tail)


def _wait_bound(prefix: list[str], port: int) -> None:
    """Bounded wait for the echo's UDP socket."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*prefix, "ss", "-Hlun", f"sport = :{port}"], capture_output=True, text=True
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)  # poll interval of a bounded wait
    raise RuntimeError(f"turnutils_peer not listening on port {port}")
