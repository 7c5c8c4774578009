"""Declarative description of a testbed world, and its address plan.

The world is an "internet" router namespace with one point-to-point veth link per attached node:

    client host --lan-- client NAT --+                  +-- relay                (public = local)
                                     +-- inet router ---+
    gateway host --lan-- gateway NAT-+                  +-- 1:1 NAT -- relay     (public != local)

Address plan (the same in every run: each run has its own namespaces, so runs never share a link):

    link                 IPv4               IPv6                .1 / ::1     .2 / ::2
    relay i uplink       203.0.113.8i/29    2001:db8:1:i::/64   inet         relay or its 1:1 NAT
    relay i behind 1:1   10.0.i.0/24        fd00:0:i::/64       1:1 NAT      relay
    site j uplink        198.51.100.8j/29   2001:db8:2:j::/64   inet         site NAT
    site j LAN           10.1.j.0/24        fd00:1:j::/64       site NAT     host

(i and j count from 0 in declaration order; IPv6 groups are hexadecimal.) Only documentation
prefixes are routed by the internet router; 10.x and fd00:: exist only behind a NAT, so nothing on
the internet can reach them, as with a real NAT. 192.0.2.0/24 is left free for tests.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Short names: they become parts of namespace names and of `to-NAME` interface names (IFNAMSIZ 15).
_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,9}\Z")
_RESERVED = frozenset({"inet"})
MAX_RELAYS = 32  # 32 /29 blocks fill 203.0.113.0/24
MAX_SITES = 32  # same for 198.51.100.0/24


@dataclass(frozen=True, slots=True)
class Relay:
    """A relay host with a public address.

    With `nat_1to1`, a router namespace in front of it maps its public address to a private local
    one (DNAT in, SNAT out, hairpin included), as cloud providers do with elastic IPs.
    """

    name: str
    nat_1to1: bool = False


@dataclass(frozen=True, slots=True)
class Site:
    """A host behind its own masquerading NAT router (IPv4 and IPv6).

    `random_ports` makes the NAT pick a random external port for every mapping
    (`masquerade fully-random`) instead of keeping the host's port when it is free.
    """

    name: str
    random_ports: bool = False


@dataclass(frozen=True, slots=True, init=False)
class Topology:
    relays: tuple[Relay, ...]
    sites: tuple[Site, ...]

    def __init__(self, relays: Iterable[Relay] = (), sites: Iterable[Site] = ()) -> None:
        object.__setattr__(self, "relays", tuple(relays))
        object.__setattr__(self, "sites", tuple(sites))
        self._validate()

    def _validate(self) -> None:
        if len(self.relays) > MAX_RELAYS:
            raise ValueError(f"at most {MAX_RELAYS} relays")
        if len(self.sites) > MAX_SITES:
            raise ValueError(f"at most {MAX_SITES} sites")
        seen: set[str] = set()
        nodes: list[Relay | Site] = [*self.relays, *self.sites]
        for node in nodes:
            if not _NAME_RE.match(node.name):
                raise ValueError(f"bad node name {node.name!r}: want [a-z][a-z0-9]{{0,9}}")
            if node.name in _RESERVED or node.name in seen:
                raise ValueError(f"node name {node.name!r} is reserved or used twice")
            seen.add(node.name)


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point link: `a` is the upstream end (.1, ::1), `b` the downstream (.2, ::2)."""

    net4: ipaddress.IPv4Network
    net6: ipaddress.IPv6Network

    @property
    def a4(self) -> ipaddress.IPv4Address:
        return self.net4[1]

    @property
    def b4(self) -> ipaddress.IPv4Address:
        return self.net4[2]

    @property
    def a6(self) -> ipaddress.IPv6Address:
        return self.net6[1]

    @property
    def b6(self) -> ipaddress.IPv6Address:
        return self.net6[2]

    def cidr4(self, host: ipaddress.IPv4Address) -> str:
        return f"{host}/{self.net4.prefixlen}"

    def cidr6(self, host: ipaddress.IPv6Address) -> str:
        return f"{host}/{self.net6.prefixlen}"


def _link(net4: str, net6: str) -> Link:
    return Link(ipaddress.IPv4Network(net4), ipaddress.IPv6Network(net6))


def relay_uplink(i: int) -> Link:
    return _link(f"203.0.113.{8 * i}/29", f"2001:db8:1:{i:x}::/64")


def relay_inside(i: int) -> Link:
    return _link(f"10.0.{i}.0/24", f"fd00:0:{i:x}::/64")


def site_uplink(j: int) -> Link:
    return _link(f"198.51.100.{8 * j}/29", f"2001:db8:2:{j:x}::/64")


def site_lan(j: int) -> Link:
    return _link(f"10.1.{j}.0/24", f"fd00:1:{j:x}::/64")
