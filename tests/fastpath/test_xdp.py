"""The loader: layout against BTF, route churn through XdpFastPath, attach/detach on a veth."""

from __future__ import annotations

import ipaddress
import json
import logging

import pytest

from tests.fastpath.conftest import Lab, sh, unique_ns
from tests.fastpath.packets import route
from xdpturn.fastpath import (
    FastPathConfig,
    FastPathMode,
    NullFastPath,
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
def test_local_address_defaults_to_the_interface() -> None:
    ns = unique_ns("xdpturn-att")
    netns.create(ns)
    try:
        sh("ip", "-n", ns, "link", "add", "rly0", "type", "veth", "peer", "name", "cli0")
        sh("ip", "-n", ns, "addr", "add", "192.0.2.7/24", "dev", "rly0")
        sh("ip", "-n", ns, "addr", "add", "2001:db8::7/64", "dev", "rly0", "nodad")
        with netns.entered(ns):
            fp = XdpFastPath(FastPathConfig(mode=FastPathMode.GENERIC, interfaces=["rly0"]))
            try:
                assert fp.mode == "generic"
                raw = fp.config_map.lookup(b"\x00" * 4)
                assert raw is not None
                assert raw[4:8] == ipaddress.IPv4Address("192.0.2.7").packed  # local_ipv4
                assert raw[0:4] == raw[4:8]  # public defaults to local
                assert raw[24:40] == ipaddress.IPv6Address("2001:db8::7").packed
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
