"""What the Python path reads from its listening sockets: a rate per source and a relay-wide one.

Once every UDP client with an allocation reads from its own connected socket (clientsockets), a
listener carries only newcomers (whose only valid messages are STUN) and junk. Reading it costs a
system call and the core's parsing per datagram; a flood would take the whole process and every
allocated client's round trips with it. So the runtime stops reading a listener when the
relay-wide rate is spent (the kernel then drops the overflow of the listener's queue at no cost to
the process, and the loop stays free for the clients' sockets), and it drops, right after reading
and before any parsing, datagrams from a source over its own rate. The same limits as the XDP
program's (--stun-rate-per-source, --stun-rate-total), with the same buckets: GCRA, one second's
worth each; an IPv6 source counts by its /64.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from typing import Any

from xdpturn.fastpath import GuardConfig

# Entries in the per-source table before it is emptied: bounded against spoofed sources.
MAX_SOURCES = 65536


class Schedule:
    """A GCRA bucket of `rate` per second holding one second's worth (at least one datagram);
    rate 0: unlimited."""

    __slots__ = ("booked", "burst", "interval")

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.burst = max(1.0, self.interval)
        self.booked = 0.0

    def take(self, now: float) -> bool:
        if not self.interval:
            return True
        booked = max(self.booked, now) + self.interval
        if booked - now > self.burst:
            return False
        self.booked = booked
        return True

    def wait(self, now: float) -> float:
        """Seconds until `take` succeeds again."""
        return max(0.0, self.booked + self.interval - now - self.burst)


@functools.lru_cache(maxsize=MAX_SOURCES)
def source_key(host: str) -> str:
    """The source a datagram counts against: its IPv4 address, or its IPv6 /64."""
    if ":" not in host:
        return host
    packed = ipaddress.IPv6Address(host.partition("%")[0]).packed
    return packed[:8].hex()


class ListenerBudget:
    def __init__(self, guard: GuardConfig) -> None:
        self.total = Schedule(guard.stun_rate_total)
        self._per_source_interval = (
            1.0 / guard.stun_rate_per_source if guard.stun_rate_per_source else 0.0
        )
        self._per_source_burst = max(1.0, self._per_source_interval)
        self._sources: dict[str, float] = {}
        # Socket addresses (as recvfrom returns them) of UDP clients with an allocation: exempt
        # from the per-source rate, should their datagrams arrive on a listener (their own
        # socket could not be opened).
        self.allocated: Counter[Any] = Counter()

    def exempt(self, sockaddr: Any) -> None:
        self.allocated[sockaddr] += 1

    def unexempt(self, sockaddr: Any) -> None:
        self.allocated[sockaddr] -= 1
        if self.allocated[sockaddr] <= 0:
            del self.allocated[sockaddr]

    def source_allows(self, key: str, now: float) -> bool:
        interval = self._per_source_interval
        if not interval:
            return True
        sources = self._sources
        booked = max(sources.get(key, 0.0), now) + interval
        if booked - now > self._per_source_burst:
            return False
        if len(sources) >= MAX_SOURCES and key not in sources:
            sources.clear()
        sources[key] = booked
        return True
