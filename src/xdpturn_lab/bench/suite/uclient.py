"""coturn's own load client against each relay: `turnutils_uclient -m 10 -z 0` to a
`turnutils_peer` echo on the peer host (issue 13's workload).

Two modes: the default (RTP/RTCP pairs: an Allocate with EVEN-PORT and the R bit, then one with
the RESERVATION-TOKEN it got back) and `-c` (one allocation per client). uclient prints totals and
averages, not percentiles: messages sent and received, lost packets, and the average, min and max
round trip (min and max in whole milliseconds). Those are what is parsed and reported. A relay that
refuses the default mode's Allocate (508, no EVEN-PORT) gets the error in the result, not a crash.

Percentiles come from a packet capture instead (`capture`, optional): every uclient message
carries its session's message number and send time in its first bytes, and the echo returns it
unchanged, so a ChannelData message from a client to the relay's port and the ChannelData with
the same bytes back to that client are one round trip, timed by the kernel to the nanosecond.
That round trip holds the relay (both ways), the echo peer and the kernel's paths, not the time
a message waits in uclient's own socket before uclient reads it (uclient's figures hold that,
in whole milliseconds of its 1 ms timer).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xdpturn_lab.bench.suite import system

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
    client_cpu_s: float = 0.0  # uclient's own CPU time (user + system)
    echo_cpu_s: float = 0.0  # turnutils_peer's
    wire: dict[str, float] | None = None  # round trips seen on the wire (`capture`), if captured

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
    secret: str,
    relay_ip: str,
    client_prefix: Sequence[str],
    peer_ip: str,
    peer_prefix: Sequence[str],
    mode: str,
    messages: int,
    timeout: float,
    *,
    capture_prefix: Sequence[str] | None = None,
    capture_interface: str = "lo",
    relay_port: int = 3478,
) -> UclientResult:
    """One uclient run of `CLIENTS` clients x `messages` messages in `mode`, bounded by
    `timeout` seconds, through the relay at `relay_ip` to an echo at `peer_ip`. With
    `capture_prefix`, the relay's port is captured on `capture_interface` (run behind that
    prefix, e.g. in the client's namespace) for the round trips' percentiles (`wire`)."""
    binary, echo = shutil.which("turnutils_uclient"), shutil.which("turnutils_peer")
    if binary is None or echo is None:
        raise FileNotFoundError("turnutils_uclient/turnutils_peer (Debian's coturn) not found")
    argv = [binary, "-W", secret, "-u", "bench", "-m", str(CLIENTS), "-z", "0"]
    argv += ["-n", str(messages), "-l", str(PAYLOAD), *MODES[mode]]
    argv += ["-p", str(relay_port), "-e", peer_ip, "-r", str(ECHO_PORT), relay_ip]
    echo_proc = subprocess.Popen(
        [*peer_prefix, echo, "-L", peer_ip, "-p", str(ECHO_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wire: dict[str, float] | None = None
    try:
        wait_bound(peer_prefix, ECHO_PORT)
        with contextlib.ExitStack() as stack:
            cap = None
            if capture_prefix is not None:
                cap = stack.enter_context(
                    capture(capture_prefix, capture_interface, relay_ip, relay_port)
                )
            # `ip netns exec` and taskset exec in place, so the child this process reaps is
            # uclient itself; the echo is still running, so the difference is uclient's alone.
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            client_cpu = (children.ru_utime - children_before.ru_utime) + (
                children.ru_stime - children_before.ru_stime
            )
        if cap is not None:
            wire = cap.summary
        echo_cpu = system.process_cpu(echo_proc.pid)
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
    return UclientResult(
        mode, argv, code, elapsed, figures, error, tail, client_cpu, echo_cpu, wire
    )


def wait_bound(prefix: Sequence[str], port: int, timeout: float = START_TIMEOUT) -> None:
    """Bounded wait for a UDP socket bound to `port` (behind `prefix`, e.g. in a namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*prefix, "ss", "-Hlun", f"sport = :{port}"], capture_output=True, text=True
        ).stdout
        if out.strip():
            return
        time.sleep(0.05)  # poll interval of a bounded wait
    raise RuntimeError(f"nothing listening on UDP port {port} after {timeout:.0f} s")


# --- round trips from a packet capture ------------------------------------------------------------

SNAPLEN = 96  # link, IPv4 and UDP headers, ChannelData's 4 bytes and uclient's message header
KEY_BYTES = 16  # uclient's message header: its session's message number and send time
CAPTURE_BUFFER_KIB = 32768  # the kernel's capture ring: room for about a second at full rate
# Sent past the capture at its end; a first byte that no STUN or ChannelData message has.
END_MARK = b"\xffxdpturn: end of capture"
DISCARD_PORT = 9  # where it goes: nobody listens, the relay's host answers ICMP
_PCAP_NANO = 0xA1B23C4D
_LINKTYPE_ETHERNET = 1  # what Linux reports for lo and veth


