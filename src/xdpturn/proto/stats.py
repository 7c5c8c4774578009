"""What the core counts, typed: the runtime reads these for /metrics and /status
(xdpturn.server.traffic turns them into the names operators see)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum


class Drop(Enum):
    """Why a datagram was dropped, counted in `CoreStats.drops`."""

    NOT_TURN = "not_turn"  # neither STUN nor ChannelData
    MALFORMED_STUN = "malformed_stun"
    MALFORMED_CHANNEL_DATA = "malformed_channel_data"
    UNEXPECTED_MESSAGE = "unexpected_message"  # a response or unknown indication from a client
    NO_ALLOCATION = "no_allocation"
    NO_CHANNEL = "no_channel"
    NO_PERMISSION = "no_permission"
    BAD_INDICATION = "bad_indication"
    FAMILY_MISMATCH = "family_mismatch"
    SELF_NOT_ALLOCATION = "self_not_allocation"  # to the relay's own address, not a live port
    PEER_DENIED = "peer_denied"  # a Send indication to a peer the policy refuses
    # An answer to an unauthenticated request (challenge, Binding) over the per-source limit.
    UNAUTHENTICATED_RATE = "unauthenticated_rate"
    # Over the allocation's rate limit (--max-bps-per-allocation), as the XDP program drops it.
    ALLOCATION_RATE = "allocation_rate"


class Route(Enum):
    """How the core relays a datagram; each is counted under exactly one."""

    CLIENT_TO_PEER = "client_to_peer"
    PEER_TO_CLIENT = "peer_to_client"
    LOOPBACK = "loopback"  # from one allocation to another of this relay (packets to itself)


@dataclass(slots=True)
class Traffic:
    """Datagrams and bytes of application data relayed on one route."""

    packets: int = 0
    bytes: int = 0


@dataclass(slots=True)
class CoreStats:
    """`TurnServer.stats`. Methods are STUN method numbers (a `stun.Method` when known)."""

    requests: Counter[int] = field(default_factory=Counter)
    errors: Counter[tuple[int, int]] = field(default_factory=Counter)  # (method, error code)
    auth_failures: int = 0
    drops: Counter[Drop] = field(default_factory=Counter)
    relayed: dict[Route, Traffic] = field(default_factory=lambda: {r: Traffic() for r in Route})


__all__ = ["CoreStats", "Drop", "Route", "Traffic"]
