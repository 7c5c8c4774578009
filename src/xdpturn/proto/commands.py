"""What the TURN state machine asks its runtime to do. Each command is a frozen dataclass."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from xdpturn.proto.addr import ClientAddr, ClientFlow, Family, IPAddress, PeerAddr
from xdpturn.proto.meter import AllocationTraffic


@dataclass(frozen=True, slots=True)
class SendToClient:
    """Send `data` (a STUN message or ChannelData) to the client of `flow`."""

    flow: ClientFlow
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToPeer:
    """Send `data` as a UDP datagram from allocation port `relay_port` to `peer`.

    The source address is the relay's address in the peer's family.
    """

    relay_port: int
    peer: PeerAddr
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenRelayPort:
    """Open allocation port `relay_port`: a UDP socket bound to it in each of `families`, its
    datagrams fed to `handle_peer_datagram`. The runtime answers with `handle_relay_port`.
    `dont_fragment`: what it sends leaves with the DF bit set (IPv4) or is never fragmented
    (IPv6), as the client's DONT-FRAGMENT asked (RFC 8656 section 7.2)."""

    relay_port: int
    families: frozenset[Family]
    dont_fragment: bool = False


class PortResult(enum.Enum):
    """What became of an `OpenRelayPort`, as the runtime answers it."""

    OPENED = "opened"
    TAKEN = "taken"  # another program holds it (or may not have it): another port may do
    EXHAUSTED = "exhausted"  # out of file descriptors or memory: no other port would open now


@dataclass(frozen=True, slots=True)
class CloseRelayPort:
    """Close the sockets of allocation port `relay_port` (its allocation is gone)."""

    relay_port: int


@dataclass(frozen=True, slots=True)
class FetchReservation:
    """Fetch the reservation of RESERVATION-TOKEN `token` from the worker process of the relay
    that holds it (an Allocate presented it here): that worker gives it up with the sockets of
    its port, which this runtime takes as its own. The runtime answers with
    `handle_fetched_reservation`, also when no worker held it."""

    token: bytes


@dataclass(frozen=True, slots=True)
class ChannelRoute:
    """One channel binding as the kernel fast path needs it, both directions in one record.

    client -> relay:3478, ChannelData on `channel`  <=>  relay:`relay_port` -> `peer`, plain UDP.
    When `peer` is the relay's own public address, the fast path finds the other allocation's
    route by (peer, relay_port) and loops the packet back itself (packets to itself).
    Only clients on UDP get routes.
    """

    client: ClientAddr
    channel: int
    relay_port: int
    peer: PeerAddr


@dataclass(frozen=True, slots=True)
class InstallChannel:
    route: ChannelRoute


@dataclass(frozen=True, slots=True)
class RemoveChannel:
    route: ChannelRoute


@dataclass(frozen=True, slots=True)
class AllocationOpened:
    """An allocation was created (for logs and metrics)."""

    flow: ClientFlow
    relay_port: int
    families: frozenset[Family]
    username: str
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationClosed:
    """An allocation was deleted: `reason` is "refresh", "expired", "shutdown",
    "connection_closed" (its TCP/TLS connection went away) or "port_unavailable" (carried over
    from the previous process, its port could not be opened again). `traffic`: what Python
    relayed for it (the kernel's share is read from the fast path)."""

    flow: ClientFlow
    relay_port: int
    reason: str
    traffic: AllocationTraffic = field(default_factory=AllocationTraffic)


@dataclass(frozen=True, slots=True)
class AddPermission:
    """Peer address `peer` may now send to allocation port `relay_port` (any transport). For the
    kernel's view of permissions, which drops what no permission admits before Python sees it."""

    relay_port: int
    peer: IPAddress


@dataclass(frozen=True, slots=True)
class RemovePermission:
    """The permission for `peer` on `relay_port` expired, or its allocation closed."""

    relay_port: int
    peer: IPAddress


Command = (
    SendToClient
    | SendToPeer
    | OpenRelayPort
    | CloseRelayPort
    | FetchReservation
    | InstallChannel
    | RemoveChannel
    | AllocationOpened
    | AllocationClosed
    | AddPermission
    | RemovePermission
)
