"""What operators see of the relay's traffic, shared by /metrics and /status.

Traffic per allocation and user, from both paths, is in xdpturn.server.metering.

The names operators see for the core's counters (`CoreStats`) are made here, once: method
names, error codes, drop reasons and routes as Prometheus labels and /status keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import Family
from xdpturn.proto.server import AllocationInfo
from xdpturn.proto.stats import CoreStats
from xdpturn.proto.stun import Method


@dataclass(frozen=True)
class Relayed:
    """One row of relayed traffic: `path` is "python" or "xdp"; `route` the core's route
    (client_to_peer, peer_to_client, loopback) or the XDP program's (e.g.
    ipv4_channel_to_ipv6_udp)."""

    path: str
    route: str
    packets: int
    bytes: int


def relayed_rows(core_stats: CoreStats, fastpath: FastPathCounters) -> list[Relayed]:
    rows = [
        Relayed("python", route.value, counted.packets, counted.bytes)
        for route, counted in core_stats.relayed.items()
    ]
    rows.extend(
        Relayed("xdp", name, packets, nbytes)
        for name, (packets, nbytes) in sorted(fastpath.routes.items())
    )
    return rows


def family_label(families: Iterable[Family]) -> str:
    """ "ipv4", "ipv6" or "dual": each allocation is counted under exactly one label."""
    fams = frozenset(families)
    if len(fams) > 1:
        return "dual"
    return "ipv6" if Family.IPV6 in fams else "ipv4"


FAMILY_LABELS = ("ipv4", "ipv6", "dual")


@dataclass
class FamilyTotals:
    """Active allocations of one family label, with their permissions and channels."""

    allocations: int = 0
    permissions: int = 0
    channels: int = 0


def totals_by_family(allocations: Iterable[AllocationInfo]) -> dict[str, FamilyTotals]:
    """{family label: totals}, every label present."""
    totals = {label: FamilyTotals() for label in FAMILY_LABELS}
    for alloc in allocations:
        total = totals[family_label(alloc.families)]
        total.allocations += 1
        total.permissions += alloc.permissions
        total.channels += alloc.channels
    return totals


@dataclass(frozen=True)
class ReceiveQueueDrops:
    """Datagrams the kernel dropped because a UDP socket's receive queue was full."""

    listener: int = 0  # the TURN listeners
    client: int = 0  # connected sockets of allocated UDP clients, closed ones included
    relay: int = 0  # allocation ports, closed ones included


def receive_queue_drop_counts(drops: ReceiveQueueDrops) -> dict[str, int]:
    """By socket kind ("listener", "client", "relay")."""
    return {"listener": drops.listener, "client": drops.client, "relay": drops.relay}


def method_label(method: int) -> str:
    """ "allocate", or the number for a method the relay does not know ("0x00f")."""
    return method.name.lower() if isinstance(method, Method) else f"0x{method:03x}"


def request_counts(stats: CoreStats) -> dict[str, int]:
    """Requests received, by method name."""
    return {method_label(m): n for m, n in stats.requests.items()}


def error_counts(stats: CoreStats) -> dict[tuple[str, str], int]:
    """Error responses sent, by (method name, error code)."""
    return {(method_label(m), str(code)): n for (m, code), n in stats.errors.items()}


def drop_counts(stats: CoreStats) -> dict[str, int]:
    """Datagrams dropped, by reason."""
    return {reason.value: n for reason, n in stats.drops.items()}
