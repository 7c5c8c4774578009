"""Keeping the kernel path over a restart (xdpturn.fastpath.pinning, XdpFastPath's handover):
the next process's program replaces the old one atomically on the same maps, entries the restored
core no longer wants are removed, and an object whose maps differ is refused."""

from __future__ import annotations

import copy
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fastpath.conftest import sh, unique_ns
from xdpturn.fastpath import FastPathConfig, FastPathMode, maps, pinning
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.xdp import OBJECT_PATH, XdpFastPath
from xdpturn.proto.addr import ClientAddr, ClientFlow, PeerAddr, TransportAddr
from xdpturn.proto.commands import ChannelRoute
from xdpturn_lab.testbed import netns

pytestmark = pytest.mark.kernel

ROUTE_A = ChannelRoute(
    ClientAddr(TransportAddr.parse("192.0.2.10:5000")),
    0x4000,
    61000,
    PeerAddr(TransportAddr.parse("198.51.100.20:7000")),
)
ROUTE_B = ChannelRoute(
    ClientAddr(TransportAddr.parse("192.0.2.11:5000")),
    0x4001,
    61001,
    PeerAddr(TransportAddr.parse("198.51.100.20:7001")),
)


@pytest.fixture
def bpffs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "bpffs"
    root.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.fixture
def ns() -> Iterator[str]:
    name = unique_ns("xdpturn-pin")
    netns.create(name)
    try:
        sh("ip", "-n", name, "link", "add", "rly0", "type", "veth", "peer", "name", "cli0")
        sh("ip", "-n", name, "link", "add", "rly1", "type", "veth", "peer", "name", "cli1")
        sh("ip", "-n", name, "addr", "add", "192.0.2.1/24", "dev", "rly0")
        with netns.entered(name):
            yield name
    finally:
        netns.delete(name)


def config(bpffs: Path, tmp_path: Path, interfaces: tuple[str, ...] = ("rly0",)) -> FastPathConfig:
    return FastPathConfig(
        mode=FastPathMode.GENERIC,
        interfaces=list(interfaces),
        pin_dir=pinning.pin_dir_for(tmp_path / "state", bpffs),
    )


def attached_id(ifname: str = "rly0") -> int:
    return bpf.xdp_query(socket.if_nametoindex(ifname)).prog_id


def has_route(fp: XdpFastPath, route: ChannelRoute) -> bool:
    ck, _ = maps.chan_entry(route.client, route.channel, route.relay_port, route.peer)
    uk, _ = maps.udp_entry(route.client, route.channel, route.relay_port, route.peer)
    return fp.chan_to_udp.lookup(bytes(ck)) is not None and (
        fp.udp_to_chan.lookup(bytes(uk)) is not None
    )


def port_users(fp: XdpFastPath, port: int) -> int:
    raw = fp.relay_ports.lookup(port.to_bytes(4, "little"))
    assert raw is not None
    return int.from_bytes(raw, "little")


def announce(fp: XdpFastPath, route: ChannelRoute) -> None:
    """What the core announces for an allocation with one bound channel."""
    fp.allocation_opened(ClientFlow(route.client), route.relay_port)
    fp.permit(route.relay_port, route.peer.ip)
    fp.install(route)


def guarded(fp: XdpFastPath, route: ChannelRoute) -> tuple[bool, bool, int]:
    """(client known, peer permitted, allocations on the port) in the guard's maps."""
    port = fp.guard.ports.lookup(route.relay_port.to_bytes(4, "little"))
    assert port is not None
    return (
        fp.guard.clients.lookup(bytes(maps.client_key(route.client))) is not None,
        fp.guard.permissions.lookup(bytes(maps.permission_key(route.relay_port, route.peer.ip)))
        is not None,
        int.from_bytes(port, "little"),
    )


def kept(bpffs: Path, tmp_path: Path) -> tuple[dict[str, Any], int]:
    """A fast path with routes A and B, kept for a restart: (handover, its program id)."""
    old = XdpFastPath(config(bpffs, tmp_path))
    for route in (ROUTE_A, ROUTE_B):
        announce(old, route)
    handover = old.keep_for_restart()
    return handover, handover["program_id"]


