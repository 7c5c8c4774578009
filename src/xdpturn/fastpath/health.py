"""Is the kernel carrying bound channels? Judged from the program's own counters.

The program being attached says little: with no next hop, no route or no configuration it passes
every packet of every bound channel to Python, which relays them correctly but at a fraction of
the speed. `CarryingCheck` compares the counters between two looks: packets relayed by the kernel
mean it works; packets of bound channels passed for a reason that means "the fast path cannot work
at all" and none relayed mean it does not, and why, with the fix, is logged once.
"""

from __future__ import annotations

import logging
import threading

from xdpturn.fastpath.api import FastPathCounters

log = logging.getLogger("xdpturn.fastpath")

# Pass reasons that, when the kernel relays nothing else, mean the fast path is not working at all;
# each with what the operator can do about it.
BROKEN: dict[str, str] = {
    "no_config": "the program has no configuration; restart xdpturn (the loader writes it first)",
    "no_next_hop": (
        "no next hop is known for the clients and peers; xdpturn reads them from the kernel's "
        "routes and neighbours: check `ip route get ADDRESS` and `ip neigh`, and the log for the "
        "next-hop watcher"
    ),
    "no_neighbour": "no neighbour (ARP/NDP) entry for the next hop: check `ip neigh`",
    "fib_failed": "no usable route to the clients and peers: check `ip route get ADDRESS`",
}
# Packets that must have failed with no success in between before the fast path is called broken:
# a few are normal while a new neighbour resolves.
MIN_EVIDENCE = 20


def _relayed(c: FastPathCounters) -> int:
    return sum(packets for packets, _ in c.routes.values())


class CarryingCheck:
    """Thread-safe; `update` is called from scrapes and from a timer."""

    def __init__(self, min_evidence: int = MIN_EVIDENCE) -> None:
        self._min = min_evidence
        self._lock = threading.Lock()
        self._base: FastPathCounters | None = None
        self._problem: str | None = None
        self._logged: set[str] = set()

    def update(self, now: FastPathCounters, routes: int) -> str | None:
        """The problem, or None while the kernel carries bound channels (or has none to carry)."""
        with self._lock:
            base = self._base
            if base is None or routes == 0:
                self._base = now
                self._problem = None
                return None
            failed = {r: now.passes.get(r, 0) - base.passes.get(r, 0) for r in BROKEN}
            if _relayed(now) > _relayed(base):
                if self._problem is not None:
                    log.info("fast path: the kernel relays bound channels again")
                self._base, self._problem = now, None
            elif sum(failed.values()) >= self._min or failed["no_config"] > 0:
                reason = max(failed, key=lambda r: failed[r])
                self._problem = (
                    f"the kernel relayed nothing while {failed[reason]} packets of bound channels "
                    f"passed to Python as {reason}"
                )
                if reason not in self._logged:
                    self._logged.add(reason)
                    log.warning(
                        "fast path not carrying: %s; fix: %s", self._problem, BROKEN[reason]
                    )
                self._base = now
            return self._problem
