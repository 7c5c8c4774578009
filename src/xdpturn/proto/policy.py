"""Which peer addresses a client may relay to.

A relay must not become a way into its own network or onto the host it runs on. The default is
the IANA special-purpose address registries, written out below so a reader sees every entry:
what the registry does not mark globally reachable is refused, and so is multicast, IPv6 space
outside global unicast (2000::/3), and the relay's own public addresses in any spelling but the
canonical one (which the core hands to its own allocations: packets to itself).

Every IPv6 form that embeds an IPv4 address is judged by the IPv4 address it reaches (all of
them, for Teredo's two): IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 and Teredo.
The local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215) is refused as a whole: where the IPv4
address sits inside it is each network's choice, so it cannot be read back here.

Operators change the default with `--allow-peer CIDR` and `--deny-peer CIDR`. The most specific
prefix that contains the address decides; at equal length an operator's rule beats the registry,
and a deny beats an allow. An allowed IPv6 prefix that embeds IPv4 still has its embedded
address judged: to open NAT64 or 6to4 towards a private range, allow the IPv4 range itself.

The documentation prefixes (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32,
3fff::/20) are not globally reachable in the registry but are allowed here: nothing routes
them, and tests and examples use them as public addresses. `--deny-peer` closes them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xdpturn.proto.addr import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Special:
    """One row of a special-purpose registry: `reachable` is its "Globally Reachable" column
    (None where the registry says N/A)."""

    prefix: IPNetwork
    name: str
    reference: str
    reachable: bool | None


def _row(prefix: str, name: str, reference: str, reachable: bool | None) -> Special:
    return Special(ipaddress.ip_network(prefix), name, reference, reachable)


# IANA IPv4 Special-Purpose Address Registry
# (https://www.iana.org/assignments/iana-ipv4-special-registry/), plus the rows marked "not in
# the registry" that a relay must treat the same way.
IPV4_SPECIAL: tuple[Special, ...] = (
    _row("0.0.0.0/8", "This network", "RFC 791", False),
    _row("0.0.0.0/32", "This host on this network", "RFC 1122", False),
    _row("10.0.0.0/8", "Private-Use", "RFC 1918", False),
    _row("100.64.0.0/10", "Shared Address Space", "RFC 6598", False),
    _row("127.0.0.0/8", "Loopback", "RFC 1122", False),
    _row("169.254.0.0/16", "Link Local", "RFC 3927", False),
    _row("172.16.0.0/12", "Private-Use", "RFC 1918", False),
    _row("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890", False),
    _row("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335", False),
    _row("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", False),
    _row("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", True),
    _row("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155", True),
    _row("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880", False),
    _row("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880", False),
    _row("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", False),
    _row("192.31.196.0/24", "AS112-v4", "RFC 7535", True),
    _row("192.52.193.0/24", "AMT", "RFC 7450", True),
    _row("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", None),
    _row("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751", False),
    _row("192.168.0.0/16", "Private-Use", "RFC 1918", False),
    _row("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", True),
    _row("198.18.0.0/15", "Benchmarking", "RFC 2544", False),
    _row("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", False),
    _row("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", False),
    _row("240.0.0.0/4", "Reserved", "RFC 1112", False),
    _row("255.255.255.255/32", "Limited Broadcast", "RFC 919", False),
    # Not in the registry: multicast has its own (RFC 5771).
    _row("224.0.0.0/4", "Multicast", "RFC 5771", False),
)

# IANA IPv6 Special-Purpose Address Registry
# (https://www.iana.org/assignments/iana-ipv6-special-registry/), plus rows marked "not in the
# registry". The first two rows are the IANA IPv6 Address Space registry: only 2000::/3 is
# allocated global unicast; the rest is reserved by the IETF or has its own row below.
IPV6_SPECIAL: tuple[Special, ...] = (
    _row("::/0", "Not global unicast (IPv6 Address Space registry)", "RFC 4291", False),
    _row("2000::/3", "Global Unicast (IPv6 Address Space registry)", "RFC 4291", True),
    _row("::1/128", "Loopback Address", "RFC 4291", False),
    _row("::/128", "Unspecified Address", "RFC 4291", False),
    _row("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291", False),
    # Not in the registry: deprecated, but a stack may still reach the IPv4 address.
    _row("::/96", "IPv4-compatible Address (deprecated)", "RFC 4291", None),
    _row("64:ff9b::/96", "IPv4-IPv6 Translat.", "RFC 6052", True),
    _row("64:ff9b:1::/48", "IPv4-IPv6 Translat. (local use)", "RFC 8215", False),
    _row("100::/64", "Discard-Only Address Block", "RFC 6666", False),
    _row("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780", False),
    _row("2001::/23", "IETF Protocol Assignments", "RFC 2928", False),
    _row("2001::/32", "TEREDO", "RFC 4380", None),
    _row("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", True),
    _row("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155", True),
    _row("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665", True),
    _row("2001:2::/48", "Benchmarking", "RFC 5180", False),
    _row("2001:3::/32", "AMT", "RFC 7450", True),
    _row("2001:4:112::/48", "AS112-v6", "RFC 7535", True),
    _row("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843", None),
    _row("2001:20::/28", "ORCHIDv2", "RFC 7343", True),
    _row("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374", True),
    _row("2001:db8::/32", "Documentation", "RFC 3849", False),
    _row("2002::/16", "6to4", "RFC 3056", None),
    _row("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", True),
    _row("3fff::/20", "Documentation", "RFC 9637", False),
    _row("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602", False),
    _row("fc00::/7", "Unique-Local", "RFC 4193", False),
    _row("fe80::/10", "Link-Local Unicast", "RFC 4291", False),
    # Not in the registry: deprecated site-local (RFC 3879) and multicast (RFC 4291).
    _row("fec0::/10", "Site-Local (deprecated)", "RFC 3879", False),
    _row("ff00::/8", "Multicast", "RFC 4291", False),
)

# Not globally reachable, allowed anyway: see the module docstring.
DOCUMENTATION: frozenset[IPNetwork] = frozenset(
    ipaddress.ip_network(cidr)
    for cidr in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20")
)

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")

# The IPv6 forms judged by the IPv4 addresses they embed (see embedded_ipv4).
EMBEDDING: frozenset[IPNetwork] = frozenset({_MAPPED, _COMPATIBLE, _NAT64, _SIX_TO_FOUR, _TEREDO})


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses a packet to `ip` may reach, or () if `ip` embeds none."""
    value = int(ip)
    low32 = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip in _MAPPED or ip in _NAT64:
        return (low32,)
    if ip in _COMPATIBLE:
        # The unspecified address and loopback are not IPv4-compatible addresses (they have
        # rows of their own, which an operator may open).
        return (low32,) if value > 1 else ()
    if ip in _SIX_TO_FOUR:
        return (ipaddress.IPv4Address((value >> 80) & 0xFFFFFFFF),)  # bits 16-48
    if ip in _TEREDO:
        server = ipaddress.IPv4Address((value >> 64) & 0xFFFFFFFF)  # bits 32-64
        client = ipaddress.IPv4Address((value & 0xFFFFFFFF) ^ 0xFFFFFFFF)  # obfuscated
        return (server, client)
    return ()


