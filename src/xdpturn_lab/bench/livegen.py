"""The live-frames load generator: one crafted Ethernet frame, transmitted millions of times per
second from a namespace by BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES).

The program (xdp_tx.bpf.c, loaded with the project's own loader `fastpath.libbpf`) returns XDP_TX
for a frame "received" on the sender's veth (`xdp_md.ingress_ifindex`); the kernel turns that into
a redirect out of the same veth, `repeat` times per call, in batches of 64 with a flush after each.
The veth's peer must have an XDP program of its own to take the frames (the testbed gives one to
every veth end facing a host). No socket, no UDP stack on the sending side: the frame carries the
5-tuple the relay expects (a TURN client's allocated one, or a peer's), so the relay cannot tell it
from one a socket sent.

`LiveSend` is what the benchmark runs: a child process (`python -m xdpturn_lab.bench.livegen`,
inside the sender's namespace and pinned to the generator core by the caller's argv prefix) that
loads the program, prints `{"type": "ready"}`, then for every "go" line on stdin sends for at most
`duration` seconds or `count` frames at `rate` per second (or as fast as it goes) and prints one
`{"type": "result", ...}` line in the layout of `xdpturn-blast send` (`tools.SendResult`). A line
"go RATE DURATION" overrides both for that run, so a rate search keeps one process (and one
loaded program) for all its trials; end of input ends the process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdpturn.fastpath import libbpf
from xdpturn_lab.bench import tools
from xdpturn_lab.testbed import netns

OBJECT_PATH = Path(__file__).resolve().parent / "xdp_tx.bpf.o"
PROGRAM = "xdp_tx"
TEMPLATE_LEN = 128  # bytes the program writes back before every XDP_TX (xdp_tx.bpf.c)
MAX_REPEAT = 1 << 14  # frames per call when unpaced (about 15-30 ms here); the time bound's grain
# When paced: calls of what the rate sends in PACE_SPAN_S, at least 1 frame and at most one kernel
# batch (64 frames, a 64-segment GSO send's worth), on schedule, so no burst overflows a socket
# buffer that a smooth load would not (calls of 1 ms of the rate did: a socket relay drowned in
# each burst and then sat idle; and fixed calls of 64 lost 34 of every 64 frames in coturn's
# 64 KiB relay-socket buffer at any rate, even 1,000 pps). Behind schedule, larger calls (each
# call sets up the kernel's page pool afresh: 256-frame calls of 1200 B frames ran at a quarter
# of the rate).
PACE_BURST = 64
PACE_SPAN_S = 0.00025
CATCH_UP_BURST = 1024
HOLD_IF = "xlg0"  # the idle veth the program stays attached to (see hold_in_dispatcher)
START_TIMEOUT = 30.0  # how long the child waits for "go"
NEIGH_TIMEOUT = 2.0
_GRACE_S = 10.0

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17


# --- the frame -----------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def udp_frame(
    src_mac: str,
    dst_mac: str,
    src: tools.Address,
    dst: tools.Address,
    payload: bytes,
    *,
    ttl: int = 64,
) -> bytes:
    """Ethernet + IPv4 or IPv6 + UDP around `payload`, with complete IP and UDP checksums (as a
    NIC delivers them; the relay's XDP program updates them incrementally)."""
    sip, dip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if sip.version != dip.version:
        raise ValueError(f"{src[0]} and {dst[0]} are not of one family")
    ulen = 8 + len(payload)
    udp = struct.pack("!HHHH", src[1], dst[1], ulen, 0) + payload
    if sip.version == 4:
        pseudo = sip.packed + dip.packed + struct.pack("!BBH", 0, IPPROTO_UDP, ulen)
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + ulen, 0, 0x4000, ttl, IPPROTO_UDP, 0)
        ip += sip.packed + dip.packed
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        ethertype = ETH_P_IP
    else:
        pseudo = sip.packed + dip.packed + struct.pack("!IxxxB", ulen, IPPROTO_UDP)
        ip = struct.pack("!IHBB", 6 << 28, ulen, IPPROTO_UDP, ttl) + sip.packed + dip.packed
        ethertype = ETH_P_IPV6
    check = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ethertype) + ip + udp


