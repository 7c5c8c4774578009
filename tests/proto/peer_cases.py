"""Peer addresses and the default policy's verdict on each, written out by hand (not computed
from the table under test): one sample per registry row, and the spellings that reached loopback,
link-local or private space before the policy judged embedded IPv4 addresses."""

from __future__ import annotations

# (row of the registry table the sample falls in, sample, relayed by default?)
REGISTRY_SAMPLES: list[tuple[str, str, bool]] = [
    ("0.0.0.0/8", "0.1.2.3", False),
    ("0.0.0.0/32", "0.0.0.0", False),
    ("10.0.0.0/8", "10.1.2.3", False),
    ("100.64.0.0/10", "100.64.0.1", False),
    ("127.0.0.0/8", "127.0.0.1", False),
    ("169.254.0.0/16", "169.254.169.254", False),
    ("172.16.0.0/12", "172.31.0.1", False),
    ("192.0.0.0/24", "192.0.0.100", False),
    ("192.0.0.0/29", "192.0.0.1", False),
    ("192.0.0.8/32", "192.0.0.8", False),
    ("192.0.0.9/32", "192.0.0.9", True),
    ("192.0.0.10/32", "192.0.0.10", True),
    ("192.0.0.170/32", "192.0.0.170", False),
    ("192.0.0.171/32", "192.0.0.171", False),
    ("192.0.2.0/24", "192.0.2.77", True),
    ("192.31.196.0/24", "192.31.196.1", True),
    ("192.52.193.0/24", "192.52.193.1", True),
    ("192.88.99.0/24", "192.88.99.1", False),
    ("192.88.99.2/32", "192.88.99.2", False),
    ("192.168.0.0/16", "192.168.1.1", False),
    ("192.175.48.0/24", "192.175.48.1", True),
    ("198.18.0.0/15", "198.18.0.1", False),
    ("198.51.100.0/24", "198.51.100.7", True),
    ("203.0.113.0/24", "203.0.113.9", True),
    ("240.0.0.0/4", "240.0.0.1", False),
    ("255.255.255.255/32", "255.255.255.255", False),
    ("224.0.0.0/4", "239.255.255.250", False),
    ("::/0", "1::1", False),
    ("2000::/3", "2606:4700::1111", True),
    ("::1/128", "::1", False),
    ("::/128", "::", False),
    ("::ffff:0:0/96", "::ffff:198.51.100.7", True),
    ("::/96", "::198.51.100.7", True),
    ("64:ff9b::/96", "64:ff9b::c633:6407", True),
    ("64:ff9b:1::/48", "64:ff9b:1::c633:6407", False),
    ("100::/64", "100::7", False),
    ("100:0:0:1::/64", "100:0:0:1::1", False),
    ("2001::/23", "2001:100::1", False),
    # Teredo: server 198.51.100.7, client 198.51.100.8 (c6336408 ^ ffffffff = 39cc9bf7).
    ("2001::/32", "2001:0:c633:6407::39cc:9bf7", True),
    ("2001:1::1/128", "2001:1::1", True),
    ("2001:1::2/128", "2001:1::2", True),
    ("2001:1::3/128", "2001:1::3", True),
    ("2001:2::/48", "2001:2::1", False),
    ("2001:3::/32", "2001:3::1", True),
    ("2001:4:112::/48", "2001:4:112::1", True),
    ("2001:10::/28", "2001:10::1", False),
    ("2001:20::/28", "2001:20::1", True),
    ("2001:30::/28", "2001:30::1", True),
    ("2001:db8::/32", "2001:db8::7", True),
    ("2002::/16", "2002:c633:6407::1", True),
    ("2620:4f:8000::/48", "2620:4f:8000::1", True),
    ("3fff::/20", "3fff::1", True),
    ("5f00::/16", "5f00::1", False),
    ("fc00::/7", "fd00::1", False),
    ("fe80::/10", "fe80::1", False),
    ("fec0::/10", "fec0::1", False),
    ("ff00::/8", "ff02::1", False),
]

# Refused by default. The first eight were relayed before (issue 12); the rest were refused
# already and must stay so.
DANGEROUS: list[str] = [
    "::127.0.0.1",  # IPv4-compatible loopback
    "64:ff9b::7f00:1",  # NAT64 to loopback
    "64:ff9b::a9fe:a9fe",  # NAT64 to the cloud metadata service
    "2002:7f00:1::1",  # 6to4 of loopback
    "2002:a9fe:a9fe::1",  # 6to4 of the metadata service
    "198.18.0.1",  # benchmarking
    "192.0.0.170",  # NAT64/DNS64 discovery (IETF protocol assignments)
    "100::1",  # discard-only
    "127.0.0.1",
    "169.254.169.254",
    "10.0.0.1",
    "0.0.0.0",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "::10.0.0.1",
    "::169.254.169.254",
    "64:ff9b::a00:1",  # NAT64 to 10.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:7f00:1::39cc:9bf7",  # Teredo, server 127.0.0.1
    "2001:0:c633:6407::80ff:fffe",  # Teredo, client 127.0.0.1 (7f000001 ^ ffffffff)
    "2001:0:c633:6407::5601:5601",  # Teredo, client 169.254.169.254 (a9fea9fe ^ ffffffff)
    "fe80::1",
    "fd00::1",
    "ff02::1",
    "224.0.0.1",
    "255.255.255.255",
    "100.64.0.1",
    "64:ff9b:1::7f00:1",  # local-use NAT64
]
