"""How the program finds the next hop with every forwarding sysctl at 0 (next_hops, kept by the
loader from netlink), and how it follows neighbour and route changes without a restart."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator

import pytest

from tests.fastpath.conftest import (
    CLIENT_MAC,
    LOCAL4,
    PEER_MAC,
    PUBLIC4,
    PUBLIC6,
    TURN_PORT,
    Lab,
    forwarding,
    sh,
    wait_for,
)
from tests.fastpath.packets import channel_data, expected_frame, route, run, taddr, udp_frame
from xdpturn.fastpath import FastPathConfig, FastPathMode, maps
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn_lab.testbed import netns

pytestmark = pytest.mark.kernel

CLIENT = "192.0.2.10:50000"
RELAY_PORT = 50300
PAYLOAD = b"next hop"


def chd(channel: int, dst: str = f"{LOCAL4}:{TURN_PORT}") -> bytes:
    return udp_frame(taddr(CLIENT), taddr(dst), channel_data(channel, PAYLOAD))


def passes(lab: Lab, reason: str) -> int:
    return lab.fastpath.counters().passes[reason]


def test_forwarding_is_off_everywhere_in_the_lab(lab: Lab) -> None:
    pattern = r"(\.forwarding|ip_forward)$"
    out = sh("ip", "netns", "exec", lab.ns, "sysctl", "-a", "--pattern", pattern)
    values = {line.split(" = ")[0]: line.split(" = ")[1] for line in out.splitlines()}
    assert values and set(values.values()) == {"0"}, values


def test_unresolved_neighbour_passes_until_resolved_then_the_kernel_relays(lab: Lab) -> None:
    fp = lab.fastpath
    peer = "198.51.100.50"
    r = route(CLIENT, 0x4A01, RELAY_PORT, f"{peer}:7000")
    fp.install(r)
    try:
        before = passes(lab, "no_next_hop")
        out = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A01))
        assert out.action == bpf.XDP_PASS
        assert passes(lab, "no_next_hop") == before + 1
        # The stack resolves the neighbour (here by hand); the netlink event writes the entry.
        sh("ip", "-n", lab.ns, "neigh", "replace", peer, "lladdr", PEER_MAC, "dev", "rly1")
        keeper = fp.next_hops
        assert keeper is not None
        wait_for(lambda: keeper.resolved(ipaddress.IPv4Address(peer)) is not None)
        out = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A01))
        assert out.action == bpf.XDP_REDIRECT
        want = expected_frame(
            lab.mac["rly1"], PEER_MAC, taddr(f"{LOCAL4}:{RELAY_PORT}"), taddr(f"{peer}:7000"),
            PAYLOAD, ttl=63,
        )  # fmt: skip
        assert out.frame == want
        # The neighbour goes away: back to Python.
        sh("ip", "-n", lab.ns, "neigh", "del", peer, "dev", "rly1")
        wait_for(lambda: keeper.resolved(ipaddress.IPv4Address(peer)) is None)
        assert run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A01)).action == bpf.XDP_PASS
    finally:
        fp.remove(r)
        sh("ip", "-n", lab.ns, "neigh", "flush", "to", peer)


def test_route_change_and_new_default_gateway_are_followed(lab: Lab) -> None:
    fp = lab.fastpath
    keeper = fp.next_hops
    assert keeper is not None
    far = ipaddress.IPv4Address("100.64.7.1")  # reachable only through a default gateway
    r = route(CLIENT, 0x4A02, RELAY_PORT, f"{far}:7000")
    fp.install(r)
    try:
        assert run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A02)).action == bpf.XDP_PASS
        # A default gateway appears: the peer on rly1.
        sh("ip", "-n", lab.ns, "route", "add", "default", "via", "198.51.100.20")
        wait_for(lambda: _on(lab, far, "rly1"))
        out = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A02))
        assert out.action == bpf.XDP_REDIRECT
        assert out.frame[:6] == bytes.fromhex(PEER_MAC.replace(":", ""))
        # The default gateway changes to one on the clients' link: sent back out with XDP_TX.
        sh("ip", "-n", lab.ns, "route", "replace", "default", "via", "192.0.2.10")
        wait_for(lambda: _on(lab, far, "rly0"))
        out = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A02))
        assert out.action == bpf.XDP_TX
        assert out.frame[:6] == bytes.fromhex(CLIENT_MAC.replace(":", ""))
        # A more specific route wins over the default.
        sh("ip", "-n", lab.ns, "route", "add", "100.64.7.0/24", "via", "198.51.100.20")
        wait_for(lambda: _on(lab, far, "rly1"))
        assert run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A02)).action == bpf.XDP_REDIRECT
    finally:
        fp.remove(r)
        sh("ip", "-n", lab.ns, "route", "flush", "100.64.7.0/24")
        sh("ip", "-n", lab.ns, "route", "del", "default")


def _on(lab: Lab, ip: ipaddress.IPv4Address, dev: str) -> bool:
    keeper = lab.fastpath.next_hops
    found = keeper.resolved(ip) if keeper is not None else None
    return found is not None and found.ifindex == lab.ifindex[dev]


def test_fib_lookup_still_serves_a_router(lab: Lab) -> None:
    # With forwarding on for the ingress device, a destination missing from next_hops is routed
    # by bpf_fib_lookup: same output as from next_hops.
    fp = lab.fastpath
    r = route(CLIENT, 0x4A03, RELAY_PORT, "198.51.100.20:7000")
    fp.install(r)
    try:
        from_map = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A03))
        assert from_map.action == bpf.XDP_REDIRECT
        fp.next_hops_map.delete(bytes(maps.addr_key(ipaddress.IPv4Address("198.51.100.20"))))
        assert run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A03)).action == bpf.XDP_PASS
        with forwarding(lab.ns, "rly0"):
            from_fib = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A03))
        assert from_fib == from_map
    finally:
        fp.remove(r)


@pytest.fixture
def per_route_source(lab: Lab) -> Iterator[XdpFastPath]:
    """A second program in the lab with no source address configured and a second address on
    rly0, as a host with several addresses per family on several interfaces."""
    sh("ip", "-n", lab.ns, "addr", "add", "192.0.2.2/24", "dev", "rly0")
    sh("ip", "-n", lab.ns, "addr", "add", "2001:db8:1::2/64", "dev", "rly0", "nodad")
    with netns.entered(lab.ns):
        fp = XdpFastPath(
            FastPathConfig(
                mode=FastPathMode.GENERIC,
                interfaces=["rly0", "rly1"],
                turn_port=TURN_PORT,
                public_ipv4=PUBLIC4,
                public_ipv6=PUBLIC6,
            )
        )
    try:
        yield fp
    finally:
        fp.close()
        sh("ip", "-n", lab.ns, "addr", "del", "192.0.2.2/24", "dev", "rly0")
        sh("ip", "-n", lab.ns, "addr", "del", "2001:db8:1::2/64", "dev", "rly0")


def test_several_addresses_and_interfaces_source_per_route(
    lab: Lab, per_route_source: XdpFastPath
) -> None:
    fp = per_route_source
    to_peer = route(CLIENT, 0x4A04, RELAY_PORT, "198.51.100.20:7000")
    to_peer6 = route("[2001:db8:1::10]:50000", 0x4A05, RELAY_PORT, "[2001:db8:2::20]:7000")
    fp.install(to_peer)
    fp.install(to_peer6)
    try:
        # ChannelData to the second address of rly0 is TURN; the peer on rly1 gets rly1's
        # address as source (what the kernel chooses for it), not rly0's.
        out = run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A04, f"192.0.2.2:{TURN_PORT}"))
        assert out.action == bpf.XDP_REDIRECT
        assert out.frame == expected_frame(
            lab.mac["rly1"], PEER_MAC, taddr(f"198.51.100.1:{RELAY_PORT}"),
            taddr("198.51.100.20:7000"), PAYLOAD, ttl=63,
        )  # fmt: skip
        frame6 = udp_frame(
            taddr("[2001:db8:1::10]:50000"),
            taddr(f"[2001:db8:1::2]:{TURN_PORT}"),
            channel_data(0x4A05, PAYLOAD),
        )
        out = run(fp, lab.ns, lab.ifindex["rly0"], frame6)
        assert out.action == bpf.XDP_REDIRECT
        assert out.frame == expected_frame(
            lab.mac["rly1"], PEER_MAC, taddr(f"[2001:db8:2::1]:{RELAY_PORT}"),
            taddr("[2001:db8:2::20]:7000"), PAYLOAD, ttl=63,
        )  # fmt: skip
        # The peer side answers to rly1's address: ChannelData to the client from rly0's.
        back = udp_frame(taddr("198.51.100.20:7000"), taddr(f"198.51.100.1:{RELAY_PORT}"), PAYLOAD)
        out = run(fp, lab.ns, lab.ifindex["rly1"], back)
        assert out.action == bpf.XDP_REDIRECT
        assert out.frame == expected_frame(
            lab.mac["rly0"], CLIENT_MAC, taddr(f"{LOCAL4}:{TURN_PORT}"), taddr(CLIENT),
            channel_data(0x4A04, PAYLOAD), ttl=63,
        )  # fmt: skip
    finally:
        fp.remove(to_peer)
        fp.remove(to_peer6)


def test_not_carrying_is_reported_logged_once_and_cleared(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    # An attached program whose bound channel has no next hop: every packet passes to Python.
    with netns.entered(lab.ns):
        fp = XdpFastPath(
            FastPathConfig(
                mode=FastPathMode.GENERIC,
                interfaces=["rly2"],
                turn_port=TURN_PORT,
                public_ipv4=PUBLIC4,
                local_ipv4=LOCAL4,
            )
        )
    peer = "198.51.100.60"
    r = route(CLIENT, 0x4A06, RELAY_PORT, f"{peer}:7000")
    try:
        fp.install(r)
        assert fp.problem() is None  # first look: nothing to judge yet
        with caplog.at_level(logging.WARNING, "xdpturn.fastpath"):
            for _ in range(25):
                assert run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A06)).action == bpf.XDP_PASS
            problem = fp.problem()
            assert problem is not None and "no_next_hop" in problem
            for _ in range(25):
                run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A06))
            assert fp.problem() is not None
        warnings = [r.getMessage() for r in caplog.records if "not carrying" in r.getMessage()]
        assert len(warnings) == 1 and "ip neigh" in warnings[0]
        # The neighbour resolves; the kernel relays again and the problem is gone.
        sh("ip", "-n", lab.ns, "neigh", "replace", peer, "lladdr", PEER_MAC, "dev", "rly1")
        keeper = fp.next_hops
        assert keeper is not None
        wait_for(lambda: keeper.resolved(ipaddress.IPv4Address(peer)) is not None)
        assert run(fp, lab.ns, lab.ifindex["rly0"], chd(0x4A06)).action == bpf.XDP_REDIRECT
        assert fp.problem() is None
    finally:
        fp.remove(r)
        fp.close()
        sh("ip", "-n", lab.ns, "neigh", "flush", "to", peer)
