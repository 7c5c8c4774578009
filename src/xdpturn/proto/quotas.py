"""Allocation quotas (in total, per username, per client IP), counted by an injected ledger.

The core asks `acquire` before it allocates and calls `release` when the allocation goes. One
process counts with `LocalQuotas`; several workers share one count (server.workers asks the
supervisor, which keeps a `LocalQuotas` for all of them), because a client's 5-tuples may land on
different workers.
"""

from __future__ import annotations

from collections import Counter
from enum import Enum
from typing import Protocol

from xdpturn.proto.addr import IPAddress


class QuotaRefusal(Enum):
    """Which limit an Allocate would exceed."""

    TOTAL = "total"  # --max-allocations: 508
    USER = "user"  # --max-allocations-per-user: 486
    IP = "ip"  # --max-allocations-per-ip: 486


class Quotas(Protocol):
    def acquire(self, username: str, ip: IPAddress) -> QuotaRefusal | None:
        """Count one more allocation of `username` from `ip`, or say which limit refuses it
        (then nothing is counted)."""

    def release(self, username: str, ip: IPAddress) -> None:
        """An allocation counted by `acquire` is gone."""


class LocalQuotas:
    """The counts of one process. Limits of None are not checked."""

    def __init__(
        self, total: int | None = None, per_user: int | None = None, per_ip: int | None = None
    ) -> None:
        self.total_limit = total
        self.per_user_limit = per_user
        self.per_ip_limit = per_ip
        self.total = 0
        self.per_user: Counter[str] = Counter()
        self.per_ip: Counter[IPAddress] = Counter()

    @property
    def limited(self) -> bool:
        return (self.total_limit, self.per_user_limit, self.per_ip_limit) != (None, None, None)

    def acquire(self, username: str, ip: IPAddress) -> QuotaRefusal | None:
        if self.total_limit is not None and self.total >= self.total_limit:
            return QuotaRefusal.TOTAL
        if self.per_user_limit is not None and self.per_user[username] >= self.per_user_limit:
            return QuotaRefusal.USER
        if self.per_ip_limit is not None and self.per_ip[ip] >= self.per_ip_limit:
            return QuotaRefusal.IP
        self.total += 1
        self.per_user[username] += 1
        self.per_ip[ip] += 1
        return None

    def release(self, username: str, ip: IPAddress) -> None:
        self.total = max(0, self.total - 1)
        self.per_user[username] -= 1
        if self.per_user[username] <= 0:
            del self.per_user[username]
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


__all__ = ["LocalQuotas", "QuotaRefusal", "Quotas"]
