"""Which port an allocation gets: numbers only, no sockets (the runtime opens those)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from xdpturn.proto.addr import Family


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 0xFFFF:
            raise ValueError(f"bad port range {self.low}-{self.high}")

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


class PortChooser:
    """The core's `RelayPorts`: ports of `ports` not handed out yet. Each search starts at a
    random candidate (RFC 8656 section 7.2 recommends unpredictable relay ports) and walks the
    candidates once."""

    def __init__(self, ports: PortRange, rng: random.Random) -> None:
        self._ports = ports
        self._rng = rng
        self._taken: set[int] = set()

    def acquire(
        self, families: frozenset[Family], *, even: bool = False, pair: bool = False
    ) -> int | None:
        # Candidates: every port of the range, or its even ones (whose N + 1 is in the range
        # too, for a pair).
        step = 2 if even or pair else 1
        low = self._ports.low + (self._ports.low % 2 if step == 2 else 0)
        high = self._ports.high - 1 if pair else self._ports.high
        count = (high - low) // step + 1 if high >= low else 0
        if count == 0:
            return None
        start = self._rng.randrange(count)
        for i in range(count):
            port = low + (start + i) % count * step
            wanted = (port, port + 1) if pair else (port,)
            if not self._taken.intersection(wanted):
                self._taken.update(wanted)
                return port
        return None

    def release(self, port: int) -> None:
        self._taken.discard(port)

    def claim(self, port: int, families: frozenset[Family]) -> bool:
        """Take `port` itself (an allocation carried over from the previous process); False
        when it is outside the range or handed out already."""
        if port not in self._ports or port in self._taken:
            return False
        self._taken.add(port)
        return True


__all__ = ["PortChooser", "PortRange"]
