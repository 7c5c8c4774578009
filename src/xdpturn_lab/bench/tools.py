"""Typed wrappers around `xdpturn-blast`, the C load generator of the benchmarks (blast.c).

A builder (`send`, `recv`, `echo`, `ping`) returns a `Command`; the command runs as a subprocess,
optionally behind an argv prefix (`netns_prefix(NS)`, `["taskset", "-c", "1"]`) or with an
inherited socket (`fd=sock.fileno()`, passed with `pass_fds` automatically):

    with recv(("127.0.0.1", 0), duration=5, idle_timeout=0.5).start() as rx:
        port = rx.wait_ready().port
        sent = send(("127.0.0.1", port), size=100, rate=None, duration=1).run()
        got = rx.result()
    assert got.unique == sent.sent

    async with await echo(("::1", 0), duration=5).start_async() as peer:
        ...

The tool prints a `{"type": "ready", ...}` line once its socket is set up, so a caller waits for a
receiver without sleeping, then one `{"type": "result", ...}` line, also after SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

BINARY_NAME = "xdpturn-blast"
_HERE = Path(__file__).resolve().parent

Address = tuple[str, int]
T = TypeVar("T")
R = TypeVar("R")  # a result dataclass

# How long past its own bound a tool may take to print its result before it is stopped.
_GRACE_S = 5.0


class BlastError(RuntimeError):
    """The tool failed, timed out, or printed something that is not its JSON protocol."""


def binary_path() -> Path:
    """Where `make -s -C src/xdpturn_lab/bench` puts the tool (XDPTURN_BLAST overrides it)."""
    return Path(os.environ.get("XDPTURN_BLAST", _HERE / BINARY_NAME))


def build() -> Path:
    """Builds the tool if it is missing or stale (make is idempotent) and returns its path."""
    subprocess.run(["make", "-s", "-C", str(_HERE)], check=True)
    return binary_path()


def netns_prefix(netns: str) -> list[str]:
    """An argv prefix that runs the tool inside network namespace `netns`."""
    return ["ip", "netns", "exec", netns]


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Percentiles:
    """Latency or RTT distribution in microseconds (log-linear histogram, < 1% error)."""

    samples: int
    min: float
    mean: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float


@dataclass(frozen=True)
class Ready:
    """The tool's socket is set up: its local address (the port is useful with port 0)."""

    local: str
    port: int
    family: int


@dataclass(frozen=True)
class SendResult:
    to: str
    sent: int
    bytes: int  # UDP payload bytes, ChannelData header included
    datagram_bytes: int
    elapsed_s: float
    pps: float
    errors: int  # transient send errors (retried); they cost time, not sequence numbers
    calls: int  # sendmmsg calls
    gso_segments: int  # datagrams per UDP_SEGMENT super-datagram (1: no GSO)
    interrupted: bool


@dataclass(frozen=True)
class RecvResult:
    received: int  # datagrams, malformed and duplicates included
    bytes: int
    malformed: int  # too short, or not ChannelData (on the expected channel) when asked for
    socket_drops: int  # dropped by this socket's full receive buffer (SO_RXQ_OVFL)
    elapsed_s: float
    active_s: float  # first to last datagram
    pps: float  # over active_s
    future_timestamps: int  # timestamps ahead of our clock: the sender is on another machine
    unique: int
    lost: int  # gaps below max_seq; `lost_vs(sent)` also counts the tail
    reordered: int
    duplicates: int
    out_of_range: int
    first_seq: int | None
    max_seq: int | None
    latency_us: Percentiles | None  # one-way, valid when sender and receiver share the clock
    interrupted: bool

    def lost_vs(self, sent: SendResult) -> int:
        """Loss against what the sender says it sent (covers losses after the last arrival)."""
        return sent.sent - self.unique


@dataclass(frozen=True)
class EchoResult:
    received: int
    echoed: int
    bytes: int
    dropped: int  # could not be sent back (full queue, unreachable sender)
    truncated: int
    elapsed_s: float
    interrupted: bool


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    lost: int
    duplicates: int
    reordered: int
    malformed: int
    foreign: int  # datagrams from another address (inherited, unconnected socket)
    errors: int
    elapsed_s: float
    rtt_us: Percentiles | None
    interrupted: bool


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
}