@dataclass(frozen=True, slots=True)
class _Rule:
    prefix: IPNetwork
    allow: bool
    operator: bool  # from --allow-peer/--deny-peer, not the registry


class PeerPolicy:
    """The verdict for a peer address: registry defaults, then the operator's allow and deny
    lists, most specific prefix first. `own` are the relay's public addresses: refused here in
    every spelling (the core handles the canonical one before asking)."""

    def __init__(
        self,
        allow: Sequence[IPNetwork] = (),
        deny: Sequence[IPNetwork] = (),
        own: Iterable[IPAddress] = (),
    ) -> None:
        rules = [_Rule(s.prefix, _default_allows(s), operator=False) for s in _all_special()]
        rules += [_Rule(net, True, operator=True) for net in allow]
        rules += [_Rule(net, False, operator=True) for net in deny]
        # Most specific first; at equal length operator before registry, deny before allow.
        rules.sort(key=lambda r: (-r.prefix.prefixlen, not r.operator, r.allow))
        # (network, mask, rule) as integers: `ip in prefix` costs a microsecond each.
        self._rules = {
            version: tuple(
                (int(r.prefix.network_address), int(r.prefix.netmask), r)
                for r in rules
                if r.prefix.version == version
            )
            for version in (4, 6)
        }
        self._own = frozenset(own)

    def permits(self, ip: IPAddress) -> bool:
        if ip in self._own or not self._rule_for(ip).allow:
            return False
        if isinstance(ip, ipaddress.IPv6Address):
            # Every embedded address must pass too, own addresses included.
            return all(self.permits(v4) for v4 in embedded_ipv4(ip))
        return True

    def _rule_for(self, ip: IPAddress) -> _Rule:
        # A few dozen rows, most specific first: a scan is cheap next to a request's cost.
        value = int(ip)
        for network, mask, rule in self._rules[ip.version]:
            if value & mask == network:
                return rule
        return _GLOBAL_IPV4  # IPv6 always matches the ::/0 row


_GLOBAL_IPV4 = _Rule(ipaddress.IPv4Network("0.0.0.0/0"), True, operator=False)


def _all_special() -> tuple[Special, ...]:
    return IPV4_SPECIAL + IPV6_SPECIAL


def _default_allows(row: Special) -> bool:
    """The registry's verdict as the relay applies it. An embedding prefix passes here and its
    embedded address decides; N/A (deprecated) rows are refused."""
    return row.prefix in EMBEDDING or row.prefix in DOCUMENTATION or row.reachable is True