def payload(size: int, channel: int | None = None) -> bytes:
    """`size` application bytes, wrapped in ChannelData on `channel` if given (no padding, as
    `xdpturn-blast send` does)."""
    body = bytes(i & 0xFF for i in range(size))
    if channel is None:
        return body
    return struct.pack("!HH", channel, size) + body


# --- addresses from the sender's namespace ------------------------------------------------------


def _ip_json(netns_name: str, args: Sequence[str]) -> Any:
    out = subprocess.run(
        ["ip", "-n", netns_name, "-j", *args], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out) if out.strip() else []


@dataclass(frozen=True)
class NextHop:
    ifname: str  # the sender's interface
    src_mac: str
    dst_mac: str  # the next hop's (the gateway's) MAC


def next_hop(netns_name: str, dst_ip: str) -> NextHop:
    """The interface, its MAC and the next hop's MAC for `dst_ip`, from the namespace's route and
    neighbour tables. An unresolved neighbour is resolved first: one datagram from a socket in the
    namespace to the discard port of the next hop, then a bounded wait for the entry."""
    (route,) = _ip_json(netns_name, ["route", "get", dst_ip])
    dev = str(route["dev"])
    hop = str(route.get("gateway", dst_ip))
    (link,) = _ip_json(netns_name, ["link", "show", "dev", dev])
    deadline = time.monotonic() + NEIGH_TIMEOUT
    poked = False
    while True:
        for n in _ip_json(netns_name, ["neigh", "show", "to", hop, "dev", dev]):
            if n.get("lladdr") and "FAILED" not in n.get("state", []):
                return NextHop(dev, str(link["address"]), str(n["lladdr"]))
        if time.monotonic() > deadline:
            raise LookupError(f"no neighbour entry for {hop} on {dev} in {netns_name}")
        if not poked:
            poke(netns_name, hop)
            poked = True
        time.sleep(0.02)  # poll interval of a bounded wait


# --- the command the benchmark runs ---------------------------------------------------------------