def from_json(cls: type[R], d: dict[str, Any]) -> R:
    """Build a result dataclass from the tool's JSON line, converting each field by its
    annotation (`int`, `float`, `bool`, `str`, `Percentiles`, each possibly `| None`)."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        raw = d[f.name]
        kind = str(f.type).removesuffix(" | None")
        if raw is None:
            values[f.name] = None
        elif kind == "Percentiles":
            values[f.name] = from_json(Percentiles, raw)
        else:
            values[f.name] = _CONVERTERS[kind](raw)
    return cls(**values)


# ------------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Command(Generic[T]):
    """One invocation of the tool: its arguments, the fd it inherits, how to read its result,
    and how long it may run (its own bound plus a grace period)."""

    args: tuple[str, ...]
    parse: Callable[[dict[str, Any]], T]
    bound_s: float
    fd: int | None = None

    def argv(self, prefix: Sequence[str] = ()) -> list[str]:
        return [*prefix, str(binary_path()), *self.args]

    def start(self, prefix: Sequence[str] = ()) -> Blast[T]:
        return Blast(self, prefix)

    async def start_async(self, prefix: Sequence[str] = ()) -> AsyncBlast[T]:
        return await AsyncBlast.create(self, prefix)

    def run(self, prefix: Sequence[str] = ()) -> T:
        """Runs to completion and returns the result."""
        with self.start(prefix) as proc:
            return proc.result()

    async def run_async(self, prefix: Sequence[str] = ()) -> T:
        async with await self.start_async(prefix) as proc:
            return await proc.result()


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def _source(source: Address | None, fd: int | None) -> list[str]:
    if source is not None and fd is not None:
        raise ValueError("source and fd exclude each other")
    if source is not None:
        return ["--from", format_address(source)]
    if fd is not None:
        return ["--fd", str(fd)]
    return []


def send(
    to: Address,
    *,
    size: int,
    rate: float | None,
    duration: float,
    count: int | None = None,
    channel: int | None = None,
    source: Address | None = None,
    fd: int | None = None,
    batch: int | None = None,
    gso: bool = False,
    sockbuf: int | None = None,
) -> Command[SendResult]:
    """Datagrams of `size` payload bytes at `rate` per second (None: as fast as possible), wrapped
    in ChannelData on `channel` if given. `source` binds (SO_REUSEPORT); `fd` reuses an open socket,
    e.g. the one a TURN client allocated from, as a relay keys the allocation by source address.
    `gso` sends UDP_SEGMENT super-datagrams, cut into datagrams below the stack: about 4x the
    rate of one core. The wire carries the same datagrams; only a receiving socket with UDP_GRO
    enabled would see them coalesced again."""
    args = ["send", "--to", format_address(to), *_source(source, fd)]
    args += ["--size", str(size), "--rate", "max" if rate is None else _num(rate)]
    args += ["--duration", _num(duration)]
    if count is not None:
        args += ["--count", str(count)]
    if batch is not None:
        args += ["--batch", str(batch)]
    if channel is not None:
        args += ["--channel", str(channel)]
    if gso:
        args.append("--gso")
    if sockbuf is not None:
        args += ["--sockbuf", str(sockbuf)]
    return Command(tuple(args), partial(from_json, SendResult), duration + _GRACE_S, fd)


def junk(
    to: Address,
    *,
    rate: float | None,
    duration: float,
    count: int | None = None,
    source: Address | None = None,
    batch: int | None = None,
    sockbuf: int | None = None,
) -> Command[SendResult]:
    """What an attacker throws at a TURN port, at `rate` per second (None: as fast as one core
    sends): random bytes, truncated and bit-flipped STUN requests, ChannelData with random
    channel numbers and lying lengths, and one 65,000-byte datagram in 256. The same sequence
    every run (a fixed seed). `datagram_bytes` of the result is the average size."""
    args = ["junk", "--to", format_address(to), *_source(source, None)]
    args += ["--rate", "max" if rate is None else _num(rate), "--duration", _num(duration)]
    if count is not None:
        args += ["--count", str(count)]
    if batch is not None:
        args += ["--batch", str(batch)]
    if sockbuf is not None:
        args += ["--sockbuf", str(sockbuf)]
    return Command(tuple(args), partial(from_json, SendResult), duration + _GRACE_S)


def recv(
    on: Address | None = None,
    *,
    duration: float,
    fd: int | None = None,
    channel_data: bool = False,
    channel: int | None = None,
    idle_timeout: float | None = None,
    count: int | None = None,
    batch: int | None = None,
    sockbuf: int | None = None,
) -> Command[RecvResult]:
    """Counts datagrams on `on` (port 0: any, see `Ready.port`) or on inherited socket `fd`.
    `channel_data` strips a ChannelData header; `channel` also requires that channel number.
    `idle_timeout` ends the run that long after the last datagram."""
    if (on is None) == (fd is None):
        raise ValueError("give exactly one of on and fd")
    args = ["recv", *(["--on", format_address(on)] if on else ["--fd", str(fd)])]
    args += ["--duration", _num(duration)]
    if channel is not None:
        args += ["--channel", str(channel)]
    elif channel_data:
        args.append("--channel-data")
    if idle_timeout is not None:
        args += ["--idle-timeout", _num(idle_timeout)]
    if count is not None:
        args += ["--count", str(count)]
    if batch is not None:
        args += ["--batch", str(batch)]
    if sockbuf is not None:
        args += ["--sockbuf", str(sockbuf)]
    return Command(tuple(args), partial(from_json, RecvResult), duration + _GRACE_S, fd)


def echo(
    on: Address | None = None,
    *,
    duration: float,
    fd: int | None = None,
    count: int | None = None,
    batch: int | None = None,
    sockbuf: int | None = None,
) -> Command[EchoResult]:
    """Reflects every datagram to its sender, as it arrived (a ChannelData message goes back as
    one on the same channel): the answering peer of a round-trip measurement."""
    if (on is None) == (fd is None):
        raise ValueError("give exactly one of on and fd")
    args = ["echo", *(["--on", format_address(on)] if on else ["--fd", str(fd)])]
    args += ["--duration", _num(duration)]
    if count is not None:
        args += ["--count", str(count)]
    if batch is not None:
        args += ["--batch", str(batch)]
    if sockbuf is not None:
        args += ["--sockbuf", str(sockbuf)]
    return Command(tuple(args), partial(from_json, EchoResult), duration + _GRACE_S, fd)


def ping(
    to: Address,
    *,
    rate: float,
    count: int,
    size: int,
    channel: int | None = None,
    source: Address | None = None,
    fd: int | None = None,
    timeout: float = 1.0,
    duration: float | None = None,
) -> Command[PingResult]:
    """`count` datagrams at `rate` per second; echoes (plain or ChannelData) are matched by
    sequence number. Waits `timeout` after the last one for stragglers."""
    args = ["ping", "--to", format_address(to), *_source(source, fd)]
    args += ["--rate", _num(rate), "--count", str(count), "--size", str(size)]
    args += ["--timeout", _num(timeout)]
    if channel is not None:
        args += ["--channel", str(channel)]
    if duration is not None:
        args += ["--duration", _num(duration)]
    send_s = count / rate if duration is None else min(duration, count / rate)
    return Command(tuple(args), partial(from_json, PingResult), send_s + timeout + _GRACE_S, fd)


# ------------------------------------------------------------------------------------------------
# Running processes


def _parse_line(line: bytes, kind: str) -> dict[str, Any]:
    try:
        d = json.loads(line)
    except ValueError as e:
        raise BlastError(f"tool printed {line!r}, not JSON") from e
    if not isinstance(d, dict) or d.get("type") != kind:
        raise BlastError(f"expected a {kind} line, got {line!r}")
    return d


def _ready(d: dict[str, Any]) -> Ready:
    return Ready(local=str(d["local"]), port=int(d["port"]), family=int(d["family"]))


@dataclass
class _Lines:
    """Line splitter over a raw pipe fd, so a deadline holds (a buffered reader could hold a
    complete line that select() no longer reports)."""

    fd: int
    buf: bytes = b""
    eof: bool = False
    lines: list[bytes] = field(default_factory=list)

    def next(self, deadline: float) -> bytes | None:
        while not self.lines and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
                break
            *complete, self.buf = (self.buf + chunk).split(b"\n")
            self.lines += complete
        return self.lines.pop(0) if self.lines else None


class LineProcess:
    """A load tool running as a child process that reports JSON lines on stdout ("ready",
    "result"); leaving the `with` block stops it if it still runs."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc = proc
        self.name = name  # for error messages
        assert proc.stdout is not None
        self._lines = _Lines(proc.stdout.fileno())

    def _line(self, kind: str, deadline: float) -> dict[str, Any]:
        try:
            line = self._lines.next(deadline)
        except TimeoutError:
            self.stop()
            raise BlastError(f"{self.name}: no {kind} line within the deadline") from None
        if line is None:
            self.proc.wait(timeout=_GRACE_S)
            assert self.proc.stderr is not None
            err = self.proc.stderr.read().decode(errors="replace").strip()
            raise BlastError(f"{self.name} exited with {self.proc.returncode}: {err[-2000:]}")
        return _parse_line(line, kind)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class Blast(LineProcess, Generic[T]):
    """A running tool (synchronous)."""

    def __init__(self, cmd: Command[T], prefix: Sequence[str] = ()) -> None:
        self.cmd = cmd
        self.started = time.monotonic()
        proc = subprocess.Popen(
            cmd.argv(prefix),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=() if cmd.fd is None else (cmd.fd,),
        )
        super().__init__(proc, " ".join(cmd.args))
        self._ready: Ready | None = None
        self._result: T | None = None

    def wait_ready(self, timeout: float = _GRACE_S) -> Ready:
        if self._ready is None:
            self._ready = _ready(self._line("ready", time.monotonic() + timeout))
        return self._ready

    def result(self, timeout: float | None = None) -> T:
        """Waits for the result line; `timeout` defaults to the command's own bound."""
        if self._result is None:
            bound = self.cmd.bound_s if timeout is None else timeout
            self.wait_ready(timeout=max(0.0, self.started + bound - time.monotonic()))
            self._result = self.cmd.parse(self._line("result", self.started + bound))
            self.proc.wait(timeout=_GRACE_S)
        return self._result

    def interrupt(self) -> None:
        """Asks the tool to stop now; it still prints its result."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)


class AsyncBlast(Generic[T]):
    """A running tool (asyncio). Leaving the `async with` block stops it if it still runs."""

    def __init__(self, cmd: Command[T], proc: asyncio.subprocess.Process) -> None:
        self.cmd = cmd
        self.proc = proc
        self.started = time.monotonic()
        self._ready: Ready | None = None
        self._result: T | None = None

    @classmethod
    async def create(cls, cmd: Command[T], prefix: Sequence[str] = ()) -> AsyncBlast[T]:
        proc = await asyncio.create_subprocess_exec(
            *cmd.argv(prefix),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=() if cmd.fd is None else (cmd.fd,),
        )
        return cls(cmd, proc)

    async def _line(self, kind: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.0, timeout))
        except TimeoutError:
            await self.stop()
            raise BlastError(f"no {kind} line within the deadline: {self.cmd.args}") from None
        if not line:
            err = await asyncio.wait_for(self.proc.stderr.read(), _GRACE_S)
            await asyncio.wait_for(self.proc.wait(), _GRACE_S)
            raise BlastError(
                f"tool exited with {self.proc.returncode}: {err.decode(errors='replace')}"
            )
        return _parse_line(line, kind)

    async def wait_ready(self, timeout: float = _GRACE_S) -> Ready:
        if self._ready is None:
            self._ready = _ready(await self._line("ready", timeout))
        return self._ready

    async def result(self, timeout: float | None = None) -> T:
        if self._result is None:
            bound = self.cmd.bound_s if timeout is None else timeout
            deadline = self.started + bound
            await self.wait_ready(timeout=deadline - time.monotonic())
            self._result = self.cmd.parse(await self._line("result", deadline - time.monotonic()))
            await asyncio.wait_for(self.proc.wait(), _GRACE_S)
        return self._result

    def interrupt(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), _GRACE_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
