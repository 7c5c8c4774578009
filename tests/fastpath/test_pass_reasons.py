"""Everything the program cannot relay goes to the stack (XDP_PASS), untouched, reason counted.

With the guard on (the default), some of these are dropped instead (test_guard.py): they are
checked here with the guard off, the program's behaviour before the guard and with
--fastpath-guard off."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPOption_RR
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from tests.fastpath.conftest import (
    LOCAL4,
    LOCAL6,
    PUBLIC4,
    TURN_PORT,
    Lab,
    allocated,
    forwarding,
)
from tests.fastpath.packets import RELAY_MAC_IN, channel_data, route, run, taddr, udp_frame
from xdpturn.fastpath import GuardConfig
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.maps import reason_names
from xdpturn.fastpath.xdp import OBJECT_PATH

pytestmark = pytest.mark.kernel

C4, C6 = "192.0.2.10:50000", "[2001:db8:1::10]:50000"
P4, P6 = "198.51.100.20:6000", "[2001:db8:2::20]:6000"
RELAY = 50100
TURN4 = taddr(f"{LOCAL4}:{TURN_PORT}")
TURN6 = taddr(f"[{LOCAL6}]:{TURN_PORT}")
ETH = Ether(src="02:00:00:00:00:99", dst=RELAY_MAC_IN)

ROUTES = (
    route(C4, 0x4000, RELAY, P4),
    route(C6, 0x4000, RELAY, P6),
    route(C4, 0x4001, RELAY, P6),
    route(C4, 0x4002, RELAY, "198.51.100.99:6000"),  # on rly1's link, no neighbour
    route(C4, 0x4003, RELAY, "100.64.0.1:6000"),  # no route at all
    route(C4, 0x4004, RELAY, "198.51.100.130:6000"),  # behind rly2, MTU 1280
    route(C4, 0x4005, RELAY, f"{PUBLIC4}:50999"),  # the relay itself, no allocation there
    route(C4, 0x4006, RELAY, "198.51.100.131:6000"),  # behind rly2, no neighbour
)


def chd4(channel: int, payload: bytes = b"data", **kw: int) -> bytes:
    return udp_frame(taddr(C4), TURN4, channel_data(channel, payload, **kw))


def ipv4_udp(**ip: Any) -> Callable[[bytes], bytes]:
    def build(payload: bytes) -> bytes:
        return bytes(
            ETH
            / IP(src="192.0.2.10", dst=str(LOCAL4), **ip)
            / UDP(sport=50000, dport=TURN_PORT)
            / Raw(payload)
        )

    return build


def with_udp_checksum_zero(frame: bytes) -> bytes:
    pkt = Ether(frame)
    pkt[UDP].chksum = 0
    return bytes(pkt)


def patch(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value) :]


@dataclass(frozen=True)
class Case:
    reason: str
    frame: bytes
    ingress: str = "rly0"
    forwarding: bool = False  # on for the ingress device: the bpf_fib_lookup fallback answers
    guard: bool = True  # False: the guard drops it; checked with the guard off


def cases() -> Iterator[Case]:
    cd = channel_data(0x4000, b"data")
    yield Case("not_ip", bytes(ETH / ARP(pdst=str(LOCAL4))))
    yield Case("not_ip", bytes(ETH / Raw(b"\x00" * 46)))
    yield Case("not_udp", bytes(ETH / IP(src="192.0.2.10", dst=str(LOCAL4)) / ICMP()))
    yield Case("ipv4_options", ipv4_udp(options=[IPOption_RR()])(cd))
    yield Case(
        "ipv6_extension",
        bytes(
            ETH
            / IPv6(src="2001:db8:1::10", dst=str(LOCAL6))
            / IPv6ExtHdrHopByHop()
            / UDP(sport=50000, dport=TURN_PORT)
            / Raw(cd)
        ),
    )
    yield Case("fragment", ipv4_udp(flags="MF")(cd))
    yield Case("fragment", ipv4_udp(frag=100)(cd))
    yield Case(
        "fragment",
        bytes(
            ETH
            / IPv6(src="2001:db8:1::10", dst=str(LOCAL6))
            / IPv6ExtHdrFragment(m=1)
            / UDP(sport=50000, dport=TURN_PORT)
            / Raw(cd)
        ),
    )
    yield Case("truncated", chd4(0x4000)[:40])
    # UDP length one short of the IP payload
    yield Case("bad_length", patch(chd4(0x4000), 14 + 20 + 4, struct.pack("!H", 8 + 7)))
    yield Case("bad_ipv4_checksum", ipv4_udp(chksum=0x1234)(cd))
    yield Case("not_turn", udp_frame(taddr(C4), taddr(f"192.0.2.99:{TURN_PORT}"), cd))
    yield Case("not_turn", udp_frame(taddr(P4), taddr(f"{LOCAL4}:40000"), b"x"), "rly1")
    stun = bytes.fromhex("0001 0000 2112a442") + b"\x01" * 12
    yield Case("stun", udp_frame(taddr(C4), TURN4, stun))
    yield Case("bad_channel_number", chd4(0x8000), guard=False)
    yield Case("bad_channel_number", chd4(0xFFFF), guard=False)
    yield Case("bad_channel_length", chd4(0x4000, b"data", length=5), guard=False)
    yield Case("bad_channel_length", chd4(0x4000, b"data", pad=4))  # a known client
    yield Case("truncated", udp_frame(taddr(C4), TURN4, b"\x40\x00"), guard=False)
    yield Case("no_channel", chd4(0x4FFF))
    yield Case("no_channel", udp_frame(taddr("192.0.2.10:50001"), TURN4, cd), guard=False)
    yield Case("no_peer", udp_frame(taddr("198.51.100.20:6001"), taddr(f"{LOCAL4}:{RELAY}"), b"x"))
    yield Case("hairpin_no_route", chd4(0x4005))
    yield Case("zero_checksum", with_udp_checksum_zero(chd4(0x4001)))  # IPv4 in, IPv6 out
    yield Case(
        "zero_checksum",
        with_udp_checksum_zero(udp_frame(taddr(C6), TURN6, channel_data(0x4000, b"data"))),
    )
    yield Case("ttl_expired", udp_frame(taddr(C4), TURN4, cd, ttl=1))
    yield Case("ttl_expired", udp_frame(taddr(P4), taddr(f"{LOCAL4}:{RELAY}"), b"x", ttl=0), "rly1")
    yield Case("too_big", chd4(0x4004, b"y" * 1253))  # 20 + 8 + 1253 = 1281 > 1280 (next_hops)
    # Not in next_hops (no neighbour, no route), and the FIB cannot be asked on a host.
    yield Case("no_next_hop", chd4(0x4002))
    yield Case("no_next_hop", chd4(0x4003))
    # Where forwarding is on, bpf_fib_lookup answers for what next_hops lacks.
    yield Case("no_neighbour", chd4(0x4006), forwarding=True)
    yield Case("fib_failed", chd4(0x4003), forwarding=True)


ALL = list(cases())


@pytest.fixture(scope="module")
def installed(lab: Lab) -> Iterator[Lab]:
    for r in ROUTES:
        lab.fastpath.install(r)
    try:
        with allocated(lab.fastpath, ROUTES):
            yield lab
    finally:
        for r in ROUTES:
            lab.fastpath.remove(r)


@pytest.mark.parametrize("case", ALL, ids=[f"{i}-{c.reason}" for i, c in enumerate(ALL)])
def test_pass(installed: Lab, case: Case) -> None:
    fp = installed.fastpath
    before = fp.counters().passes
    if not case.guard:
        fp.guard.configure(GuardConfig(enabled=False))
    try:
        with forwarding(installed.ns, case.ingress) if case.forwarding else nullcontext():
            out = run(fp, installed.ns, installed.ifindex[case.ingress], case.frame)
    finally:
        fp.guard.configure(GuardConfig())
    assert out.action == bpf.XDP_PASS
    assert out.frame == case.frame, "a passed packet must reach the stack unchanged"
    after = fp.counters().passes
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved == {case.reason: 1}


def test_just_fits_the_mtu(installed: Lab) -> None:
    out = run(
        installed.fastpath, installed.ns, installed.ifindex["rly0"], chd4(0x4004, b"y" * 1252)
    )
    assert out.action == bpf.XDP_REDIRECT


def test_every_reason_has_a_case(installed: Lab) -> None:
    untestable = {"adjust_failed", "no_config"}  # see test_no_config below
    covered = {c.reason for c in ALL}
    names = set(installed.fastpath.counters().passes)
    assert names - covered - untestable == set()


def test_no_config() -> None:
    # A freshly loaded object whose config was never written passes everything.
    obj = bpf.BpfObject(OBJECT_PATH)
    try:
        frame = chd4(0x4000)
        res = bpf.prog_test_run(obj.program_fd("xdpturn"), frame)
        assert res.retval == bpf.XDP_PASS
        stats = obj.map("pass_stats")
        index = reason_names(bpf.read_btf(OBJECT_PATH)).index("no_config")
        counts = stats.lookup_percpu(index.to_bytes(4, "little"))
        assert sum(int.from_bytes(v, "little") for v in counts) == 1
    finally:
        obj.close()
