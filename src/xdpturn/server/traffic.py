"""What operators see of the relay's traffic, shared by /metrics and /status.

`AllocationTraffic` counts, per allocation, the bytes the Python path sends for it (to peers from
its relay port, to its client). The runtime feeds it the commands that open and close allocations
and updates `to_peers`/`to_client` itself for each datagram it sends (what `count` would do, minus
a call and an isinstance chain per datagram): one dictionary update, and nothing on the XDP path.
So "top talkers" is exact for Python-relayed traffic and blind to what the kernel relays (its
counters are per route, not per allocation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from xdpturn.fastpath import FastPathCounters
from xdpturn.proto.addr import ClientFlow, Family
from xdpturn.proto.commands import (
    AllocationClosed,
    AllocationOpened,
    Command,
    SendToClient,
    SendToPeer,
)

# The core's "relayed:<route>:packets|bytes" routes, in display order.
PYTHON_ROUTES = ("client_to_peer", "peer_to_client", "loopback")


class AllocationTraffic:
    """Bytes sent by the Python path per allocation, from AllocationOpened to AllocationClosed.

    Only open allocations have entries, so clients that never allocate (Binding requests,
    failed authentication) leave nothing behind.
    """

    def __init__(self) -> None:
        self.to_peers: dict[int, int] = {}  # by relay port
        self.to_client: dict[ClientFlow, int] = {}  # includes TURN framing and responses

    def count(self, command: Command) -> None:
        if isinstance(command, SendToPeer):
            port = command.relay_port
            if port in self.to_peers:
                self.to_peers[port] += len(command.data)
        elif isinstance(command, SendToClient):
            flow = command.flow
            if flow in self.to_client:
                self.to_client[flow] += len(command.data)
        elif isinstance(command, AllocationOpened):
            self.to_peers[command.relay_port] = 0
            self.to_client[command.flow] = 0
        elif isinstance(command, AllocationClosed):
            self.to_peers.pop(command.relay_port, None)
            self.to_client.pop(command.flow, None)

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


def relayed_rows(core_stats: Mapping[str, int], fastpath: FastPathCounters) -> list[Relayed]:
    rows = [
        Relayed(
            "python",
            route,
            core_stats.get(f"relayed:{route}:packets", 0),
            core_stats.get(f"relayed:{route}:bytes", 0),
        )
        for route in PYTHON_ROUTES
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


def prefixed(stats: Mapping[str, int], prefix: str) -> dict[str, int]:
    """{rest: value} for the keys "<prefix><rest>" of a stats Counter."""
    return {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}
