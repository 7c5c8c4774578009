"""The TURN server state machine (RFC 8656, UDP relaying). CONTRACT STUB: API only."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from xdpturn.proto.addr import ClientFlow, Family, PeerAddr
from xdpturn.proto.auth import Authenticator
from xdpturn.proto.commands import Command

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RelayPorts(Protocol):
    """Hands out allocation ports. The runtime's implementation binds the sockets; tests fake it."""

    def acquire(self, families: frozenset[Family]) -> int | None:
        """A port now open for every family in `families`, or None when none is free."""

    def release(self, port: int) -> None: ...


@dataclass
class ServerConfig:
    realm: str = "xdpturn"
    public_ipv4: ipaddress.IPv4Address | None = None
    public_ipv6: ipaddress.IPv6Address | None = None
    auth: Authenticator = field(default_factory=Authenticator)
    allow_peers: list[IPNetwork] = field(default_factory=list)
    max_allocations: int | None = None
    max_allocations_per_user: int | None = None
    max_allocations_per_ip: int | None = None
    software: str = "xdpturn"


@dataclass(frozen=True)
class AllocationInfo:
    """A read-only view of one allocation, for status displays and metrics."""

    flow: ClientFlow
    username: str
    relay_port: int
    families: frozenset[Family]
    expires: float
    permissions: int
    channels: int


class TurnServer:
    def __init__(
        self, config: ServerConfig, ports: RelayPorts, rng: random.Random | None = None
    ) -> None:
        self.stats: Counter[str] = Counter()
        raise NotImplementedError

    def handle_client_datagram(self, data: bytes, flow: ClientFlow, now: float) -> None:
        """A STUN message or ChannelData from a client. `now` is unix time in seconds."""
        raise NotImplementedError

    def handle_peer_datagram(
        self, data: bytes, relay_port: int, peer: PeerAddr, now: float
    ) -> None:
        """A UDP datagram that arrived on allocation port `relay_port` from `peer`."""
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """When handle_timer wants to run next (unix time), or None."""
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        raise NotImplementedError

    def next_command(self) -> Command | None:
        raise NotImplementedError

    def close(self, now: float) -> None:
        """Delete every allocation (shutdown): routes removed, ports released."""
        raise NotImplementedError

    def allocations(self) -> list[AllocationInfo]:
        raise NotImplementedError