class Capture:
    """A running tcpdump of UDP to and from the relay's port; `summary` once it has stopped."""

    def __init__(self, path: Path, relay_port: int) -> None:
        self.path = path
        self.relay_port = relay_port
        self.summary: dict[str, float] | None = None


@contextlib.contextmanager
def capture(
    prefix: Sequence[str], interface: str, relay_ip: str, relay_port: int
) -> Iterator[Capture]:
    """tcpdump on `interface` (behind `prefix`) while the block runs; then its round trips."""
    binary = shutil.which("tcpdump")
    if binary is None:
        raise FileNotFoundError("tcpdump not found (Debian's tcpdump package)")
    with tempfile.TemporaryDirectory(prefix="xdpturn-uclient-") as tmp:
        # A .pcap name: Debian's AppArmor profile for tcpdump lets it write only such files.
        cap = Capture(Path(tmp) / "uclient.pcap", relay_port)
        argv = [*prefix, binary, "-i", interface, "-n", "-s", str(SNAPLEN)]
        argv += ["-B", str(CAPTURE_BUFFER_KIB), "--time-stamp-precision=nano", "-Z", "root"]
        argv += ["-U", "-w", str(cap.path)]  # -U: each packet is in the file once written
        argv += [f"udp port {relay_port} or udp dst port {DISCARD_PORT}"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        try:
            _wait_listening(proc)
            yield cap
            _mark_end(prefix, relay_ip, cap.path)
        finally:
            proc.send_signal(signal.SIGINT)  # tcpdump flushes the file and prints its counts
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        dropped = re.search(rb"(\d+) packets? dropped by kernel", err)
        summary = round_trips(cap.path.read_bytes(), relay_port)
        summary["capture_dropped"] = float(dropped.group(1)) if dropped else float("nan")
        cap.summary = summary


def _mark_end(
    prefix: Sequence[str], relay_ip: str, path: Path, timeout: float = START_TIMEOUT
) -> None:
    """Send a datagram to the relay's discard port and wait until tcpdump has written it: then
    every packet captured before it is in the file too. (The kernel hands tcpdump its packets in
    order, in blocks it releases when full or a timeout later; stopped at once, tcpdump would
    lose the last block: the end of the run.)"""
    family = "AF_INET6" if ":" in relay_ip else "AF_INET"
    send = f"import socket; socket.socket(socket.{family}, socket.SOCK_DGRAM).sendto("
    send += f"{END_MARK!r}, ({relay_ip!r}, {DISCARD_PORT}))"
    subprocess.run([*prefix, sys.executable, "-c", send], check=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            if END_MARK in f.read():
                return
        time.sleep(0.05)  # poll interval of a bounded wait
    raise RuntimeError(f"tcpdump did not write the end of the capture within {timeout:.0f} s")


def _wait_listening(proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    """Bounded wait for tcpdump's "listening on" line (its capture is open from then on)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while b"listening on" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise RuntimeError(f"tcpdump did not start: {seen.decode(errors='replace')[-300:]}")
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            seen += os.read(proc.stderr.fileno(), 4096)


def round_trips(pcap: bytes, relay_port: int) -> dict[str, float]:
    """Match each ChannelData message a client sent to `relay_port` with the first one carrying
    the same bytes back to that client; the percentiles of those round trips in milliseconds,
    how many matched, and the span from the first data message to the last in seconds."""
    magic = struct.unpack_from("<I", pcap)[0] if len(pcap) >= 24 else 0
    if magic != _PCAP_NANO:
        raise ValueError("not a little-endian nanosecond pcap file")
    if struct.unpack_from("<I", pcap, 20)[0] != _LINKTYPE_ETHERNET:
        raise ValueError("the capture's link type is not Ethernet")
    sent: dict[tuple[int, bytes], int] = {}
    rtts: list[int] = []
    first = last = 0
    offset = 24
    while offset + 16 <= len(pcap):
        sec, nsec, caplen, _ = struct.unpack_from("<IIII", pcap, offset)
        frame = pcap[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue  # IPv4 only: the comparison runs on 127.0.0.1
        ip = 14
        udp = ip + (frame[ip] & 0x0F) * 4
        data = frame[udp + 8 :]
        if len(data) < 4 + KEY_BYTES or not 0x40 <= data[0] <= 0x7F:
            continue  # STUN (TURN control), not ChannelData
        sport, dport = struct.unpack_from("!HH", frame, udp)
        t = sec * 1_000_000_000 + nsec
        first, last = first or t, t
        if dport == relay_port:
            sent.setdefault((sport, data[4 : 4 + KEY_BYTES]), t)
        elif sport == relay_port:
            out = sent.pop((dport, data[4 : 4 + KEY_BYTES]), None)
            if out is not None:
                rtts.append(t - out)
    rtts.sort()
    summary: dict[str, float] = {"samples": float(len(rtts)), "span_s": (last - first) / 1e9}
    for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0)):
        if rtts:
            summary[f"rtt_{name}_ms"] = rtts[min(len(rtts) - 1, int(q * len(rtts)))] / 1e6
    return summary
