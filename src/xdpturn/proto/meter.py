"""Traffic per allocation and direction, and the per-allocation rate limit (sans-IO).

The XDP program (fastpath/bpf/meter.h) keeps the same counters and runs the same schedule for
what it relays; the core does it here for what Python relays, so both paths agree. Bytes are
payload bytes: what the peer sends or receives, without IP, UDP or ChannelData headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How far ahead of its rate an allocation may send at once: a burst of this many seconds' worth.
# The kernel gets the same value (FastPathConfig.allocation_burst).
DEFAULT_BURST_SECONDS = 0.25


@dataclass(slots=True)
class DirectionTraffic:
    """One direction of one allocation: relayed, and refused by the rate limit."""

    packets: int = 0
    bytes: int = 0
    dropped_packets: int = 0
    dropped_bytes: int = 0

    def add(self, other: DirectionTraffic) -> None:
        self.packets += other.packets
        self.bytes += other.bytes
        self.dropped_packets += other.dropped_packets
        self.dropped_bytes += other.dropped_bytes


@dataclass(slots=True)
class AllocationTraffic:
    """Both directions of one allocation (or of several, summed)."""

    client_to_peer: DirectionTraffic = field(default_factory=DirectionTraffic)
    peer_to_client: DirectionTraffic = field(default_factory=DirectionTraffic)

    def add(self, other: AllocationTraffic) -> None:
        self.client_to_peer.add(other.client_to_peer)
        self.peer_to_client.add(other.peer_to_client)

    def copy(self) -> AllocationTraffic:
        total = AllocationTraffic()
        total.add(self)
        return total

    @property
    def bytes(self) -> int:
        """Relayed payload bytes, both directions."""
        return self.client_to_peer.bytes + self.peer_to_client.bytes

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "packets": d.packets,
                "bytes": d.bytes,
                "dropped_packets": d.dropped_packets,
                "dropped_bytes": d.dropped_bytes,
            }
            for name, d in (
                ("client_to_peer", self.client_to_peer),
                ("peer_to_client", self.peer_to_client),
            )
        }


DIRECTIONS = ("client_to_peer", "peer_to_client")


class RateSchedule:
    """A GCRA schedule of `rate_bps` bits per second with bursts of `burst` seconds' worth.

    `admit(nbytes, now)` books the datagram and returns True, or returns False (nothing booked)
    when it would put the schedule more than `burst` ahead of `now`: a token bucket of
    rate_bps * burst bits refilled at rate_bps, kept as one number. The arithmetic is the XDP
    program's (meter.h, meter_take), in whole nanoseconds, so both paths admit the same datagrams.
    """

    __slots__ = ("_booked_ns", "burst_ns", "rate_bps")

    def __init__(self, rate_bps: int, burst: float = DEFAULT_BURST_SECONDS) -> None:
        if rate_bps <= 0 or burst < 0:
            raise ValueError("rate_bps must be positive and burst not negative")
        self.rate_bps = rate_bps
        self.burst_ns = round(burst * 1e9)
        self._booked_ns = 0

    def admit(self, nbytes: int, now: float) -> bool:
        now_ns = int(now * 1e9)
        booked = max(self._booked_ns, now_ns)
        self._booked_ns = booked
        cost = nbytes * 8 * 1_000_000_000 // self.rate_bps
        if booked + cost > now_ns + self.burst_ns:
            return False
        self._booked_ns = booked + cost
        return True
