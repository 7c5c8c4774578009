"""What the server knows of the fast path: its settings, its counters and the `FastPath` protocol
(`NullFastPath` when it is off). The XDP implementation is `xdp.py`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from xdpturn.proto.addr import ClientFlow, IPAddress
from xdpturn.proto.commands import ChannelRoute
from xdpturn.proto.meter import DEFAULT_BURST_SECONDS, AllocationTraffic


class FastPathMode(Enum):
    AUTO = "auto"  # native XDP where the driver allows, else generic
    XDP = "xdp"  # native only
    GENERIC = "generic"  # generic (skb) mode only
    OFF = "off"


@dataclass(frozen=True)
class GuardConfig:
    """What the relay drops before parsing (docs/security.md). `stun_rate_per_source`: datagrams
    per second from one source address (an IPv6 source counts by its /64) without an
    allocation; `stun_rate_total`: the same from all such sources together. The XDP program
    applies them to STUN on the TURN port, the Python path to what it reads from its listening
    sockets (which only such sources reach). Each bucket holds one second's worth; 0 turns a
    limit off. `enabled` False turns the XDP program's drops off (it then passes what it cannot
    relay, as before the guard); the rates still apply."""

    enabled: bool = True
    stun_rate_per_source: float = 200
    stun_rate_total: float = 5000


@dataclass
class FastPathConfig:
    mode: FastPathMode
    interfaces: list[str]
    turn_port: int = 3478
    # What clients are told; a packet to one of these is a packet to the relay itself.
    public_ipv4: ipaddress.IPv4Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    # Source addresses for packets the program sends (the interface addresses; they differ from
    # the public ones behind 1:1 NAT). None: taken from the interface.
    local_ipv4: ipaddress.IPv4Address | None = None
    local_ipv6: ipaddress.IPv6Address | None = None
    # What the program drops and rate-limits (see GuardConfig).
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Where the program and maps are pinned over a restart (with --state-dir), else None.
    pin_dir: Path | None = None
    object_path: Path | None = None  # None: the object installed with xdpturn
    # --max-bps-per-allocation (bits of payload per second, each direction; None: no limit) and
    # its burst, as the core has them (ServerConfig), so both paths enforce the same schedule.
    allocation_rate_bps: int | None = None
    allocation_burst: float = DEFAULT_BURST_SECONDS


@dataclass
class FastPathCounters:
    """Totals over all CPUs: per route name (e.g. "ipv4_channel_to_ipv6_udp"), packets and bytes;
    per pass reason (e.g. "not_turn", "no_channel", "fragment"), packets; per drop reason (what
    can never be valid, or over a rate limit: e.g. "unknown_client", "stun_rate_source"),
    packets."""

    routes: dict[str, tuple[int, int]] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)


class FastPath(Protocol):
    @property
    def mode(self) -> str:
        """One of "native", "generic" or "off"."""

    def install(self, route: ChannelRoute) -> None:
        """Add both directions of a channel. Failure is logged, never raised."""

    def remove(self, route: ChannelRoute) -> None: ...

    def allocation_opened(self, flow: ClientFlow, relay_port: int) -> None:
        """The kernel learns an allocation: its port (peers without a permission there are
        dropped) and, for a UDP client, the client's address (its ChannelData and STUN are let
        through unlimited)."""

    def allocation_closed(self, flow: ClientFlow, relay_port: int) -> None: ...

    def permit(self, relay_port: int, peer: IPAddress) -> None:
        """`peer` may send to `relay_port` (AddPermission)."""

    def unpermit(self, relay_port: int, peer: IPAddress) -> None: ...

    def counters(self) -> FastPathCounters: ...

    def problem(self) -> str | None:
        """Why the kernel is not carrying bound channels although attached; None when it is (or
        has none to carry, or is off: `mode` says that)."""

    def settle(self) -> None:
        """After adopting a previous process's maps and restoring the core: remove what the maps
        hold beyond the routes installed since."""

    def keep_for_restart(self) -> dict[str, Any] | None:
        """Stop, leaving the program attached and its maps pinned for the next process; what
        that process needs to adopt them (None: nothing to adopt)."""

    def open_allocation(self, relay_port: int) -> None:
        """Start metering (and limiting) the allocation on `relay_port` from zero, or go on with
        the meter it already has in the kernel (maps adopted across a restart). Failure is
        logged, never raised: the allocation is then relayed but not counted in the kernel."""

    def close_allocation(self, relay_port: int) -> AllocationTraffic:
        """What the kernel relayed for the allocation; its meter and schedule are deleted."""

    def allocation_traffic(self) -> dict[int, AllocationTraffic]:
        """What the kernel relayed for each open allocation, by relay port."""

    def close(self) -> None:
        """Detach the program and free its maps."""


class NullFastPath:
    """No kernel fast path: Python relays everything."""

    @property
    def mode(self) -> str:
        return "off"

    def install(self, route: ChannelRoute) -> None:
        pass

    def remove(self, route: ChannelRoute) -> None:
        pass

    def allocation_opened(self, flow: ClientFlow, relay_port: int) -> None:
        pass

    def allocation_closed(self, flow: ClientFlow, relay_port: int) -> None:
        pass

    def permit(self, relay_port: int, peer: IPAddress) -> None:
        pass

    def unpermit(self, relay_port: int, peer: IPAddress) -> None:
        pass

    def counters(self) -> FastPathCounters:
        return FastPathCounters()

    def problem(self) -> str | None:
        return None

    def settle(self) -> None:
        pass

    def keep_for_restart(self) -> dict[str, Any] | None:
        return None

    def open_allocation(self, relay_port: int) -> None:
        pass

    def close_allocation(self, relay_port: int) -> AllocationTraffic:
        return AllocationTraffic()

    def allocation_traffic(self) -> dict[int, AllocationTraffic]:
        return {}

    def close(self) -> None:
        pass


__all__ = [
    "FastPath",
    "FastPathConfig",
    "FastPathCounters",
    "FastPathMode",
    "GuardConfig",
    "NullFastPath",
]
