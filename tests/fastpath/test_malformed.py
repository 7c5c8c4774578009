"""Malformed input never leaves mis-forwarded: the verdict is PASS (frame untouched), or the output
is exactly what the headers, read strictly, say it should be."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fastpath import test_routes
from tests.fastpath.conftest import LOCAL4, LOCAL6, PEER_MAC, TURN_PORT, Lab, allocated
from tests.fastpath.packets import (
    channel_data,
    expected_frame,
    route,
    run,
    taddr,
    udp_frame,
)
from xdpturn.fastpath import libbpf as bpf

pytestmark = pytest.mark.kernel

CLIENT4 = taddr("192.0.2.10:50000")
PEER6 = taddr("[2001:db8:2::20]:6000")
PEER4 = taddr("198.51.100.20:6000")
RELAY = 50100
CHANNEL = 0x4321


@pytest.mark.parametrize(
    ("case", "payload", "pad"),
    test_routes.cases(),
    ids=[c.name for c, _, _ in test_routes.cases()],
)
def test_every_truncation_passes_untouched(
    lab: Lab, case: test_routes.Case, payload: bytes, pad: int
) -> None:
    fp = lab.fastpath
    for r in case.routes:
        fp.install(r)
    try:
        # BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (no driver hands
        # those to XDP either), so cuts start there.
        for cut in range(14, len(case.frame)):
            frame = case.frame[:cut]
            out = run(fp, lab.ns, lab.ifindex[case.ingress], frame)
            assert (out.action, out.frame) == (bpf.XDP_PASS, frame), f"cut at {cut}"
    finally:
        for r in case.routes:
            fp.remove(r)


def inet_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def udp_valid(src: bytes, dst: bytes, datagram: bytes) -> bool:
    """Does the datagram's checksum verify (the receiver's view)?"""
    if len(src) == 4 and datagram[6:8] == b"\x00\x00":
        return True
    pseudo = src + dst + struct.pack("!HH", 17, len(datagram))
    return inet_sum(pseudo + datagram) == 0xFFFF


def ipv4_header(frame: bytes, tot_len: int) -> bytes:
    hdr = bytearray(frame[14:34])
    hdr[2:4] = struct.pack("!H", tot_len)
    hdr[10:12] = b"\x00\x00"
    hdr[10:12] = struct.pack("!H", 0xFFFF - inet_sum(bytes(hdr)))
    return bytes(hdr)


def zero_udp_checksum(frame: bytes, udp_off: int) -> bytes:
    return frame[: udp_off + 6] + b"\x00\x00" + frame[udp_off + 8 :]


@pytest.fixture(scope="module")
def routed(lab: Lab) -> Iterator[Lab]:
    r = route(str(CLIENT4), CHANNEL, RELAY, str(PEER4))
    lab.fastpath.install(r)
    try:
        with allocated(lab.fastpath, [r, route(str(CLIENT4), CHANNEL + 1, RELAY, str(PEER6))]):
            yield lab
    finally:
        lab.fastpath.remove(r)


lies = st.integers(min_value=-5, max_value=5) | st.just(0)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=40),
    pad=st.integers(min_value=0, max_value=6),
    chd_lie=lies,
    ip_lie=lies,
    udp_lie=lies,
    trailer=st.binary(max_size=8),
)
def test_lying_channel_data_over_ipv4(
    routed: Lab, payload: bytes, pad: int, chd_lie: int, ip_lie: int, udp_lie: int, trailer: bytes
) -> None:
    honest = udp_frame(CLIENT4, taddr(f"{LOCAL4}:{TURN_PORT}"), channel_data(CHANNEL, payload, pad))
    tot_len = len(honest) - 14 + ip_lie
    udp_len = len(honest) - 34 + udp_lie
    chan_len = max(0, len(payload) + chd_lie)
    frame = (
        honest[:14]
        + ipv4_header(honest, tot_len)
        + honest[34:38]
        + struct.pack("!H", udp_len)
        + honest[40:44]
        + struct.pack("!H", chan_len)
        + honest[46:]
        + trailer
    )
    out = run(routed.fastpath, routed.ns, routed.ifindex["rly0"], frame)

    # The model: read the headers strictly, as a receiver would.
    datagram = frame[34 : 14 + tot_len]
    ok = (
        14 + tot_len <= len(frame)
        and udp_len == tot_len - 20
        and udp_len >= 12
        and chan_len + 4 <= udp_len - 8
        and udp_len - 12 - chan_len <= 3
    )
    # IP and UDP agree, but the ChannelData inside can never be valid: the guard drops it.
    lying_inside = (
        14 + tot_len <= len(frame)
        and udp_len == tot_len - 20
        and udp_len >= 8
        and (udp_len < 12 or chan_len + 4 > udp_len - 8)
    )
    event("forwarded" if ok else "dropped" if lying_inside else "passed")
    if lying_inside:
        assert out.action == bpf.XDP_DROP
        return
    if not ok:
        assert (out.action, out.frame) == (bpf.XDP_PASS, frame)
        return
    assert out.action == bpf.XDP_REDIRECT
    relayed = datagram[12 : 12 + chan_len]
    want = expected_frame(
        routed.mac["rly1"], PEER_MAC, taddr(f"{LOCAL4}:{RELAY}"), PEER4, relayed, ttl=63
    )
    assert zero_udp_checksum(out.frame, 34) == zero_udp_checksum(want, 34)
    # The checksum is carried over, not recomputed: valid out exactly when valid in.
    in_valid = udp_valid(frame[26:30], frame[30:34], datagram)
    assert udp_valid(out.frame[26:30], out.frame[30:34], out.frame[34:]) == in_valid


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.binary(max_size=40),
    ip_lie=lies,
    udp_lie=lies,
    trailer=st.binary(max_size=8),
)
def test_lying_udp_over_ipv6(
    routed: Lab, payload: bytes, ip_lie: int, udp_lie: int, trailer: bytes
) -> None:
    fp = routed.fastpath
    r = route(str(CLIENT4), CHANNEL + 1, RELAY, str(PEER6))
    fp.install(r)
    try:
        honest = udp_frame(PEER6, taddr(f"[{LOCAL6}]:{RELAY}"), payload)
        plen = len(honest) - 54 + ip_lie
        udp_len = len(honest) - 54 + udp_lie
        frame = (
            honest[:18]
            + struct.pack("!H", plen & 0xFFFF)
            + honest[20:58]
            + struct.pack("!H", udp_len & 0xFFFF)
            + honest[60:]
            + trailer
        )
        out = run(fp, routed.ns, routed.ifindex["rly1"], frame)
    finally:
        fp.remove(r)

    datagram = frame[54 : 54 + plen]
    ok = 54 + plen <= len(frame) and udp_len == plen and udp_len >= 8
    event("forwarded" if ok else "passed")
    if not ok:
        assert (out.action, out.frame) == (bpf.XDP_PASS, frame)
        return
    assert out.action == bpf.XDP_REDIRECT
    want = expected_frame(
        routed.mac["rly0"],
        "02:00:00:00:01:10",
        taddr(f"{LOCAL4}:{TURN_PORT}"),
        CLIENT4,
        channel_data(CHANNEL + 1, datagram[8:]),
        ttl=63,
    )
    assert zero_udp_checksum(out.frame, 34) == zero_udp_checksum(want, 34)
    in_valid = udp_valid(frame[22:38], frame[38:54], datagram)
    assert udp_valid(out.frame[26:30], out.frame[30:34], out.frame[34:]) == in_valid
