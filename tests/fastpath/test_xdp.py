"""The loader: layout against BTF, route churn through XdpFastPath, attach/detach on a veth."""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

from tests.fastpath.conftest import Lab, sh, unique_ns, wait_for
from tests.fastpath.packets import route
from xdpturn.fastpath import (
    FastPathConfig,
    FastPathMode,
    NullFastPath,
    maps,
    open_fastpath,
)
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.maps import check_layout
from xdpturn.fastpath.xdp import OBJECT_PATH, XdpFastPath
from xdpturn_lab.testbed import netns


def test_ctypes_layout_matches_btf() -> None:
    check_layout(OBJECT_PATH)


@pytest.mark.kernel
def test_churn_of_1000_routes_leaves_maps_empty(lab: Lab) -> None:
    fp = lab.fastpath
    routes = [
        route(
            f"192.0.2.{10 + i % 200}:{40000 + i}",
            0x4000 + i % 0x1000,
            50000 + i % 7,
            f"[2001:db8:2::{i:x}]:{6000 + i}" if i % 2 else f"198.51.100.{i % 100}:{6000 + i}",
        )
        for i in range(1000)
    ]
    for r in routes:
        fp.install(r)
    assert fp.routes == 1000
    assert len(list(fp.chan_to_udp.keys())) == 1000
    assert len(list(fp.udp_to_chan.keys())) == 1000
    for r in routes:
        fp.remove(r)
    assert fp.routes == 0
    assert list(fp.chan_to_udp.keys()) == []
    assert list(fp.udp_to_chan.keys()) == []
    for port in range(50000, 50007):
        assert fp.relay_ports.lookup(port.to_bytes(4, "little")) == b"\x00" * 4


@pytest.mark.kernel
def test_rebinding_a_channel_replaces_the_old_peer(lab: Lab) -> None:
    fp = lab.fastpath
    old = route("192.0.2.10:40000", 0x4000, 50000, "198.51.100.20:6000")
    new = route("192.0.2.10:40000", 0x4000, 50000, "198.51.100.21:6000")
    fp.install(old)
    fp.install(new)
    try:
        assert len(list(fp.udp_to_chan.keys())) == 1
    finally:
        fp.remove(new)
    assert list(fp.udp_to_chan.keys()) == []
    assert list(fp.chan_to_udp.keys()) == []


def xdp_of(ns: str, dev: str) -> object:
    return json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", dev))[0].get("xdp")


@pytest.mark.kernel
def test_attach_native_on_veth_and_detach_on_close(caplog: pytest.LogCaptureFixture) -> None:
    ns = unique_ns("xdpturn-att")
    netns.create(ns)
    try:
        sh("ip", "-n", ns, "link", "add", "rly0", "type", "veth", "peer", "name", "cli0")
        sh("ip", "-n", ns, "link", "set", "rly0", "up")
        sh("ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "rly0")
        config = FastPathConfig(mode=FastPathMode.AUTO, interfaces=["rly0"])
        with caplog.at_level(logging.INFO, logger="xdpturn.fastpath"), netns.entered(ns):
            fp = open_fastpath(config)
        try:
            assert isinstance(fp, XdpFastPath)
            assert fp.mode == "native"
            assert "native" in caplog.text
            attached = xdp_of(ns, "rly0")
            assert isinstance(attached, dict) and attached["mode"] == 1  # XDP_ATTACHED_DRV
            assert attached["prog"]["name"] == "xdpturn"
        finally:
            with netns.entered(ns):
                fp.close()
                fp.close()  # idempotent
        assert xdp_of(ns, "rly0") is None
    finally:
        netns.delete(ns)


@pytest.mark.kernel
def test_relay_addresses_are_every_address_of_every_interface() -> None:
    ns = unique_ns("xdpturn-att")
    netns.create(ns)
    try:
        for dev, peer in (("rly0", "cli0"), ("rly1", "peer1")):
            sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer)
        addrs = {
            "rly0": ["192.0.2.7/24", "192.0.2.8/24", "2001:db8::7/64", "2001:db8::8/64"],
            "rly1": ["198.51.100.7/24", "2001:db8:1::7/64"],
        }
        for dev, cidrs in addrs.items():
            for cidr in cidrs:
                sh("ip", "-n", ns, "addr", "add", cidr, "dev", dev, "nodad")
        with netns.entered(ns):
            fp = XdpFastPath(
                FastPathConfig(
                    mode=FastPathMode.GENERIC,
                    interfaces=["rly0", "rly1"],
                    public_ipv4=ipaddress.IPv4Address("203.0.113.1"),
                )
            )
        try:
            assert fp.mode == "generic"
            keeper = fp.next_hops
            assert keeper is not None
            want = {ipaddress.ip_address(c.split("/")[0]) for cs in addrs.values() for c in cs}
            want.add(ipaddress.IPv4Address("203.0.113.1"))
            assert keeper.relay_addrs == want
            for ip in want:
                assert fp.relay_addrs_map.lookup(bytes(maps.addr_key(ip))) == b"\x01"
            # No source configured: each destination's next hop gives it.
            raw = fp.config_map.lookup(b"\x00" * 4)
            assert raw is not None and raw[:20] == b"\x00" * 20
            # An address added while running is the relay's too; one removed is not.
            sh("ip", "-n", ns, "addr", "add", "192.0.2.9/24", "dev", "rly0")
            sh("ip", "-n", ns, "addr", "del", "192.0.2.8/24", "dev", "rly0")
            added, gone = ipaddress.IPv4Address("192.0.2.9"), ipaddress.IPv4Address("192.0.2.8")
            wait_for(lambda: added in keeper.relay_addrs and gone not in keeper.relay_addrs)
            assert fp.relay_addrs_map.lookup(bytes(maps.addr_key(gone))) is None
        finally:
            fp.close()
    finally:
        netns.delete(ns)


def test_off_and_unavailable_give_the_null_fast_path() -> None:
    off = open_fastpath(FastPathConfig(mode=FastPathMode.OFF, interfaces=[]))
    assert isinstance(off, NullFastPath)
    missing = open_fastpath(FastPathConfig(mode=FastPathMode.AUTO, interfaces=["no-such-if0"]))
    assert isinstance(missing, NullFastPath)
    assert missing.mode == "off"


def test_errors_carry_errno_text() -> None:
    with pytest.raises(bpf.BpfError) as info:
        bpf.BpfObject(OBJECT_PATH.with_name("missing.bpf.o"))
    assert info.value.errno != 0
    assert "missing.bpf.o" in str(info.value)
