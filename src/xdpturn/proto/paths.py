"""Bound channels as the core hands them to a runtime that relays them without it (sans-IO).

The Python path's per-datagram cost is mostly the generic machinery around a few checks: the
core's lookups keyed by address objects, a command per datagram, the runtime's dispatch and
timer. For the bulk of the traffic, ChannelData on a bound channel over UDP and its peer's
datagrams back, the runtime instead keeps a `ChannelPath` per (client, channel) and per (relay
port, peer) and relays with one call to `ChannelPath.relay`.

The core stays the truth. It hands a path out only for a datagram it would relay itself at that
moment, with `until`: the first instant its allocation, channel or permission expires. It
revokes every path of an allocation (sets `until` to minus infinity) whenever anything about the
allocation changes (a Refresh, a permission or channel installed or swept, the allocation
deleted), so a runtime that checks `now < path.until` before each datagram relays exactly the
datagrams the core would; past `until` or once revoked it asks the core again. `relay` meters
the datagram on the core's own counters and applies the allocation's rate limit, as the core's
own relaying does.
"""

from __future__ import annotations

from collections import Counter

from xdpturn.proto.addr import ClientFlow, PeerAddr
from xdpturn.proto.meter import DirectionTraffic, RateSchedule
from xdpturn.proto.stats import Drop, Traffic

REVOKED = float("-inf")


class ChannelPath:
    """One direction of one bound channel: `flow`'s ChannelData on `channel` <-> UDP between
    allocation port `relay_port` and `peer`."""

    __slots__ = (
        "_counts",
        "_drops",
        "_limit",
        "_relayed",
        "channel",
        "flow",
        "peer",
        "relay_port",
        "until",
    )

    def __init__(
        self,
        flow: ClientFlow,
        channel: int,
        relay_port: int,
        peer: PeerAddr,
        until: float,
        counts: DirectionTraffic,
        relayed: Traffic,
        limit: RateSchedule | None,
        drops: Counter[Drop],
    ) -> None:
        self.flow = flow
        self.channel = channel
        self.relay_port = relay_port
        self.peer = peer
        self.until = until
        self._counts = counts  # the allocation's, in this direction
        self._relayed = relayed  # the core's, on this route
        self._limit = limit  # the allocation's --max-bps-per-allocation schedule
        self._drops = drops  # the core's

    def relay(self, nbytes: int, now: float) -> bool:
        """Meter a datagram of `nbytes` payload bytes at `now` (before `until`): True to send
        it; False when the allocation's rate limit refuses it (counted as the core counts it)."""
        counts = self._counts
        limit = self._limit
        if limit is not None and not limit.admit(nbytes, now):
            counts.dropped_packets += 1
            counts.dropped_bytes += nbytes
            self._drops[Drop.ALLOCATION_RATE] += 1
            return False
        counts.packets += 1
        counts.bytes += nbytes
        relayed = self._relayed
        relayed.packets += 1
        relayed.bytes += nbytes
        return True

    def revoke(self) -> None:
        self.until = REVOKED


__all__ = ["REVOKED", "ChannelPath"]