def test_the_next_process_adopts_the_maps_and_replaces_the_program(
    ns: str, bpffs: Path, tmp_path: Path
) -> None:
    handover, old_id = kept(bpffs, tmp_path)
    assert attached_id() == old_id  # still attached with no process holding it
    pins = config(bpffs, tmp_path).pin_dir
    assert pins is not None and (pins / "program").exists()
    assert sorted(p.name for p in (pins / "maps").iterdir()) == sorted(handover["maps"])

    new = XdpFastPath(config(bpffs, tmp_path), handover=handover)
    try:
        assert new.adopted and attached_id() not in (0, old_id)
        assert has_route(new, ROUTE_A) and has_route(new, ROUTE_B)  # the same maps
        assert not pins.exists()  # adopted: pinned again only at the next stop
        assert guarded(new, ROUTE_B) == (True, True, 1)
        announce(new, ROUTE_A)  # the restored core wants A only (B's allocation lapsed meanwhile)
        new.settle()
        assert has_route(new, ROUTE_A) and not has_route(new, ROUTE_B)
        assert guarded(new, ROUTE_A) == (True, True, 1)
        assert guarded(new, ROUTE_B) == (False, False, 0)
        assert (port_users(new, ROUTE_A.relay_port), port_users(new, ROUTE_B.relay_port)) == (1, 0)
    finally:
        new.close()
    assert attached_id() == 0


def test_an_object_whose_maps_differ_is_refused_and_changes_nothing(
    ns: str, bpffs: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.bpf.o"
    multiarch = sh("gcc", "-print-multiarch").strip()
    sh(
        "clang-16", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
        f"-I/usr/include/{multiarch}", "-DXDPTURN_MAX_ROUTES=1024",
        "-c", str(OBJECT_PATH.parent / "main.c"), "-o", str(other),
    )  # fmt: skip
    handover, old_id = kept(bpffs, tmp_path)
    with pytest.raises(pinning.LayoutMismatch, match=r"map chan_to_udp: .*65536 entries"):
        XdpFastPath(config(bpffs, tmp_path), object_path=other, handover=handover)
    assert attached_id() == old_id
    pins = config(bpffs, tmp_path).pin_dir
    assert pins is not None and (pins / "program").exists()
    pinning.discard(pins, ["rly0"])
    assert attached_id() == 0 and not pins.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["layouts"]["structs"]["xdpturn_chan_key"].update(size=32), "struct"),
        (lambda h: h["layouts"]["enums"]["xdpturn_route"].update(XDPTURN_ROUTE_COUNT=99), "enum"),
    ],
    ids=["struct", "enum"],
)
def test_btf_layouts_that_differ_are_refused(
    ns: str, bpffs: Path, tmp_path: Path, edit: Any, message: str
) -> None:
    """As if the old program had been built from other headers."""
    handover, old_id = kept(bpffs, tmp_path)
    changed = copy.deepcopy(handover)
    edit(changed)
    with pytest.raises(pinning.LayoutMismatch, match=message):
        XdpFastPath(config(bpffs, tmp_path), handover=changed)
    assert attached_id() == old_id
    pins = config(bpffs, tmp_path).pin_dir
    assert pins is not None
    pinning.discard(pins, ["rly0"])


def test_a_missing_pinned_map_cannot_be_adopted(ns: str, bpffs: Path, tmp_path: Path) -> None:
    handover, old_id = kept(bpffs, tmp_path)
    pins = config(bpffs, tmp_path).pin_dir
    assert pins is not None
    (pins / "maps" / "relay_ports").unlink()
    with pytest.raises(pinning.AdoptError, match="pinned map relay_ports missing"):
        XdpFastPath(config(bpffs, tmp_path), handover=handover)
    assert attached_id() == old_id  # left for the caller to discard (it starts clean)
    pinning.discard(pins, ["rly0"])
    assert attached_id() == 0 and not pins.exists()


def test_an_interface_the_next_process_drops_is_let_go(
    ns: str, bpffs: Path, tmp_path: Path
) -> None:
    old = XdpFastPath(config(bpffs, tmp_path, ("rly0", "rly1")))
    handover = old.keep_for_restart()
    assert attached_id("rly1") == handover["program_id"]
    new = XdpFastPath(config(bpffs, tmp_path, ("rly0",)), handover=handover)
    try:
        assert attached_id("rly0") not in (0, handover["program_id"])
        assert attached_id("rly1") == 0
    finally:
        new.close()
