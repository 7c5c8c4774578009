"""Token buckets keyed by source, in bounded memory.

Used to cap what the relay answers without authenticating (401/438/400 challenges, Binding
responses): over UDP a source address can be forged, and each answer is larger than the request
that caused it, so unbounded answers would make the relay a reflector.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)


class SourceBuckets(Generic[_K]):
    """`burst` tokens per source, refilled at `rate` per second; `take` spends one.

    At most `max_sources` buckets are kept. When full, buckets that have refilled completely
    are forgotten first (a new one starts full, so nothing changes for them); if that frees too
    little, the oldest are forgotten, which at worst grants those sources a fresh burst.
    A `rate` of 0 or less turns the limit off.
    """

    def __init__(self, rate: float, burst: int, max_sources: int = 65536) -> None:
        if burst < 1 or max_sources < 1:
            raise ValueError("burst and max_sources must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[_K, tuple[float, float]] = {}  # source -> (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: _K, now: float) -> bool:
        if self.rate <= 0:
            return True
        buckets = self._buckets
        entry = buckets.get(source)
        if entry is None:
            if len(buckets) >= self.max_sources:
                self._evict(now)
            buckets[source] = (self.burst - 1.0, now)
            return True
        tokens, when = entry
        tokens = min(float(self.burst), tokens + max(0.0, now - when) * self.rate)
        if tokens < 1.0:
            buckets[source] = (tokens, now)
            return False
        buckets[source] = (tokens - 1.0, now)
        return True

    def _evict(self, now: float) -> None:
        buckets = self._buckets
        full = [
            key
            for key, (tokens, when) in buckets.items()
            if tokens + max(0.0, now - when) * self.rate >= self.burst
        ]
        for key in full:
            del buckets[key]
        # Leave room for a batch of new sources, so a flood of them does not scan every time.
        target = self.max_sources - max(1, self.max_sources // 8)
        excess = len(buckets) - target
        if excess > 0:
            for key in list(itertools.islice(buckets, excess)):  # oldest inserted first
                del buckets[key]
