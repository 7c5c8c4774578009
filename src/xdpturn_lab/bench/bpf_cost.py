"""Per-route cost of the XDP program, measured with BPF_PROG_TEST_RUN.

Each route's packet runs many times with repeat=1 (a repeat > 1 would rerun the program on the
frame it already rewrote); the kernel times each run, and the median is reported. It builds its own
namespace with two veth pairs, routes and permanent neighbours (documentation prefixes), so the
next hop is found as on a real relay: from the next_hops map the loader fills (forwarding off, as
on a host), or with `--next-hop fib` from bpf_fib_lookup (forwarding on, next_hops emptied: what a
router, or a lookup through a device of its own, costs). `--meter` compares per-allocation
metering off, on (what a relay runs), and on with --max-bps-per-allocation set high enough to admit
every packet (the limit's own cost). Needs root.

    python -m xdpturn_lab.bench.bpf_cost [--runs N] [--next-hop map|fib|both]
                                         [--meter off|on|limit|all]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import statistics
import struct
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from xdpturn.fastpath import FastPathConfig, FastPathMode, maps
from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto.addr import ClientAddr, PeerAddr, TransportAddr
from xdpturn.proto.commands import ChannelRoute
from xdpturn_lab.testbed import netns

TURN_PORT = 3478
LOCAL = {4: "192.0.2.1", 6: "2001:db8:1::1"}
PUBLIC = {4: "203.0.113.1", 6: "2001:db8:ffff::1"}
CLIENT = {4: "192.0.2.10:50000", 6: "[2001:db8:1::10]:50000"}
CLIENT2 = {4: "192.0.2.11:50001", 6: "[2001:db8:1::11]:50001"}
PEER = {4: "198.51.100.20:6000", 6: "[2001:db8:2::20]:6000"}
RELAY_A, RELAY_B = 50100, 50200
PAYLOAD = b"\xab" * 100
_VERDICTS = {bpf.XDP_PASS: "PASS", bpf.XDP_TX: "TX", bpf.XDP_REDIRECT: "REDIRECT"}


@dataclass(frozen=True)
class RouteCost:
    route: str
    verdict: str
    ns_per_packet: float

    @property
    def mpps(self) -> float:
        return 1e3 / self.ns_per_packet if self.ns_per_packet else float("inf")


def _ta(text: str) -> TransportAddr:
    return TransportAddr.parse(text)


def _at(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _route(client: str, channel: int, relay_port: int, peer: str) -> ChannelRoute:
    return ChannelRoute(ClientAddr(_ta(client)), channel, relay_port, PeerAddr(_ta(peer)))


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return 0xFFFF - s


def _frame(src: str, dst: str, payload: bytes) -> bytes:
    """Ethernet / IP / UDP with correct checksums (no scapy: this module ships with the package)."""
    s, d = _ta(src), _ta(dst)
    udp_len = 8 + len(payload)
    eth = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x99"
    if s.ip.version == 4:
        pseudo = s.ip.packed + d.ip.packed + struct.pack("!BBH", 0, 17, udp_len)
    else:
        pseudo = s.ip.packed + d.ip.packed + struct.pack("!IxxxB", udp_len, 17)
    udp = struct.pack("!HHHH", s.port, d.port, udp_len, 0) + payload
    check = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    if s.ip.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                         s.ip.packed, d.ip.packed)  # fmt: skip
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        return eth + b"\x08\x00" + ip + udp
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, s.ip.packed, d.ip.packed)
    return eth + b"\x86\xdd" + ip6 + udp


def _cases() -> list[tuple[str, list[ChannelRoute], str, bytes]]:
    """(route name, routes, ingress device, frame) for the 12 routes."""
    out = []
    for a in (4, 6):
        for b in (4, 6):
            chd = struct.pack("!HH", 0x4000, len(PAYLOAD)) + PAYLOAD
            out.append(
                (
                    f"ipv{a}_channel_to_ipv{b}_udp",
                    [_route(CLIENT[a], 0x4000, RELAY_A, PEER[b])],
                    "rly0",
                    _frame(CLIENT[a], _at(LOCAL[a], TURN_PORT), chd),
                )
            )
            out.append(
                (
                    f"ipv{a}_channel_to_ipv{b}_channel",
                    [
                        _route(CLIENT[a], 0x4000, RELAY_A, _at(PUBLIC[b], RELAY_B)),
                        _route(CLIENT2[b], 0x4001, RELAY_B, _at(PUBLIC[b], RELAY_A)),
                    ],
                    "rly0",
                    _frame(CLIENT[a], _at(LOCAL[a], TURN_PORT), chd),
                )
            )
            out.append(
                (
                    f"ipv{a}_udp_to_ipv{b}_channel",
                    [_route(CLIENT[b], 0x4000, RELAY_A, PEER[a])],
                    "rly1",
                    _frame(PEER[a], _at(LOCAL[a], RELAY_A), PAYLOAD),
                )
            )
    return sorted(out, key=lambda c: c[0])


def _setup(ns: str, forwarding: bool) -> None:
    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

    for i, peer in ((0, "cli0"), (1, "peer1")):
        ip("link", "add", f"rly{i}", "type", "veth", "peer", "name", peer)
        ip("link", "set", f"rly{i}", "up")
        ip("link", "set", peer, "up")
        for fam in ("ipv4", "ipv6"):
            value = int(forwarding)
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    f"net.{fam}.conf.rly{i}.forwarding={value}",
                ],
                check=True,
            )
    ip("addr", "add", "192.0.2.1/24", "dev", "rly0")
    ip("addr", "add", "2001:db8:1::1/64", "dev", "rly0", "nodad")
    ip("addr", "add", "198.51.100.1/24", "dev", "rly1")
    ip("addr", "add", "2001:db8:2::1/64", "dev", "rly1", "nodad")
    for dev, addr in (
        ("rly0", "192.0.2.10"),
        ("rly0", "192.0.2.11"),
        ("rly0", "2001:db8:1::10"),
        ("rly0", "2001:db8:1::11"),
        ("rly1", "198.51.100.20"),
        ("rly1", "2001:db8:2::20"),
    ):
        ip("neigh", "replace", addr, "lladdr", "02:00:00:00:00:42", "nud", "permanent", "dev", dev)


NEXT_HOPS = ("map", "fib")


# Per-allocation metering: off, on (what a relay runs), on with a limit that admits everything.
METER_MODES = ("off", "on", "limit")
_NEVER_LIMITED = 10**15  # bits per second


def _set_meter(fp: XdpFastPath, mode: str) -> None:
    cfg = maps.MeterConfig(
        rate_bps=_NEVER_LIMITED if mode == "limit" else 0,
        burst_ns=10**9,
        flags=0 if mode == "off" else maps.METER_ENABLED,
    )
    fp.meter_config.update(b"\x00" * 4, bytes(cfg))


def run(
    runs: int = 2000, next_hop: str = "map", meters: Sequence[str] = ("on",)
) -> dict[str, list[RouteCost]]:
    """Median kernel-timed cost of one packet per route, over `runs` single runs, with the next
    hop from the next_hops map ("map") or from bpf_fib_lookup ("fib"), for each per-allocation
    metering mode in `meters` (METER_MODES). The modes take turns run by run, so whatever else
    loads the machine weighs on each alike."""
    if next_hop not in NEXT_HOPS:
        raise ValueError(f"next_hop must be one of {NEXT_HOPS}, not {next_hop!r}")
    for meter in meters:
        if meter not in METER_MODES:
            raise ValueError(f"meter must be one of {METER_MODES}, not {meter!r}")
    ns = f"xdpturn-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    fp: XdpFastPath | None = None
    try:
        _setup(ns, forwarding=next_hop == "fib")
        with netns.entered(ns):  # the loader reads next hops from this namespace's tables
            fp = XdpFastPath(
                FastPathConfig(
                    mode=FastPathMode.AUTO,
                    interfaces=[],
                    turn_port=TURN_PORT,
                    public_ipv4=ipaddress.IPv4Address(PUBLIC[4]),
                    public_ipv6=ipaddress.IPv6Address(PUBLIC[6]),
                    local_ipv4=ipaddress.IPv4Address(LOCAL[4]),
                    local_ipv6=ipaddress.IPv6Address(LOCAL[6]),
                )
            )
        for port in (RELAY_A, RELAY_B):
            fp.open_allocation(port)
        results: dict[str, list[RouteCost]] = {meter: [] for meter in meters}
        with netns.entered(ns):
            ifindex = {d: socket.if_nametoindex(d) for d in ("rly0", "rly1")}
            for name, routes, ingress, frame in _cases():
                for r in routes:
                    fp.install(r)
                    if next_hop == "fib":  # the program falls back to bpf_fib_lookup
                        for ip in (r.client.ip, r.peer.ip):
                            with contextlib.suppress(OSError):
                                fp.next_hops_map.delete(bytes(maps.addr_key(ip)))
                try:
                    times: dict[str, list[int]] = {meter: [] for meter in meters}
                    verdict = 0
                    for _ in range(runs):
                        for meter in meters:
                            _set_meter(fp, meter)
                            res = bpf.prog_test_run(
                                fp.prog_fd, frame, ingress_ifindex=ifindex[ingress]
                            )
                            times[meter].append(res.duration_ns)
                            verdict = res.retval
                    for meter in meters:
                        results[meter].append(
                            RouteCost(
                                name,
                                _VERDICTS.get(verdict, str(verdict)),
                                statistics.median(times[meter]),
                            )
                        )
                finally:
                    for r in routes:
                        fp.remove(r)
        return results
    finally:
        if fp is not None:
            fp.close()
        netns.delete(ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=2000, help="single runs per route")
    parser.add_argument(
        "--next-hop",
        choices=(*NEXT_HOPS, "both"),
        default="map",
        help="where the program finds the next hop: next_hops map (a host), bpf_fib_lookup "
        "(a router), or both side by side",
    )
    parser.add_argument(
        "--meter",
        choices=(*METER_MODES, "all"),
        default="on",
        help="per-allocation metering: off, on (as a relay runs), on with a rate limit that "
        "admits every packet, or all three side by side",
    )
    args = parser.parse_args(argv)
    kinds = NEXT_HOPS if args.next_hop == "both" else (args.next_hop,)
    meters = METER_MODES if args.meter == "all" else (args.meter,)
    try:
        by_kind = {kind: run(args.runs, kind, meters) for kind in kinds}
    except OSError as e:
        print(f"bpf_cost: {e} (needs root, BPF and network namespaces)", file=sys.stderr)
        return 1
    columns = [(kind, meter) for kind in kinds for meter in meters]
    header = "".join(
        f" {'ns (' + kind + ', meter ' + meter + ')':>22} {'Mpps':>6}" for kind, meter in columns
    )
    print(f"{'route':<32} {'verdict':<9}{header}")
    for i, c in enumerate(by_kind[kinds[0]][meters[0]]):
        cells = "".join(
            f" {by_kind[k][m][i].ns_per_packet:>22.0f} {by_kind[k][m][i].mpps:>6.2f}"
            for k, m in columns
        )
        print(f"{c.route:<32} {c.verdict:<9}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
