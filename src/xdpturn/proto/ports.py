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
    random port (RFC 8656 section 7.2 recommends unpredictable relay ports) and walks the range
    once."""

    def __init__(self, ports: PortRange, rng: random.Random) -> None:
        self._ports = ports
        self._rng = rng
        self._taken: set[int] = set()

    def acquire(self, families: frozenset[Family]) -> int | None:
        span = len(self._ports)
        start = self._rng.randrange(span)
        for i in range(span):
            port = self._ports.low + (start + i) % span
            if port not in self._taken:
                self._taken.add(port)
                return port
        return None

    def release(self, port: int) -> None:
        self._taken.discard(port)


__all__ = ["PortChooser", "PortRange"]
