"""Which peer addresses a client may relay to.

By default a relay must not become a way into its own network: loopback, link-local,
unspecified, multicast, private (RFC 1918), shared (CGNAT, RFC 6598), reserved and unique-local
(ULA) ranges are refused. Operators list ranges to allow (labs, private deployments). The
documentation prefixes (192.0.2.0/24, 2001:db8::/32, ...) are not refused: they stand for public
addresses in tests and examples.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from xdpturn.proto.addr import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED_RANGES: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network", includes the unspecified address
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (CGNAT)
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes broadcast
        "::/128",
        "::1/128",
        "64:ff9b:1::/48",  # local-use NAT64, could reach private IPv4
        "fc00::/7",  # unique local
        "fe80::/10",
        "fec0::/10",  # deprecated site-local
        "ff00::/8",
    )
)


class PeerPolicy:
    def __init__(self, allow: Sequence[IPNetwork] = ()) -> None:
        self._allow = tuple(allow)

    def permits(self, ip: IPAddress) -> bool:
        # An IPv4-mapped IPv6 address is judged as the IPv4 address it reaches.
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self._allow if net.version == ip.version):
            return True
        return not any(ip in net for net in DENIED_RANGES if net.version == ip.version)
