"""Addresses as the protocol sees them, with distinct types for each role."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import NewType

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Family(IntEnum):
    """Address families, numbered as STUN encodes them (RFC 8489 section 14.1)."""

    IPV4 = 0x01
    IPV6 = 0x02

    @classmethod
    def of(cls, ip: IPAddress) -> Family:
        return cls.IPV4 if ip.version == 4 else cls.IPV6


@dataclass(frozen=True, slots=True)
class TransportAddr:
    """An IP address and a UDP/TCP port.

    `family` and the hash are computed once, at construction: addresses are dictionary keys and
    family checks on every relayed datagram, and `ipaddress` hashes in Python (hex() of the
    address, each time). The runtime keeps one object per sender, so that cost is paid once.
    """

    ip: IPAddress
    port: int
    family: Family = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        object.__setattr__(self, "family", Family.of(self.ip))
        object.__setattr__(self, "_hash", hash((self.ip, self.port)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[TransportAddr], tuple[IPAddress, int]]:
        # Rebuilt, not restored: a pickled hash is wrong in a process with another hash seed.
        return (type(self), (self.ip, self.port))

    @classmethod
    def parse(cls, text: str) -> TransportAddr:
        """Parse `192.0.2.1:3478` or `[2001:db8::1]:3478`."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected ADDRESS:PORT, got {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(ipaddress.ip_address(host), int(port))

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


# The client's transport address as the relay sees it (after any NAT).
ClientAddr = NewType("ClientAddr", TransportAddr)
# A peer's transport address, as named in XOR-PEER-ADDRESS or seen as a datagram's source.
PeerAddr = NewType("PeerAddr", TransportAddr)


class Transport(Enum):
    """How a client reaches the relay. Relayed traffic to peers is always UDP."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class ClientFlow:
    """The 5-tuple that identifies an allocation: client address, relay listener, transport.

    `listener` is the runtime's index for the socket (or stream) the client used; the runtime
    sends replies back through the same one.
    """

    client: ClientAddr
    listener: int = 0
    transport: Transport = Transport.UDP
    # Cached for the same reason as TransportAddr's: the key of every allocation lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.client, self.listener, self.transport)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ClientFlow], tuple[ClientAddr, int, Transport]]:
        return (type(self), (self.client, self.listener, self.transport))
