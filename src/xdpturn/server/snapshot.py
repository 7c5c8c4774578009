"""What an operator sees of a running relay, read at the moment it is asked: readiness and the
`/status` document (shared with /metrics through xdpturn.server.traffic).

"Top allocations" are ranked by the payload bytes relayed for them on both paths (the kernel's
per-allocation meters and Python's, see xdpturn.server.metering), then by channels and
permissions.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from xdpturn import __version__
from xdpturn.fastpath import FastPathCounters, FastPathMode
from xdpturn.server.drain import Drainer, RelayView
from xdpturn.server.metering import MeteredAllocation
from xdpturn.server.relay import allocation_id
from xdpturn.server.traffic import (
    drop_counts,
    error_counts,
    family_label,
    relayed_rows,
    request_counts,
    totals_by_family,
)

log = logging.getLogger("xdpturn.server")

# What FastPath.mode may be for each configured --fastpath.
EXPECTED_MODES: dict[FastPathMode, frozenset[str]] = {
    FastPathMode.AUTO: frozenset({"native", "generic"}),
    FastPathMode.XDP: frozenset({"native"}),
    FastPathMode.GENERIC: frozenset({"generic"}),
    FastPathMode.OFF: frozenset({"off"}),
}


def not_ready(server: RelayView, drainer: Drainer) -> list[str]:
    """Why the relay should not get new clients; empty when it is ready."""
    reasons = []
    if not server.running:
        reasons.append("not listening")
    else:
        mode, configured = server.fastpath.mode, server.config.fastpath
        if mode not in EXPECTED_MODES[configured]:
            reasons.append(f"fast path is {mode}, configured {configured.value}")
        problem = server.fastpath.problem()
        if problem is not None:
            reasons.append(f"fast path not carrying: {problem}")
    if drainer.draining:
        reasons.append("draining")
    return reasons


def fastpath_counters(server: RelayView) -> FastPathCounters:
    try:
        return server.fastpath.counters()
    except Exception:
        # A failed map read must not fail the whole scrape; the Python numbers are still good.
        log.exception("reading fast path counters failed")
        return FastPathCounters()


def status_snapshot(
    server: RelayView,
    drainer: Drainer,
    *,
    started: float,
    top: int = 10,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything `xdpturn status` shows, as JSON-ready values; `started` is when the process
    began serving (for the uptime)."""
    now = time.time() if now is None else now  # wall time, for the display and rates
    reasons = not_ready(server, drainer)
    counters = fastpath_counters(server)
    metered = server.metered_allocations()
    allocations = [m.info for m in metered]
    stats = server.core.stats
    by_family = {f: t.allocations for f, t in totals_by_family(allocations).items()}
    remaining = drainer.remaining()
    return {
        "version": __version__,
        "time": now,
        "uptime_seconds": round(now - started, 3),
        "listen": [str(a) for a in server.listen_addresses],
        "ready": not reasons,
        "not_ready": reasons,
        "draining": drainer.draining,
        "drain_remaining_seconds": None if remaining is None else round(remaining, 3),
        "fastpath": {
            "mode": server.fastpath.mode,
            "configured": server.config.fastpath.value,
            "problem": server.fastpath.problem(),
            "passes": dict(sorted(counters.passes.items())),
            "drops": dict(sorted(counters.drops.items())),
        },
        "allocations": {
            "total": len(allocations),
            "by_family": by_family,
            "permissions": sum(a.permissions for a in allocations),
            "channels": sum(a.channels for a in allocations),
        },
        "max_bps": server.config.max_bps,
        "throughput_bps": server.throughput_bps,
        "relayed": [
            {"path": r.path, "route": r.route, "packets": r.packets, "bytes": r.bytes}
            for r in relayed_rows(stats, counters)
        ],
        "requests": request_counts(stats),
        "errors": {f"{method}:{code}": n for (method, code), n in error_counts(stats).items()},
        "auth_failures": stats.auth_failures,
        "drops": drop_counts(stats),
        "top_by": "bytes",
        "top": _top_allocations(server, metered, top),
    }


def _top_allocations(
    server: RelayView, metered: list[MeteredAllocation], top: int
) -> list[dict[str, Any]]:
    """The `top` allocations by payload bytes on both paths, then channels, then permissions."""

    def talker_key(m: MeteredAllocation) -> tuple[int, int, int]:
        return (m.traffic.bytes, m.info.channels, m.info.permissions)

    ranked = sorted(metered, key=talker_key, reverse=True)[: max(0, top)]
    core_now = server.now()  # allocation expiry is on the core's (monotonic) clock
    return [
        {
            "allocation": allocation_id(a.flow),
            "client": str(a.flow.client),
            "username": a.username,
            "relay_port": a.relay_port,
            "family": family_label(a.families),
            "permissions": a.permissions,
            "channels": a.channels,
            "bytes": m.traffic.bytes,
            "traffic": m.traffic.as_dict(),
            "expires_in": round(a.expires - core_now, 1),
        }
        for m in ranked
        for a in (m.info,)
    ]


__all__ = ["EXPECTED_MODES", "fastpath_counters", "not_ready", "status_snapshot"]
