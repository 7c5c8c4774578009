"""With the fast path attached, the relay's machine is still a host: it forwards no foreign
packet, and it still takes its IPv6 default route and addresses from router advertisements.

Three namespaces of the test's own (documentation prefixes only, no link to the root one):

    router (r0) <-> (h0) host (h1) <-> (b0) behind

The router sends the host packets for `behind` (the host must drop them) and a router
advertisement (the host must accept it, and the relay then reaches peers through the advertised
router), while XDP programs are attached to h0 and h1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet6 import (
    ICMPv6ND_RA,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.sendrecv import sendp

from tests.e2e.helpers import FORWARDING_SYSCTLS
from xdpturn.fastpath import FastPathConfig, FastPathMode
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto.addr import ClientAddr, PeerAddr, TransportAddr
from xdpturn.proto.commands import ChannelRoute
from xdpturn_lab.testbed import netns

pytestmark = pytest.mark.kernel

RA_PREFIX = ipaddress.IPv6Network("2001:db8:aaaa::/64")
BEHIND4 = "198.51.100.2"
BEHIND6 = "2001:db8:b::2"


@dataclass(frozen=True)
class Net:
    router: str
    host: str
    behind: str


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def net() -> Iterator[Net]:
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    n = Net(f"xh-r-{tag}", f"xh-h-{tag}", f"xh-b-{tag}")
    made: list[str] = []
    try:
        for ns in (n.router, n.host, n.behind):
            made.append(ns)
            netns.create(ns)
        sh("ip", "-n", n.router, "link", "add", "r0", "type", "veth", "peer", "name", "h0",
           "netns", n.host)  # fmt: skip
        sh("ip", "-n", n.host, "link", "add", "h1", "type", "veth", "peer", "name", "b0",
           "netns", n.behind)  # fmt: skip
        # A host as it comes: forwarding 0, accept_ra 1, autoconf 1 (the namespace defaults).
        batches = {
            n.router: [
                "link set lo up", "link set r0 up", "addr add 192.0.2.254/24 dev r0",
                "addr add 2001:db8:1::fe/64 dev r0 nodad",
                "route add 198.51.100.0/24 via 192.0.2.1",
                "route add 2001:db8:b::/64 via 2001:db8:1::1",
            ],
            n.host: [
                "link set lo up", "link set h0 up", "link set h1 up",
                "addr add 192.0.2.1/24 dev h0", "addr add 2001:db8:1::1/64 dev h0 nodad",
                "addr add 198.51.100.1/24 dev h1", "addr add 2001:db8:b::1/64 dev h1 nodad",
            ],
            n.behind: [
                "link set lo up", "link set b0 up", f"addr add {BEHIND4}/24 dev b0",
                f"addr add {BEHIND6}/64 dev b0 nodad", "route add default via 198.51.100.1",
                "route add default via 2001:db8:b::1",
            ],
        }  # fmt: skip
        for ns, lines in batches.items():
            subprocess.run(
                ["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                check=True, capture_output=True,
            )  # fmt: skip
        yield n
    finally:
        for ns in reversed(made):
            netns.delete(ns)


def forwarding(ns: str) -> dict[str, str]:
    out = sh("ip", "netns", "exec", ns, "sysctl", "-a", "--pattern", FORWARDING_SYSCTLS)
    return dict(line.split(" = ", 1) for line in out.splitlines())


def snmp(ns: str, proto: str) -> dict[str, int]:
    with netns.entered(ns):
        if proto == "Ip6":
            with open("/proc/thread-self/net/snmp6") as f:
                return {k: int(v) for k, v in (line.split() for line in f) if k.startswith("Ip6")}
        with open("/proc/thread-self/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith(f"{proto}:")]
    return dict(zip(rows[0][1:], (int(v) for v in rows[1][1:]), strict=True))


def test_host_forwards_nothing_and_accepts_router_advertisements(net: Net) -> None:
    before = forwarding(net.host)
    assert set(before.values()) == {"0"}, before
    with netns.entered(net.host):
        fp = XdpFastPath(FastPathConfig(mode=FastPathMode.AUTO, interfaces=["h0", "h1"]))
    try:
        assert fp.mode in ("native", "generic")
        assert forwarding(net.host) == before

        # Foreign packets: the host drops them (InAddrErrors), nothing reaches `behind`.
        with netns.entered(net.behind):
            rx4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        rx4.bind((BEHIND4, 9999))
        rx6.bind((BEHIND6, 9999))
        rx4.setblocking(False)
        rx6.setblocking(False)
        ip4, ip6 = snmp(net.host, "Ip"), snmp(net.host, "Ip6")
        with netns.entered(net.router):
            tx4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with tx4, tx6, rx4, rx6:
            for _ in range(3):
                tx4.sendto(b"foreign", (BEHIND4, 9999))
                tx6.sendto(b"foreign", (BEHIND6, 9999))

            def refused() -> bool:
                now4, now6 = snmp(net.host, "Ip"), snmp(net.host, "Ip6")
                v6 = sum(now6[k] - ip6[k] for k in ("Ip6InAddrErrors", "Ip6InNoRoutes"))
                return now4["InAddrErrors"] - ip4["InAddrErrors"] >= 3 and v6 >= 3

            wait_for(refused, "the host refusing the foreign packets")
            for rx in (rx4, rx6):
                with pytest.raises(BlockingIOError):
                    rx.recv(100)
        assert snmp(net.host, "Ip")["ForwDatagrams"] == ip4["ForwDatagrams"]
        assert snmp(net.host, "Ip6")["Ip6OutForwDatagrams"] == ip6["Ip6OutForwDatagrams"]

        # A router advertisement: default route and a SLAAC address appear on h0.
        mac = json.loads(sh("ip", "-n", net.router, "-j", "link", "show", "dev", "r0"))[0][
            "address"
        ]
        router_ll = "fe80::ff:fe00:1"
        sh("ip", "-n", net.router, "addr", "add", f"{router_ll}/64", "dev", "r0", "nodad")
        ra = (
            Ether(src=mac, dst="33:33:00:00:00:01")
            / IPv6(src=router_ll, dst="ff02::1", hlim=255)
            / ICMPv6ND_RA(routerlifetime=1800)
            / ICMPv6NDOptSrcLLAddr(lladdr=mac)
            / ICMPv6NDOptPrefixInfo(
                prefix=str(RA_PREFIX.network_address), prefixlen=64, L=1, A=1,
                validlifetime=3600, preferredlifetime=1800,
            )
        )  # fmt: skip

        def accepted() -> bool:
            routes = sh("ip", "-n", net.host, "-6", "route", "show", "default")
            addrs = sh("ip", "-n", net.host, "-6", "addr", "show", "dev", "h0")
            prefix = str(RA_PREFIX.network_address).rstrip(":")
            return f"via {router_ll} dev h0" in routes and prefix in addrs

        with netns.entered(net.router):
            sendp(ra, iface="r0", verbose=False)
        wait_for(accepted, "the default route and address from the router advertisement")
        # A peer beyond that default route gets its next hop from it: the router's link-local
        # address and the MAC the advertisement announced.
        far = ipaddress.IPv6Address("2001:db8:ffff::9")
        fp.install(
            ChannelRoute(
                ClientAddr(TransportAddr.parse("[2001:db8:1::fe]:5000")),
                0x4000,
                50000,
                PeerAddr(TransportAddr(far, 7000)),
            )
        )
        keeper = fp.next_hops
        assert keeper is not None

        def via_router() -> bool:
            hop = keeper.resolved(far)
            return hop is not None and str(hop.neighbour) == router_ll

        wait_for(via_router, "the next hop through the advertised router")
        hop = keeper.resolved(far)
        assert hop is not None and hop.dmac == bytes.fromhex(mac.replace(":", ""))
        assert forwarding(net.host) == before
    finally:
        fp.close()
    assert forwarding(net.host) == before
