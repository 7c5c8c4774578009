"""Draining a relay: new Allocates are turned away, existing allocations keep relaying.

SIGTERM (what systemd, Docker and Kubernetes send first) or POST /drain starts a drain: the core
answers new Allocates with 300 Try Alternate (--alternate-server) or 508, and `Drainer.done` is
set once the allocations are all gone or --drain-timeout has passed (xdpturn.server.lifecycle then
stops the relay).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from xdpturn.proto.addr import TransportAddr

if TYPE_CHECKING:
    from collections import Counter

    from xdpturn.config import ServeConfig
    from xdpturn.fastpath import FastPath
    from xdpturn.proto.server import AllocationInfo
    from xdpturn.proto.stats import CoreStats
    from xdpturn.server.metering import MeteredAllocation, Metering
    from xdpturn.server.traffic import ReceiveQueueDrops

log = logging.getLogger("xdpturn.server")

# How often a drain looks whether the last allocation is gone. Allocations end on the core's own
# timer; polling keeps this module out of the runtime's command path.
POLL_SECONDS = 1.0


@runtime_checkable
class DrainableCore(Protocol):
    def drain(self, alternate: TransportAddr | None = None) -> None: ...


class CoreView(Protocol):
    @property
    def stats(self) -> CoreStats: ...


class RelayView(Protocol):
    """What draining, /status and /metrics read of a relay: a `RelayServer`, or the sum over
    the workers of one (server.workers.WorkerPool)."""

    config: ServeConfig
    stats: Counter[str]  # the runtime's own

    @property
    def running(self) -> bool: ...
    @property
    def fastpath(self) -> FastPath: ...
    @property
    def core(self) -> CoreView: ...

    metering: Metering
    throughput_bps: float | None  # with --max-bps: the relayed rate last measured

    @property
    def listen_addresses(self) -> list[TransportAddr]: ...
    @property
    def relay_port_count(self) -> int: ...
    def receive_queue_drops(self) -> ReceiveQueueDrops: ...
    def allocations(self) -> list[AllocationInfo]: ...
    def metered_allocations(self) -> list[MeteredAllocation]: ...
    def now(self) -> float: ...


class Drainer:
    """One drain per process: `start()` begins it, `done` is set when it is over."""

    def __init__(
        self, server: RelayView, *, alternate: TransportAddr | None, timeout: float
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


__all__ = ["DrainableCore", "Drainer", "RelayView"]
