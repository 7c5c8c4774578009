"""Traffic per allocation and per user, from both paths: what operators read and what --max-bps
is measured against.

Each allocation's traffic is the sum of what Python relayed (the core's `AllocationInfo.traffic`)
and what the XDP program relayed (`FastPath.allocation_traffic()`, per-CPU counters read here, at
a scrape or a /status request, never per packet). A closed allocation's totals are logged and
added to its user's (for a REST credential, the id after the expiry), so per-user totals survive
the allocations they came from. Prometheus gets
per-user totals for the `TOP_USERS` users with the most bytes and one "(other)" row for the rest,
so a relay with many users does not make as many series.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdpturn.fastpath import FastPath
from xdpturn.proto.auth import rest_expiry
from xdpturn.proto.meter import AllocationTraffic
from xdpturn.proto.server import AllocationInfo

TOP_USERS = 10
OTHER_USERS = "(other)"  # not a valid TURN username in practice: parentheses need quoting


def user_of(username: str) -> str:
    """Whom an allocation's traffic counts for: a TURN REST username `<expiry>:<id>` for `<id>`
    (each credential a user is issued has a new expiry), any other username as it is."""
    if ":" in username and rest_expiry(username) is not None:
        return username.split(":", 1)[1]
    return username


@dataclass(frozen=True)
class MeteredAllocation:
    info: AllocationInfo
    traffic: AllocationTraffic  # both paths


class Metering:
    """Per-user totals of closed allocations, and the live view of open ones."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}  # relay port -> username, while open
        self._closed: dict[
            str, AllocationTraffic
        ] = {}  # username -> totals of its closed allocations
        self._closed_bytes = 0  # all closed allocations, both paths: for the relay's rate

    def opened(self, relay_port: int, username: str, fastpath: FastPath) -> None:
        self._users[relay_port] = user_of(username)
        fastpath.open_allocation(relay_port)

    def closed(
        self, relay_port: int, python: AllocationTraffic, fastpath: FastPath
    ) -> AllocationTraffic:
        """The allocation's totals, both paths; its meter in the kernel is deleted."""
        total = fastpath.close_allocation(relay_port)
        total.add(python)
        username = self._users.pop(relay_port, "")
        self._closed.setdefault(username, AllocationTraffic()).add(total)
        self._closed_bytes += total.bytes
        return total

    def closed_totals(self) -> tuple[dict[str, AllocationTraffic], int]:
        """Per-user totals of closed allocations and their bytes, for a supervisor to add up."""
        return {user: t.copy() for user, t in self._closed.items()}, self._closed_bytes

    def add_closed(self, users: dict[str, AllocationTraffic], nbytes: int) -> None:
        """Count another worker's closed allocations (see closed_totals) as this one's."""
        for user, traffic in users.items():
            self._closed.setdefault(user, AllocationTraffic()).add(traffic)
        self._closed_bytes += nbytes

    def allocations(
        self, allocations: list[AllocationInfo], fastpath: FastPath
    ) -> list[MeteredAllocation]:
        kernel = fastpath.allocation_traffic()
        out = []
        for info in allocations:
            traffic = info.traffic.copy()
            in_kernel = kernel.get(info.relay_port)
            if in_kernel is not None:
                traffic.add(in_kernel)
            out.append(MeteredAllocation(info, traffic))
        return out

    def total_bytes(self, metered: list[MeteredAllocation]) -> int:
        """Payload bytes relayed since the start, over every allocation and direction."""
        return self._closed_bytes + sum(m.traffic.bytes for m in metered)

    def by_user(
        self, metered: list[MeteredAllocation], top: int = TOP_USERS
    ) -> dict[str, AllocationTraffic]:
        """The `top` users by bytes (open and closed allocations), and OTHER_USERS for the rest
        when there are any."""
        users: dict[str, AllocationTraffic] = {name: t.copy() for name, t in self._closed.items()}
        for m in metered:
            users.setdefault(user_of(m.info.username), AllocationTraffic()).add(m.traffic)
        ranked = sorted(users.items(), key=lambda kv: (-kv[1].bytes, kv[0]))
        out = dict(ranked[:top])
        if len(ranked) > top:
            other = out.setdefault(OTHER_USERS, AllocationTraffic())
            for _, traffic in ranked[top:]:
                other.add(traffic)
        return out
