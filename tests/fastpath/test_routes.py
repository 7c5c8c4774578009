"""Each of the 12 routes through BPF_PROG_TEST_RUN: every output byte against scapy's own build."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from tests.fastpath.conftest import (
    CLIENT2_MAC,
    CLIENT_MAC,
    LOCAL4,
    LOCAL6,
    PEER_MAC,
    PUBLIC4,
    PUBLIC6,
    TURN_PORT,
    Lab,
)
from tests.fastpath.packets import (
    channel_data,
    expected_frame,
    route,
    run,
    taddr,
    udp_checksum_ok,
    udp_frame,
)
from xdpturn.fastpath import libbpf as bpf
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.commands import ChannelRoute

pytestmark = pytest.mark.kernel

CLIENT = {4: "192.0.2.10:50000", 6: "[2001:db8:1::10]:50000"}
CLIENT2 = {4: "192.0.2.11:50001", 6: "[2001:db8:1::11]:50001"}
PEER = {4: "198.51.100.20:6000", 6: "[2001:db8:2::20]:6000"}
LOCAL = {4: LOCAL4, 6: LOCAL6}
PUBLIC = {4: PUBLIC4, 6: PUBLIC6}
RELAY_A = 50100
RELAY_B = 50200
PAYLOAD = b"hello, relayed world"  # 20 bytes
ODD_PAYLOAD = b"odd-length payload!"  # 19 bytes: one padding byte sits in an odd position


def at(ip: object, port: int) -> TransportAddr:
    return taddr(f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}")


@dataclass(frozen=True)
class Case:
    name: str  # the route counter that must move
    routes: tuple[ChannelRoute, ...]
    ingress: str
    frame: bytes
    action: int
    egress: str  # device whose MAC is the source
    dst_mac: str
    expected: bytes


def channel_to_udp(cf: int, pf: int, payload: bytes, pad: int) -> Case:
    ch = 0x4000 + 16 * cf + pf
    r = route(CLIENT[cf], ch, RELAY_A, PEER[pf])
    frame = udp_frame(
        taddr(CLIENT[cf]), at(LOCAL[cf], TURN_PORT), channel_data(ch, payload, pad=pad)
    )
    return Case(
        f"ipv{cf}_channel_to_ipv{pf}_udp",
        (r,),
        "rly0",
        frame,
        bpf.XDP_REDIRECT,
        "rly1",
        PEER_MAC,
        b"",
    )


def udp_to_channel(pf: int, cf: int, payload: bytes) -> Case:
    ch = 0x4100 + 16 * cf + pf
    r = route(CLIENT[cf], ch, RELAY_A, PEER[pf])
    frame = udp_frame(taddr(PEER[pf]), at(LOCAL[pf], RELAY_A), payload)
    return Case(
        f"ipv{pf}_udp_to_ipv{cf}_channel",
        (r,),
        "rly1",
        frame,
        bpf.XDP_REDIRECT,
        "rly0",
        CLIENT_MAC,
        b"",
    )


def hairpin(af: int, bf: int, payload: bytes, pad: int, via_local: bool = False) -> Case:
    # Client A (allocation RELAY_A) sends on 0x4001 to B's relayed address (relay, RELAY_B); B
    # bound 0x4002 to A's relayed address. The packet must go straight to B.
    relay_ip = LOCAL[bf] if via_local else PUBLIC[bf]
    a = route(CLIENT[af], 0x4001, RELAY_A, str(at(relay_ip, RELAY_B)))
    b = route(CLIENT2[bf], 0x4002, RELAY_B, str(at(relay_ip, RELAY_A)))
    frame = udp_frame(
        taddr(CLIENT[af]), at(LOCAL[af], TURN_PORT), channel_data(0x4001, payload, pad=pad)
    )
    return Case(
        f"ipv{af}_channel_to_ipv{bf}_channel",
        (a, b),
        "rly0",
        frame,
        bpf.XDP_TX,
        "rly0",
        CLIENT2_MAC,
        b"",
    )


def expected_for(case: Case, lab: Lab, payload: bytes, pad: int) -> bytes:
    """The output frame, from the case's routes, built by scapy."""
    src_mac = lab.mac[case.egress]
    first = case.routes[0]
    if "_udp_to_" in case.name:
        return expected_frame(
            src_mac,
            case.dst_mac,
            at(LOCAL[first.client.ip.version], TURN_PORT),
            first.client,
            channel_data(first.channel, payload),
            ttl=63,
        )
    if case.name.endswith("_udp"):
        return expected_frame(
            src_mac,
            case.dst_mac,
            at(LOCAL[first.peer.ip.version], first.relay_port),
            first.peer,
            payload,
            ttl=63,
        )
    other = case.routes[1]
    return expected_frame(
        src_mac,
        case.dst_mac,
        at(LOCAL[other.client.ip.version], TURN_PORT),
        other.client,
        channel_data(other.channel, payload, pad=pad),
        ttl=63,
    )


