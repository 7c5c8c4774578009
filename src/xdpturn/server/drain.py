"""Draining and the process life cycle of `xdpturn serve`.

SIGTERM (what systemd, Docker and Kubernetes send first) or POST /drain starts a drain: the core
answers new Allocates with 300 Try Alternate (--alternate-server) or 508, existing allocations
keep relaying, and the process stops by itself once they are all gone or --drain-timeout has
passed. SIGINT stops at once, also during a drain. Stopping closes every allocation and detaches
the fast path (RelayServer.stop).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from xdpturn.proto.addr import TransportAddr

if TYPE_CHECKING:
    from xdpturn.config import ServeConfig
    from xdpturn.server.relay import RelayServer

log = logging.getLogger("xdpturn.server")

# How often a drain looks whether the last allocation is gone. Allocations end on the core's own
# timer; polling keeps this module out of the runtime's command path.
POLL_SECONDS = 1.0


@runtime_checkable
class DrainableCore(Protocol):
    def drain(self, alternate: TransportAddr | None = None) -> None: ...


class Drainer:
    """One drain per process: `start()` begins it, `done` is set when it is over."""

    def __init__(
        self, server: RelayServer, *, alternate: TransportAddr | None, timeout: float
    ) -> None:
        self.server = server
        self.alternate = alternate
        self.timeout = timeout
        self.done = asyncio.Event()
        self.reason: str | None = None
        self._deadline: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def remaining(self) -> float | None:
        """Seconds until the drain timeout, or None when not draining."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def start(self, reason: str) -> bool:
        """Begin draining (False if already draining)."""
        if self._deadline is not None:
            return False
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.timeout
        self.reason = reason
        core = self.server.core
        if isinstance(core, DrainableCore):
            core.drain(self.alternate)
        else:  # a test double without drain(): it still stops when the drain ends
            log.warning("core cannot drain; it keeps accepting allocations")
        log.info(
            "draining",
            extra={
                "reason": reason,
                "allocations": len(self.server.allocations()),
                "timeout": self.timeout,
                "alternate_server": str(self.alternate) if self.alternate else None,
            },
        )
        self._task = loop.create_task(self._wait())
        return True

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._deadline is not None
        while (left := self._deadline - loop.time()) > 0 and self.server.allocations():
            await asyncio.sleep(min(POLL_SECONDS, left))
        remaining = len(self.server.allocations())
        log.info(
            "drained" if remaining == 0 else "drain timeout",
            extra={"allocations": remaining},
        )
        self.done.set()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def serve_until_stopped(config: ServeConfig, server: RelayServer) -> None:
    """Start `server` (and the --metrics listener), run until SIGINT or the end of a drain,
    then stop."""
    from xdpturn.server.metrics import OpsServer

    loop = asyncio.get_running_loop()
    drainer = Drainer(server, alternate=config.alternate_server, timeout=config.drain_timeout)
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        # SIGTERM before the relay runs (nothing to drain) stops, as SIGINT always does.
        if sig is signal.SIGTERM and server.running:
            drainer.start(sig.name)
        else:
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    ops: OpsServer | None = None
    try:
        await server.start()
        if config.metrics is not None:
            ops = OpsServer(server, drainer, config.metrics)
            await ops.start()
        waiters = [loop.create_task(stop.wait()), loop.create_task(drainer.done.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        log.info(
            "stopping",
            extra={
                "signal": received[0] if received else None,
                "drained": drainer.done.is_set(),
                "allocations": len(server.allocations()),
            },
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        drainer.cancel()
        if ops is not None:
            await ops.stop()
        await server.stop()


__all__ = ["DrainableCore", "Drainer", "serve_until_stopped"]
