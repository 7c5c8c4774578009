"""A namespace with real routes and neighbours, and the loaded program.

Topology inside one namespace (nothing leaves it; documentation prefixes only):

    rly0 (192.0.2.1/24, 2001:db8:1::1/64)       <-> cli0   clients .10/.11, ::10/::11
    rly1 (198.51.100.1/25, 2001:db8:2::1/64)    <-> peer1  peers .20, ::20
    rly2 (198.51.100.129/25, 2001:db8:3::1/64)  <-> peer2  MTU 1280

The relay's public addresses (what clients are told, as behind 1:1 NAT) are 203.0.113.1 and
2001:db8:ffff::1; its local ones are rly0's. Neighbours are permanent entries with fixed MACs.
Every forwarding sysctl is 0, as on a host: the loader's next_hops carry the routes. Tests of the
bpf_fib_lookup fallback switch forwarding on for one device (`forwarding`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from xdpturn.fastpath import FastPathConfig, FastPathMode
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto.addr import ClientFlow
from xdpturn.proto.commands import ChannelRoute
from xdpturn_lab.testbed import netns

TURN_PORT = 3478
PUBLIC4 = ipaddress.IPv4Address("203.0.113.1")
PUBLIC6 = ipaddress.IPv6Address("2001:db8:ffff::1")
LOCAL4 = ipaddress.IPv4Address("192.0.2.1")
LOCAL6 = ipaddress.IPv6Address("2001:db8:1::1")

CLIENT_MAC = "02:00:00:00:01:10"
CLIENT2_MAC = "02:00:00:00:01:11"
PEER_MAC = "02:00:00:00:02:20"
PEER2_MAC = "02:00:00:00:03:20"
GW_MAC = "02:00:00:00:01:fe"

NEIGHBOURS = [
    ("rly0", "192.0.2.10", CLIENT_MAC),
    ("rly0", "192.0.2.11", CLIENT2_MAC),
    ("rly0", "2001:db8:1::10", CLIENT_MAC),
    ("rly0", "2001:db8:1::11", CLIENT2_MAC),
    ("rly0", "192.0.2.30", "02:00:00:00:01:30"),  # a peer on the clients' link (XDP_TX)
    ("rly1", "198.51.100.20", PEER_MAC),
    ("rly1", "2001:db8:2::20", PEER_MAC),
    ("rly2", "198.51.100.130", PEER2_MAC),
    ("rly2", "2001:db8:3::20", PEER2_MAC),
]


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def unique_ns(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Lab:
    ns: str
    ifindex: dict[str, int]
    mac: dict[str, str]
    fastpath: XdpFastPath


def _build(ns: str) -> tuple[dict[str, int], dict[str, str]]:
    def ip(*args: str) -> None:
        sh("ip", "-n", ns, *args)

    for i, mtu in ((0, 1500), (1, 1500), (2, 1280)):
        peer = "cli0" if i == 0 else f"peer{i}"
        ip("link", "add", f"rly{i}", "mtu", str(mtu), "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "mtu", str(mtu), "up")
        ip("link", "set", f"rly{i}", "up")
    ip("addr", "add", "192.0.2.1/24", "dev", "rly0")
    ip("addr", "add", "2001:db8:1::1/64", "dev", "rly0", "nodad")
    ip("addr", "add", "198.51.100.1/25", "dev", "rly1")
    ip("addr", "add", "2001:db8:2::1/64", "dev", "rly1", "nodad")
    ip("addr", "add", "198.51.100.129/25", "dev", "rly2")
    ip("addr", "add", "2001:db8:3::1/64", "dev", "rly2", "nodad")
    for dev, addr, lladdr in NEIGHBOURS:
        ip("neigh", "replace", addr, "lladdr", lladdr, "nud", "permanent", "dev", dev)
    ifindex: dict[str, int] = {}
    mac: dict[str, str] = {}
    with netns.entered(ns):
        for dev in ("rly0", "rly1", "rly2"):
            ifindex[dev] = socket.if_nametoindex(dev)
    for dev in ifindex:
        mac[dev] = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", dev))[0]["address"]
    return ifindex, mac


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ns = unique_ns("xdpturn-fp")
    netns.create(ns)
    fp: XdpFastPath | None = None
    try:
        ifindex, mac = _build(ns)
        # No interfaces: the program is loaded and configured but only run by BPF_PROG_TEST_RUN.
        # Made inside the namespace: it resolves next hops from that namespace's tables.
        with netns.entered(ns):
            fp = XdpFastPath(
                FastPathConfig(
                    mode=FastPathMode.AUTO,
                    interfaces=[],
                    turn_port=TURN_PORT,
                    public_ipv4=PUBLIC4,
                    public_ipv6=PUBLIC6,
                    local_ipv4=LOCAL4,
                    local_ipv6=LOCAL6,
                )
            )
        yield Lab(ns, ifindex, mac, fp)
    finally:
        if fp is not None:
            fp.close()
        netns.delete(ns)


@contextmanager
def forwarding(ns: str, dev: str) -> Iterator[None]:
    """Forwarding on for `dev` (both families) inside the block: bpf_fib_lookup answers then."""

    def set_to(value: str) -> None:
        for fam in ("ipv4", "ipv6"):
            sh(
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                f"net.{fam}.conf.{dev}.forwarding={value}",
            )

    set_to("1")
    try:
        yield
    finally:
        set_to("0")


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `condition()` holds (netlink events reach the loader's thread asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.01)


@contextmanager
def allocated(fp: XdpFastPath, routes: Sequence[ChannelRoute]) -> Iterator[None]:
    """The guard's view of what the server holds with these routes installed: each client's
    allocation (UDP) on its relay port and a permission for each peer, as the core would say."""
    opened = {(ClientFlow(r.client), r.relay_port) for r in routes}
    permitted = {(r.relay_port, r.peer.ip) for r in routes}
    for flow, port in opened:
        fp.allocation_opened(flow, port)
    for port, ip in permitted:
        fp.permit(port, ip)
    try:
        yield
    finally:
        for port, ip in permitted:
            fp.unpermit(port, ip)
        for flow, port in opened:
            fp.allocation_closed(flow, port)