def cases() -> list[tuple[Case, bytes, int]]:
    out: list[tuple[Case, bytes, int]] = []
    for a in (4, 6):
        for b in (4, 6):
            out.append((channel_to_udp(a, b, ODD_PAYLOAD, 1), ODD_PAYLOAD, 1))
            out.append((udp_to_channel(a, b, ODD_PAYLOAD), ODD_PAYLOAD, 0))
            out.append((hairpin(a, b, PAYLOAD, 0), PAYLOAD, 0))
    out.append((channel_to_udp(4, 6, PAYLOAD, 0), PAYLOAD, 0))
    out.append((channel_to_udp(6, 4, b"x", 3), b"x", 3))
    out.append((hairpin(4, 6, ODD_PAYLOAD, 1, via_local=True), ODD_PAYLOAD, 1))
    return out


def describe(frame: bytes) -> str:
    return str(Ether(frame).show2(dump=True))


@pytest.mark.parametrize(
    ("case", "payload", "pad"),
    cases(),
    ids=[f"{c.name}-len{len(p)}-pad{pad}" for c, p, pad in cases()],
)
def test_route(lab: Lab, case: Case, payload: bytes, pad: int) -> None:
    fp = lab.fastpath
    for r in case.routes:
        fp.install(r)
    try:
        before = fp.counters().routes[case.name]
        out = run(fp, lab.ns, lab.ifindex[case.ingress], case.frame)
        want = expected_for(case, lab, payload, pad)
        assert out.action == case.action
        assert out.frame == want, f"got:\n{describe(out.frame)}\nwant:\n{describe(want)}"
        assert udp_checksum_ok(out.frame)
        pkt = Ether(out.frame)
        if IP in pkt:
            again = pkt.copy()
            del again[IP].chksum
            assert Ether(bytes(again))[IP].chksum == pkt[IP].chksum
        assert fp.counters().routes[case.name] == (before[0] + 1, before[1] + len(want))
    finally:
        for r in case.routes:
            fp.remove(r)


def test_peer_on_ingress_link_is_sent_back_with_xdp_tx(lab: Lab) -> None:
    fp = lab.fastpath
    r = route(CLIENT[4], 0x4ABC, RELAY_A, "192.0.2.30:7000")
    fp.install(r)
    try:
        frame = udp_frame(taddr(CLIENT[4]), at(LOCAL4, TURN_PORT), channel_data(0x4ABC, PAYLOAD))
        out = run(fp, lab.ns, lab.ifindex["rly0"], frame)
        assert out.action == bpf.XDP_TX
        want = expected_frame(
            lab.mac["rly0"],
            "02:00:00:00:01:30",
            at(LOCAL4, RELAY_A),
            taddr("192.0.2.30:7000"),
            PAYLOAD,
            ttl=63,
        )
        assert out.frame == want
    finally:
        fp.remove(r)


def test_zero_ipv4_checksum_stays_zero_to_ipv4(lab: Lab) -> None:
    fp = lab.fastpath
    r = route(CLIENT[4], 0x4001, RELAY_A, PEER[4])
    fp.install(r)
    try:
        pkt = Ether(udp_frame(taddr(CLIENT[4]), at(LOCAL4, TURN_PORT), channel_data(0x4001, b"z")))
        pkt["UDP"].chksum = 0
        out = run(fp, lab.ns, lab.ifindex["rly0"], bytes(pkt))
        assert out.action == bpf.XDP_REDIRECT
        want = expected_frame(
            lab.mac["rly1"],
            PEER_MAC,
            at(LOCAL4, RELAY_A),
            taddr(PEER[4]),
            b"z",
            ttl=63,
            zero_checksum=True,
        )
        assert out.frame == want
    finally:
        fp.remove(r)


def test_tos_is_carried_across_families(lab: Lab) -> None:
    fp = lab.fastpath
    r = route(CLIENT[4], 0x4001, RELAY_A, PEER[6])
    fp.install(r)
    try:
        frame = udp_frame(
            taddr(CLIENT[4]), at(LOCAL4, TURN_PORT), channel_data(0x4001, PAYLOAD), ttl=9, tos=0xB8
        )
        out = run(fp, lab.ns, lab.ifindex["rly0"], frame)
        want = expected_frame(
            lab.mac["rly1"],
            PEER_MAC,
            at(LOCAL6, RELAY_A),
            taddr(PEER[6]),
            PAYLOAD,
            ttl=8,
            tos=0xB8,
        )
        assert out.frame == want
    finally:
        fp.remove(r)