def poke(netns_name: str, dst: str) -> None:
    """One empty datagram from a socket in `netns_name` to `dst`'s discard port: makes the hops in
    between resolve their neighbours before a run, so no frame of it waits in a neighbour queue."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns.entered(netns_name), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"", (dst, 9))


def make(
    netns_name: str,
    src: tools.Address,
    dst: tools.Address,
    size: int,
    *,
    rate: float | None,
    duration: float,
    channel: int | None = None,
) -> LiveSend:
    """A run from namespace `netns_name`: `size` payload bytes (in ChannelData on `channel` if
    given) from `src` to `dst`, out of the interface and to the next hop that `dst` routes by."""
    hop = next_hop(netns_name, dst[0])
    frame = udp_frame(hop.src_mac, hop.dst_mac, src, dst, payload(size, channel))
    return LiveSend(hop.ifname, frame, rate, duration, to=tools.format_address(dst), size=size)


@dataclass(frozen=True)
class LiveSend:
    """One bounded live-frames run of `frame` out of `ifname`, in the namespace the argv prefix
    enters."""

    ifname: str
    frame: bytes
    rate: float | None  # frames per second; None: as fast as it goes
    duration: float
    count: int | None = None
    to: str = ""  # for the result, e.g. "203.0.113.2:3478"
    size: int = 0  # application payload bytes, for the result

    def argv(self, prefix: Sequence[str] = ()) -> list[str]:
        args = [*prefix, sys.executable, "-m", "xdpturn_lab.bench.livegen"]
        args += ["--ifname", self.ifname, "--frame", self.frame.hex()]
        args += ["--rate", "max" if self.rate is None else repr(float(self.rate))]
        args += ["--duration", repr(float(self.duration)), "--to", self.to]
        args += ["--size", str(self.size)]
        if self.count is not None:
            args += ["--count", str(self.count)]
        return args

    def start(self, prefix: Sequence[str] = ()) -> LiveProcess:
        return LiveProcess(self, prefix)

    def run(self, prefix: Sequence[str] = ()) -> tools.SendResult:
        with self.start(prefix) as gen:
            gen.wait_ready()
            gen.go()
            return gen.result()


class LiveProcess(tools.LineProcess):
    """A running generator: `wait_ready()` (program loaded), `go()`, `result()`."""

    def __init__(self, cmd: LiveSend, prefix: Sequence[str]) -> None:
        self.cmd = cmd
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # importable under `ip netns exec`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            cmd.argv(prefix),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        super().__init__(proc, "livegen")
        self._started = time.monotonic()
        self._run_s = cmd.duration

    def wait_ready(self) -> None:
        self._line("ready", self._started + START_TIMEOUT)

    def go(self) -> None:
        """Start a run at the command's rate, for its duration."""
        self._go("go", self.cmd.duration)

    def go_at(self, rate: float | None, duration: float) -> None:
        """Start a run at `rate` (None: as fast as it goes) for `duration` seconds."""
        self._go(f"go {'max' if rate is None else repr(float(rate))} {float(duration)!r}", duration)

    def _go(self, line: str, duration: float) -> None:
        assert self.proc.stdin is not None
        self._run_s = duration
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def result(self) -> tools.SendResult:
        """The last run's result line (the process stays, waiting for the next "go")."""
        d = self._line("result", time.monotonic() + self._run_s + _GRACE_S)
        return tools.from_json(tools.SendResult, d)

    def stop(self) -> None:
        """End of input first: the child ends its loop and removes its veth pair itself (a
        SIGTERM would leave the pair behind); then the usual escalation."""
        if self.proc.poll() is None and self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=_GRACE_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().stop()


# --- the child process ----------------------------------------------------------------------------


def _emit(d: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(d) + "\n")
    sys.stdout.flush()


def hold_in_dispatcher(prog_fd: int) -> None:
    """Attach the program (native mode) to an idle veth pair of its own in this namespace.

    Every BPF_PROG_TEST_RUN of an XDP program adds it to the kernel's XDP dispatcher and removes it
    again, and each change waits for an RCU grace period: about 24 ms per call here, whatever
    `repeat` is. While the program is attached to a device it stays in the dispatcher, the calls
    change nothing and cost what their frames cost, so the generator can be paced in small
    calls. No traffic ever reaches this pair (it stays down).
    """
    release_dispatcher()
    subprocess.run(
        ["ip", "link", "add", HOLD_IF, "type", "veth", "peer", "name", HOLD_IF + "p"],
        check=True,
        capture_output=True,
    )
    libbpf.xdp_attach(socket.if_nametoindex(HOLD_IF), prog_fd, libbpf.XDP_FLAGS_DRV_MODE)


def release_dispatcher() -> None:
    """Remove the pair (and with it the attachment); no error if it is not there."""
    subprocess.run(["ip", "link", "del", HOLD_IF], check=False, capture_output=True)


def pace_burst(rate: float) -> int:
    """Frames per call when paced at `rate` per second (see PACE_SPAN_S)."""
    return max(1, min(PACE_BURST, int(rate * PACE_SPAN_S)))


