"""End-to-end check of a TURN relay: two allocations relaying to each other through it.

Client A and client B each allocate on the same server, permit and bind a channel to the other's
relayed address, so every datagram goes client -> relay -> relay (the hairpin: the peer is the
relay itself) -> client. A sends `count` numbered datagrams to B, B echoes each back, and A
times the round trips. A window bounds the datagrams in flight so the probe measures the relay,
not socket buffer overflow; a datagram not back within `timeout` counts as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
import time
from dataclasses import dataclass, field

from xdpturn.client.turn import ClientOptions, TurnClient, TurnClientError
from xdpturn.proto.addr import Family, TransportAddr

_HEADER = struct.Struct("!4sI")
_MAGIC = b"xdpP"


@dataclass(frozen=True)
class ProbeResult:
    server: TransportAddr
    sent: int  # datagrams A sent towards B
    received: int  # echoes back at A, in time
    forwarded: int  # datagrams B got from A (the first half of the trip)
    rtts: tuple[float, ...] = field(repr=False)  # seconds, in arrival order
    relayed: tuple[TransportAddr, ...] = ()  # A's and B's relayed addresses, when allocated
    channels: tuple[int, ...] = ()
    error: str | None = None  # why the probe stopped early, if it did

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def ok(self) -> bool:
        return self.error is None and self.sent > 0 and self.lost == 0

    def rtt_percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the round-trip times, in seconds."""
        if not self.rtts:
            return None
        ordered = sorted(self.rtts)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]

    @property
    def rtt_min(self) -> float | None:
        return min(self.rtts, default=None)

    @property
    def rtt_max(self) -> float | None:
        return max(self.rtts, default=None)


async def probe(
    server: TransportAddr,
    username: str,
    password: str,
    *,
    count: int,
    family: Family = Family.IPV4,
    payload_size: int = 64,
    window: int = 16,
    timeout: float = 2.0,
    options: ClientOptions | None = None,
) -> ProbeResult:
    """Relay `count` datagrams A -> B -> A through `server`. Failures (refused credentials, no
    answer) come back in `ProbeResult.error`, not as exceptions, so a CLI can print them."""
    if count < 0 or window < 1 or payload_size < _HEADER.size:
        raise ValueError("need count >= 0, window >= 1, payload_size >= 8")
    run = _Run(server, count, payload_size, window, timeout)
    a = b = None
    try:
        a = await TurnClient.connect(server, username, password, options=options)
        b = await TurnClient.connect(server, username, password, options=options)
        [relay_a, *_] = await a.allocate(family)
        [relay_b, *_] = await b.allocate(family)
        run.relayed = (relay_a, relay_b)
        await a.create_permission(relay_b)
        await b.create_permission(relay_a)
        run.channels = (await a.bind_channel(relay_b), await b.bind_channel(relay_a))
        await run.exchange(a, b, relay_a, relay_b)
    except (TurnClientError, OSError) as exc:
        run.error = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
    finally:
        for client in (a, b):
            if client is not None:
                await client.close()
    return run.result()


class _Run:
    def __init__(
        self, server: TransportAddr, count: int, payload_size: int, window: int, timeout: float
    ) -> None:
        self.server = server
        self.count = count
        self.padding = bytes(payload_size - _HEADER.size)
        self.window = window
        self.timeout = timeout
        self.sent = 0
        self.forwarded = 0
        self.lost = 0
        self.rtts: list[float] = []
        self.relayed: tuple[TransportAddr, ...] = ()
        self.channels: tuple[int, ...] = ()
        self.error: str | None = None

    def result(self) -> ProbeResult:
        return ProbeResult(
            server=self.server,
            sent=self.sent,
            received=len(self.rtts),
            forwarded=self.forwarded,
            rtts=tuple(self.rtts),
            relayed=self.relayed,
            channels=self.channels,
            error=self.error,
        )

    async def exchange(
        self, a: TurnClient, b: TurnClient, relay_a: TransportAddr, relay_b: TransportAddr
    ) -> None:
        loop = asyncio.get_running_loop()
        in_flight: dict[int, float] = {}  # sequence number -> send time
        slots = asyncio.Semaphore(self.window)
        finished = asyncio.Event()
        timers: list[asyncio.TimerHandle] = []

        def settle(seq: int, arrived: float | None) -> None:
            sent_at = in_flight.pop(seq, None)
            if sent_at is None:
                return  # late after its timeout, or duplicated
            if arrived is None:
                self.lost += 1
            else:
                self.rtts.append(arrived - sent_at)
            slots.release()
            if len(self.rtts) + self.lost == self.count:
                finished.set()

        async def echo() -> None:
            while True:
                peer, data = await b.recv()
                if peer == relay_a and data.startswith(_MAGIC):
                    self.forwarded += 1
                    b.send(relay_a, data)

        async def collect() -> None:
            while True:
                peer, data = await a.recv()
                if peer == relay_b and len(data) >= _HEADER.size:
                    magic, seq = _HEADER.unpack_from(data)
                    if magic == _MAGIC:
                        settle(seq, time.perf_counter())

        async def send_all() -> None:
            for seq in range(self.count):
                await slots.acquire()
                in_flight[seq] = time.perf_counter()  # loop.time() is ms-grained on uvloop
                a.send(relay_b, _HEADER.pack(_MAGIC, seq) + self.padding)
                self.sent += 1
                timers.append(loop.call_later(self.timeout, settle, seq, None))

        if self.count == 0:
            return
        tasks = [asyncio.create_task(f()) for f in (echo, collect, send_all)]
        try:
            # Every datagram settles by its own timer, so this wait is bounded; the outer
            # bound only guards against a bug here, or a recv task that died.
            done_wait = asyncio.create_task(finished.wait())
            await asyncio.wait(
                [done_wait, *tasks[:2]],
                timeout=self.count * self.timeout + self.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            done_wait.cancel()
            if not finished.is_set():
                self.error = "probe did not finish"
                for task in tasks[:2]:
                    if task.done() and task.exception() is not None:
                        self.error = str(task.exception())
        finally:
            for timer in timers:
                timer.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, TurnClientError):
                    await task


def format_probe(result: ProbeResult) -> str:
    """A few lines for people."""
    lines = [f"probe {result.server}"]
    if len(result.relayed) == 2:
        a, b = result.relayed
        channels = "/".join(f"0x{c:04x}" for c in result.channels) or "none"
        lines.append(f"  relayed: {a} <-> {b} (hairpin, channels {channels})")
    loss = 100.0 * result.lost / result.sent if result.sent else 0.0
    lines.append(
        f"  datagrams: {result.sent} sent, {result.forwarded} forwarded, "
        f"{result.received} returned, {result.lost} lost ({loss:.1f}%)"
    )
    if result.rtts:
        points = [
            ("min", result.rtt_min),
            ("p50", result.rtt_percentile(50)),
            ("p90", result.rtt_percentile(90)),
            ("p99", result.rtt_percentile(99)),
            ("max", result.rtt_max),
        ]
        lines.append(
            "  rtt ms: "
            + " ".join(f"{name} {value * 1000:.3f}" for name, value in points if value is not None)
        )
    if result.error:
        lines.append(f"  error: {result.error}")
    lines.append("  result: " + ("OK" if result.ok else "FAILED"))
    return "\n".join(lines)
