"""What operators see of the relay's traffic, shared by /metrics and /status.

`AllocationTraffic` counts, per allocation, the bytes the Python path sends for it (to peers from
its relay port, to its client). The runtime tells it when allocations open and close and updates
`to_peers`/`to_client` itself for each datagram it sends: one dictionary update, and nothing on
the XDP path. So "top talkers" is exact for Python-relayed traffic and blind to what the kernel
relays (its counters are per route, not per allocation).

The names operators see for the core's counters (`CoreStats`) are made here, once: method
names, error codes, drop reasons and routes as Prometheus labels and /status keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import ClientFlow, Family
from xdpturn.proto.server import AllocationInfo
from xdpturn.proto.stats import CoreStats
from xdpturn.proto.stun import Method


class AllocationTraffic:
    """Bytes sent by the Python path per allocation, from AllocationOpened to AllocationClosed.

    Only open allocations have entries, so clients that never allocate (Binding requests,
    failed authentication) leave nothing behind.
    """

    def __init__(self) -> None:
        self.to_peers: dict[int, int] = {}  # by relay port
        self.to_client: dict[ClientFlow, int] = {}  # includes TURN framing and responses

    def opened(self, flow: ClientFlow, relay_port: int) -> None:
        self.to_peers[relay_port] = 0
        self.to_client[flow] = 0

    def closed(self, flow: ClientFlow, relay_port: int) -> None:
        self.to_peers.pop(relay_port, None)
        self.to_client.pop(flow, None)

    def bytes_of(self, flow: ClientFlow, relay_port: int) -> int:
        return self.to_peers.get(relay_port, 0) + self.to_client.get(flow, 0)


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