def blast(
    prog_fd: int,
    ifindex: int,
    frame: bytes,
    rate: float | None,
    duration: float,
    count: int | None,
) -> tuple[int, int, float]:
    """Sends `frame` until `duration` or `count`; returns (frames, calls, elapsed seconds)."""
    limit = count if count is not None else 1 << 62
    sent = calls = 0
    t0 = time.monotonic()
    deadline = t0 + duration
    while sent < limit:
        now = time.monotonic()
        if now >= deadline:
            break
        repeat = MAX_REPEAT
        if rate is not None:
            burst = pace_burst(rate)
            due = t0 + sent / rate  # this call's start on the schedule
            if due >= deadline:
                break
            if due > now:
                time.sleep(due - now)
                repeat = burst
            else:  # behind: catch up
                repeat = min(CATCH_UP_BURST, burst + int((now - due) * rate))
        n = min(repeat, limit - sent)
        # The template is copied in again by every call (live mode reuses the kernel's buffers).
        libbpf.prog_test_run(
            prog_fd,
            frame,
            ingress_ifindex=ifindex,
            repeat=n,
            flags=libbpf.BPF_F_TEST_XDP_LIVE_FRAMES,
        )
        sent += n
        calls += 1
    return sent, calls, time.monotonic() - t0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdpturn_lab.bench.livegen", description=__doc__)
    p.add_argument("--ifname", required=True)
    p.add_argument("--frame", required=True, help="the Ethernet frame, hex")
    p.add_argument("--rate", default="max", help="frames per second, or max")
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--count", type=int)
    p.add_argument("--to", default="")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--no-wait", action="store_true", help="start at once, not on 'go'")
    a = p.parse_args(argv)
    frame = bytes.fromhex(a.frame)
    rate = None if a.rate == "max" else float(a.rate)
    if not 0 < a.duration <= 600 or (rate is not None and rate <= 0):
        p.error("--duration must be in (0, 600] and --rate positive")
    if len(frame) < TEMPLATE_LEN:
        p.error(f"--frame: at least {TEMPLATE_LEN} bytes (the program restores that many)")
    obj = libbpf.BpfObject(OBJECT_PATH)
    try:
        prog_fd = obj.program_fd(PROGRAM)
        obj.map("template").update(struct.pack("<I", 0), frame[:TEMPLATE_LEN])
        ifindex = socket.if_nametoindex(a.ifname)
        hold_in_dispatcher(prog_fd)
        _emit({"type": "ready", "local": a.ifname, "port": 0, "family": 0})
        if a.no_wait:
            _emit_result(a.to, frame, *blast(prog_fd, ifindex, frame, rate, a.duration, a.count))
            return 0
        runs = 0
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], START_TIMEOUT)
            words = sys.stdin.readline().split() if ready else []
            if not words or words[0] != "go":
                break  # end of input (or silence): done
            run_rate, run_s = rate, a.duration
            if len(words) == 3:
                run_rate = None if words[1] == "max" else float(words[1])
                run_s = float(words[2])
                if not 0 < run_s <= 600 or (run_rate is not None and run_rate <= 0):
                    print(f"livegen: bad go line {words!r}", file=sys.stderr)
                    return 2
            _emit_result(a.to, frame, *blast(prog_fd, ifindex, frame, run_rate, run_s, a.count))
            runs += 1
        if runs == 0:
            print("livegen: no 'go' on stdin", file=sys.stderr)
            return 1
    finally:
        release_dispatcher()
        obj.close()
    return 0


def _emit_result(to: str, frame: bytes, sent: int, calls: int, elapsed: float) -> None:
    _emit(
        {
            "type": "result",
            "to": to,
            "sent": sent,
            "bytes": sent * (len(frame) - _headers(frame)),
            "datagram_bytes": len(frame) - _headers(frame),
            "elapsed_s": elapsed,
            "pps": sent / elapsed if elapsed > 0 else 0.0,
            "errors": 0,
            "calls": calls,
            "gso_segments": 1,
            "interrupted": False,
        }
    )


def _headers(frame: bytes) -> int:
    """Ethernet + IP + UDP header bytes of a frame `udp_frame` made."""
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    return 14 + (20 if ethertype == ETH_P_IP else 40) + 8


if __name__ == "__main__":
    raise SystemExit(main())
