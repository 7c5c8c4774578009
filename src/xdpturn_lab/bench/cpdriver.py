"""The control-plane load driver: many authenticated Allocate + CreatePermission + ChannelBind
sequences in flight from one process, cheap enough that the relay, not the driver, sets the pace.

`xdpturn.client.TurnClient` spends about twice a relay's CPU per sequence (asyncio futures, a
task per client, full decoding and verification of every answer), so with it on the generator's
core the control-plane rate was the driver's. This driver keeps `window` sequences in flight
with one epoll loop and no asyncio: each sequence is one connected UDP socket (an allocation is
its client's 5-tuple) stepping through the unauthenticated Allocate (answered 401 with REALM and
NONCE), the authenticated Allocate, CreatePermission and ChannelBind, with STUN retransmissions
(RFC 8489 6.2.1: RTO 0.5 s, doubling, 7 transmissions). Requests are built with the project's
codec (`proto.stun`, MESSAGE-INTEGRITY with the long-term key of REST credentials); answers are
matched by transaction id and judged by their class, and only error answers are decoded (for the
401's NONCE and REALM, or the error code). It does not verify the answers' MESSAGE-INTEGRITY:
it drives load, it does not test the relay.

Sockets and credentials are made before "ready", so the measured run holds only the exchange.
Protocol on stdin/stdout, as `livegen`: `{"type": "ready"}`, then for the line "go" one run and
one `{"type": "result", ...}` line; the process keeps its sockets (the relay's allocations stay
reachable) until end of input. Several processes split the sequences when one core is not
enough; the caller pins them (`DriverProcess`).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdpturn.proto import stun
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.auth import mint_rest_credentials
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method
from xdpturn_lab.bench import tools

RTO = 0.5  # seconds, RFC 8489's default
TRANSMISSIONS = 7
CHANNEL = 0x4000
START_TIMEOUT = 60.0  # how long the child waits for "go" (10,000 sockets take a while to open)
CREDENTIAL_TTL = 3600
UDP_TRANSPORT = struct.pack("!BBH", 17, 0, 0)  # REQUESTED-TRANSPORT: UDP
STEPS = ("allocate", "allocate (authenticated)", "create permission", "channel bind")
_SUCCESS, _ERROR = int(MessageClass.SUCCESS), int(MessageClass.ERROR)


@dataclass
class _Sequence:
    """One client: its socket and where it is in Allocate -> CreatePermission -> ChannelBind."""

    sock: socket.socket
    username: str
    password: str
    step: int = 0
    tid: bytes = b""
    request: bytes = b""
    sent_at: float = 0.0
    transmissions: int = 0
    key: bytes | None = None
    realm: str = ""
    nonce: str = ""
    stale_retried: bool = False


@dataclass
class RunResult:
    succeeded: int = 0
    failed: int = 0
    retransmissions: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # this process's user + system time over the run
    errors: dict[str, int] = field(default_factory=dict)  # "step: what" -> how many

    def fail(self, what: str) -> None:
        self.failed += 1
        self.errors[what] = self.errors.get(what, 0) + 1


def _class(data: bytes) -> int:
    t = (data[0] << 8) | data[1]
    return ((t >> 4) & 0b01) | ((t >> 7) & 0b10)


class Driver:
    """The sans-process part: sequences, requests and answers, driven by `run`."""

    def __init__(self, server: TransportAddr, peer: TransportAddr, seqs: list[_Sequence]) -> None:
        self._server = server
        self._peer = peer
        self._seqs = seqs
        self.result = RunResult()

    def _send(self, s: _Sequence, now: float) -> None:
        s.tid = os.urandom(12)
        if s.step <= 1:
            msg = Message(Method.ALLOCATE, MessageClass.REQUEST, s.tid)
            msg.add(AttrType.REQUESTED_TRANSPORT, UDP_TRANSPORT)
        elif s.step == 2:
            msg = Message(Method.CREATE_PERMISSION, MessageClass.REQUEST, s.tid)
            msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(self._peer, s.tid))
        else:
            msg = Message(Method.CHANNEL_BIND, MessageClass.REQUEST, s.tid)
            msg.add(AttrType.CHANNEL_NUMBER, stun.encode_channel_number(CHANNEL))
            msg.add(AttrType.XOR_PEER_ADDRESS, stun.encode_xor_address(self._peer, s.tid))
        if s.step == 0:
            s.request = stun.encode(msg)
        else:
            msg.add(AttrType.USERNAME, stun.encode_text(s.username))
            msg.add(AttrType.REALM, stun.encode_text(s.realm))
            msg.add(AttrType.NONCE, stun.encode_text(s.nonce))
            s.request = stun.encode(msg, integrity_key=s.key)
        s.transmissions = 0
        self._transmit(s, now)

    def _transmit(self, s: _Sequence, now: float) -> None:
        s.sent_at = now
        s.transmissions += 1
        # e.g. ENOBUFS, or an ICMP error queued on the socket: the retransmission copes
        with contextlib.suppress(OSError):
            s.sock.send(s.request)

    def answer(self, s: _Sequence, data: bytes, now: float) -> bool:
        """Handle one datagram for `s`; True when the sequence is over (done or failed)."""
        if len(data) < 20 or data[8:20] != s.tid:
            return False  # a late answer to an earlier transmission, or junk
        cls = _class(data)
        if cls == _SUCCESS:
            if s.step == 3:
                self.result.succeeded += 1
                return True
            s.step += 1
            self._send(s, now)
            return False
        if cls != _ERROR:
            return False
        try:
            msg = stun.decode(data)
            code, reason = stun.decode_error_code(msg.get(AttrType.ERROR_CODE) or b"")
            nonce, realm = msg.get(AttrType.NONCE), msg.get(AttrType.REALM)
            if code == 401 and s.step == 0 and nonce is not None and realm is not None:
                s.realm, s.nonce = stun.decode_text(realm), stun.decode_text(nonce)
                s.key = stun.long_term_key(s.username, s.realm, s.password)
                s.step = 1
                self._send(s, now)
                return False
            if code == 438 and s.step > 0 and nonce is not None and not s.stale_retried:
                s.stale_retried = True  # once per sequence, as TurnClient does
                s.nonce = stun.decode_text(nonce)
                self._send(s, now)
                return False
        except stun.StunDecodeError:
            self.result.fail(f"{STEPS[s.step]}: malformed error answer")
            return True
        self.result.fail(f"{STEPS[s.step]}: {code} {reason.strip()}")
        return True

    def run(self, window: int, timeout: float) -> RunResult:
        """All sequences, at most `window` in flight, for at most `timeout` seconds."""
        poll = select.epoll()
        by_fd: dict[int, _Sequence] = {}
        waiting = list(reversed(self._seqs))
        # (when to retransmit, fd, transmission it is for): entries of answered or superseded
        # transmissions are skipped when they come up.
        timers: list[tuple[float, int, bytes, int]] = []
        cpu0, t0 = time.process_time(), time.monotonic()
        end = t0 + timeout
        r = self.result

        def arm(s: _Sequence) -> None:
            due = s.sent_at + RTO * 2 ** (s.transmissions - 1)
            heapq.heappush(timers, (due, s.sock.fileno(), s.tid, s.transmissions))

        def start(now: float) -> None:
            s = waiting.pop()
            by_fd[s.sock.fileno()] = s
            poll.register(s.sock.fileno(), select.EPOLLIN)
            self._send(s, now)
            arm(s)

        def finish(fd: int, now: float) -> None:
            poll.unregister(fd)
            del by_fd[fd]
            if waiting:
                start(now)

        try:
            now = time.monotonic()
            while waiting and len(by_fd) < window:
                start(now)
            while by_fd and now < end:
                events = poll.poll(max(0.0, min(timers[0][0] if timers else end, end) - now))
                now = time.monotonic()
                for fd, _ in events:
                    s = by_fd.get(fd)
                    if s is None:
                        continue
                    try:
                        data = s.sock.recv(2048)
                    except OSError:
                        continue  # ICMP errors: the retransmission copes
                    if self.answer(s, data, now):
                        finish(fd, now)
                    elif s.sent_at == now:  # it sent its next request
                        arm(s)
                while timers and timers[0][0] <= now:
                    _, fd, tid, transmissions = heapq.heappop(timers)
                    s = by_fd.get(fd)
                    if s is None or s.tid != tid or s.transmissions != transmissions:
                        continue
                    if s.transmissions >= TRANSMISSIONS:
                        r.fail(f"{STEPS[s.step]}: no answer after {TRANSMISSIONS} transmissions")
                        finish(fd, now)
                    else:
                        r.retransmissions += 1
                        self._transmit(s, now)
                        arm(s)
            for _ in range(len(by_fd) + len(waiting)):
                r.fail(f"unfinished after {timeout:.0f} s")
        finally:
            poll.close()
        r.elapsed_s = time.monotonic() - t0
        r.cpu_s = time.process_time() - cpu0
        return r


# --- the parent's side ---------------------------------------------------------------------------


class DriverProcess(tools.LineProcess):
    """A running driver child: `wait_ready()`, `go()`, `result()`; leaving the `with` block ends
    it (end of input: it closes its sockets)."""

    def __init__(self, prefix: Sequence[str], args: Sequence[str], timeout: float) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # importable under `ip netns exec`
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        argv = [*prefix, sys.executable, "-m", "xdpturn_lab.bench.cpdriver", *args]
        argv += ["--timeout", repr(timeout)]
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        super().__init__(proc, "cpdriver")
        self._timeout = timeout

    def wait_ready(self) -> None:
        self._line("ready", time.monotonic() + START_TIMEOUT)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        return self._line("result", time.monotonic() + self._timeout + 10.0)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        super().stop()


def driver_args(
    server: TransportAddr, peer: TransportAddr, secret: str, first: int, count: int, window: int
) -> list[str]:
    return [
        "--server",
        str(server),
        "--peer",
        str(peer),
        "--secret",
        secret,
        "--first",
        str(first),
        "--count",
        str(count),
        "--window",
        str(window),
    ]


# --- the child process ---------------------------------------------------------------------------


def _emit(d: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(d) + "\n")
    sys.stdout.flush()


def _open(server: TransportAddr, secret: str, first: int, count: int) -> list[_Sequence]:
    family = socket.AF_INET6 if ":" in str(server.ip) else socket.AF_INET
    now = time.time()
    seqs: list[_Sequence] = []
    for i in range(first, first + count):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((str(server.ip), server.port))
        creds = mint_rest_credentials(secret, now=now, ttl=CREDENTIAL_TTL, user_id=f"cp{i}")
        seqs.append(_Sequence(sock, creds.username, creds.password))
    return seqs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xdpturn_lab.bench.cpdriver", description=__doc__)
    p.add_argument("--server", required=True, help="the relay's TURN address, IP:PORT")
    p.add_argument("--peer", required=True, help="the peer to permit and bind, IP:PORT")
    p.add_argument("--secret", required=True, help="the relay's REST secret")
    p.add_argument("--first", type=int, default=0, help="first user number (users cpN)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--window", type=int, required=True, help="sequences in flight")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    a = p.parse_args(argv)
    if a.count < 1 or a.window < 1 or not 0 < a.timeout <= 3600:
        p.error("--count and --window must be positive, --timeout in (0, 3600]")
    try:
        server, peer = TransportAddr.parse(a.server), TransportAddr.parse(a.peer)
    except ValueError as e:
        p.error(str(e))
    seqs = _open(server, a.secret, a.first, a.count)
    try:
        _emit({"type": "ready", "sequences": len(seqs)})
        ready, _, _ = select.select([sys.stdin], [], [], START_TIMEOUT)
        if not ready or sys.stdin.readline().strip() != "go":
            print("cpdriver: no 'go' on stdin", file=sys.stderr)
            return 1
        r = Driver(server, peer, seqs).run(a.window, a.timeout)
        _emit(
            {
                "type": "result",
                "succeeded": r.succeeded,
                "failed": r.failed,
                "retransmissions": r.retransmissions,
                "elapsed_s": r.elapsed_s,
                "cpu_s": r.cpu_s,
                "errors": r.errors,
            }
        )
        sys.stdin.read()  # keep the sockets until the parent is done with the relay
    finally:
        for s in seqs:
            s.sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
