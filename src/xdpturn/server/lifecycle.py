"""The process life cycle of `xdpturn serve`: start a relay, run it until told to stop, stop it.

SIGINT stops at once, also during a drain (with --state-dir, for a restart: the kernel path and
the state are kept for the next process, xdpturn.server.restart); SIGTERM drains first
(xdpturn.server.drain); SIGHUP re-reads the TLS certificate. With --metrics, the operations
listener (xdpturn.server.metrics) runs beside the relay. Stopping closes every allocation and
detaches the fast path (RelayServer.stop).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from xdpturn.config import ServeConfig
from xdpturn.server.drain import Drainer
from xdpturn.server.metrics import OpsServer
from xdpturn.server.relay import RelayServer, StartError

log = logging.getLogger("xdpturn.server")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def serve(config: ServeConfig, server: RelayServer | None = None) -> None:
    """Start `server` (by default a RelayServer of `config`) and the --metrics listener when
    configured, run until SIGINT (stop now) or the end of a drain (SIGTERM, POST /drain), then
    stop."""
    server = server if server is not None else RelayServer(config)
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
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)  # new TLS certificate
    # A worker starts with them blocked (server.workers): one that came meanwhile is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
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
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
        drainer.cancel()
        if ops is not None:
            await ops.stop()
        # With --state-dir, SIGINT is a stop for a restart: the kernel path stays.
        await server.stop(for_restart=config.state_dir is not None and "SIGINT" in received)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's when it is installed (about twice the datagram rate), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(config: ServeConfig) -> int:
    """Blocking entry point for one relay process; raises StartError if it cannot start, else
    returns the exit status. More than one worker: xdpturn.server.workers.run_workers, which
    runs `serve` in each worker."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(config))
    return 0


__all__ = ["HANDLED_SIGNALS", "StartError", "event_loop_factory", "run", "serve"]
