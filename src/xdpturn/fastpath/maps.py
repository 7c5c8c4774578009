"""ctypes mirrors of bpf/shared.h, conversions from protocol types, and a layout check.

Addresses and ports are network order in the kernel structs, so they are BigEndianStructures:
ports are plain ints here and become network-order bytes in the map. `check_layout` compares every
struct's size and field offsets with the object's BTF, so the two definitions cannot drift apart.
"""

from __future__ import annotations

import ctypes
import ipaddress
from pathlib import Path

from xdpturn.fastpath.libbpf import BtfInfo, read_btf
from xdpturn.proto.addr import IPAddress, TransportAddr
from xdpturn.proto.meter import AllocationTraffic

FAMILY_IPV4 = 4
FAMILY_IPV6 = 6

_Addr16 = ctypes.c_uint8 * 16
_Addr4 = ctypes.c_uint8 * 4
_Pad3 = ctypes.c_uint8 * 3
_Pad2 = ctypes.c_uint8 * 2


class ChanKey(ctypes.BigEndianStructure):
    """struct xdpturn_chan_key: (client address, client port, channel)."""

    _fields_ = (
        ("client_addr", _Addr16),
        ("client_port", ctypes.c_uint16),
        ("channel", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", _Pad3),
    )


class ChanValue(ctypes.BigEndianStructure):
    """struct xdpturn_chan_value: the peer, and the allocation port to send from."""

    _fields_ = (
        ("peer_addr", _Addr16),
        ("peer_port", ctypes.c_uint16),
        ("relay_port", ctypes.c_uint16),
        ("peer_family", ctypes.c_uint8),
        ("pad", _Pad3),
    )


class UdpKey(ctypes.BigEndianStructure):
    """struct xdpturn_udp_key: (peer address, peer port, allocation port)."""

    _fields_ = (
        ("peer_addr", _Addr16),
        ("peer_port", ctypes.c_uint16),
        ("relay_port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", _Pad3),
    )


class UdpValue(ctypes.BigEndianStructure):
    """struct xdpturn_udp_value: the client and channel."""

    _fields_ = (
        ("client_addr", _Addr16),
        ("client_port", ctypes.c_uint16),
        ("channel", ctypes.c_uint16),
        ("client_family", ctypes.c_uint8),
        ("pad", _Pad3),
    )


class Config(ctypes.BigEndianStructure):
    """struct xdpturn_config (config[0]); an all-zero address is unset."""

    _fields_ = (
        ("local_ipv4", _Addr4),
        ("local_ipv6", _Addr16),
        ("turn_port", ctypes.c_uint16),
        ("pad", _Pad2),
    )


class AddrKey(ctypes.BigEndianStructure):
    """struct xdpturn_addr_key: the key of relay_addrs and next_hops."""

    _fields_ = (("addr", _Addr16), ("family", ctypes.c_uint8), ("pad", _Pad3))


class NextHop(ctypes.Structure):
    """struct xdpturn_next_hop. Addresses and MACs are bytes as on the wire; ifindex and mtu are
    host order (the program compares them with host-order values)."""

    _fields_ = (
        ("src", _Addr16),
        ("ifindex", ctypes.c_uint32),
        ("smac", ctypes.c_uint8 * 6),
        ("dmac", ctypes.c_uint8 * 6),
        ("mtu", ctypes.c_uint16),
        ("pad", _Pad2),
    )


class RouteStats(ctypes.Structure):
    """struct xdpturn_route_stats: host-order counters, one per CPU."""

    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


# --- The guard (bpf/guard.h) ---

GUARD_ENABLED = 1
GUARD_CLIENTS_COMPLETE = 2


class GuardConfig(ctypes.Structure):
    """struct xdpturn_guard_config (guard_config[0]): host-order nanoseconds and flags."""

    _fields_ = (
        ("source_interval_ns", ctypes.c_uint64),
        ("source_burst_ns", ctypes.c_uint64),
        ("total_interval_ns", ctypes.c_uint64),
        ("total_burst_ns", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 4),
    )


class ClientKey(ctypes.BigEndianStructure):
    """struct xdpturn_client_key: a UDP client with an allocation."""

    _fields_ = (
        ("addr", _Addr16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class PermissionKey(ctypes.BigEndianStructure):
    """struct xdpturn_permission_key: (allocation port, peer address) with a permission."""

    _fields_ = (
        ("peer_addr", _Addr16),
        ("relay_port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class SourceKey(ctypes.BigEndianStructure):
    """struct xdpturn_source_key: a source address (IPv6 cut to its /64)."""

    _fields_ = (("addr", _Addr16),)


NS_PER_S = 1_000_000_000


def guard_config(enabled: bool, per_source: float, total: float) -> GuardConfig:
    """Rates in datagrams per second (0: no limit); each bucket holds one second's worth, and
    at least one datagram."""
    source = max(1, round(NS_PER_S / per_source)) if per_source else 0
    everyone = max(1, round(NS_PER_S / total)) if total else 0
    return GuardConfig(
        source_interval_ns=source,
        source_burst_ns=max(NS_PER_S, source),
        total_interval_ns=everyone,
        total_burst_ns=max(NS_PER_S, everyone),
        flags=(GUARD_ENABLED | GUARD_CLIENTS_COMPLETE) if enabled else 0,
    )


def client_key(client: TransportAddr) -> ClientKey:
    return ClientKey(
        addr=_Addr16(*addr16(client.ip)), port=client.port, family=family_of(client.ip)
    )


def permission_key(relay_port: int, peer: IPAddress) -> PermissionKey:
    return PermissionKey(
        peer_addr=_Addr16(*addr16(peer)), relay_port=relay_port, family=family_of(peer)
    )


class MeterCounts(ctypes.Structure):
    """struct xdpturn_meter_counts: one direction of one allocation, on one CPU."""

    _fields_ = (
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("dropped_packets", ctypes.c_uint64),
        ("dropped_bytes", ctypes.c_uint64),
    )


class Meter(ctypes.Structure):
    """struct xdpturn_meter: alloc_meters value (per CPU), by enum xdpturn_direction."""

    _fields_ = (("dir", MeterCounts * 2),)


class Limit(ctypes.Structure):
    """struct xdpturn_limit: alloc_limits value, each direction's booked-until time (ns)."""

    _fields_ = (("booked_ns", ctypes.c_uint64 * 2),)


class MeterConfig(ctypes.Structure):
    """struct xdpturn_meter_config (meter_config[0]); rate_bps 0: no limit."""

    _fields_ = (
        ("rate_bps", ctypes.c_uint64),
        ("burst_ns", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 4),
    )


METER_ENABLED = 1


def meter_traffic(per_cpu: list[bytes]) -> AllocationTraffic:
    """An alloc_meters value summed over CPUs."""
    out = AllocationTraffic()
    for raw in per_cpu:
        m = Meter.from_buffer_copy(raw)
        for counts, into in zip(m.dir, (out.client_to_peer, out.peer_to_client), strict=True):
            into.packets += counts.packets
            into.bytes += counts.bytes
            into.dropped_packets += counts.dropped_packets
            into.dropped_bytes += counts.dropped_bytes
    return out


# ctypes mirror -> the C struct it mirrors
MIRRORS: dict[str, type[ctypes.Structure] | type[ctypes.BigEndianStructure]] = {
    "xdpturn_chan_key": ChanKey,
    "xdpturn_chan_value": ChanValue,
    "xdpturn_udp_key": UdpKey,
    "xdpturn_udp_value": UdpValue,
    "xdpturn_config": Config,
    "xdpturn_addr_key": AddrKey,
    "xdpturn_next_hop": NextHop,
    "xdpturn_route_stats": RouteStats,
    "xdpturn_guard_config": GuardConfig,
    "xdpturn_client_key": ClientKey,
    "xdpturn_permission_key": PermissionKey,
    "xdpturn_source_key": SourceKey,
    "xdpturn_meter_counts": MeterCounts,
    "xdpturn_meter": Meter,
    "xdpturn_limit": Limit,
    "xdpturn_meter_config": MeterConfig,
}

ROUTE_ENUM = "xdpturn_route"
REASON_ENUM = "xdpturn_reason"
DROP_ENUM = "xdpturn_drop"
DIRECTION_ENUM = "xdpturn_direction"
_ROUTE_PREFIX = "XDPTURN_ROUTE_"
_REASON_PREFIX = "XDPTURN_PASS_"
_DROP_PREFIX = "XDPTURN_DROP_"


class LayoutError(Exception):
    """The ctypes mirrors disagree with the object's BTF."""


def check_layout(obj_path: Path, btf: BtfInfo | None = None) -> None:
    """Raise LayoutError unless every mirror has the C struct's size and field offsets."""
    btf = btf if btf is not None else read_btf(obj_path)
    problems: list[str] = []
    for cname, mirror in MIRRORS.items():
        c = btf.structs.get(cname)
        if c is None:
            problems.append(f"struct {cname} not in BTF")
            continue
        if ctypes.sizeof(mirror) != c.size:
            problems.append(f"{cname}: size {ctypes.sizeof(mirror)} in Python, {c.size} in C")
        py_fields = {f[0]: getattr(mirror, f[0]).offset * 8 for f in mirror._fields_}
        if py_fields != c.member_bit_offsets:
            problems.append(f"{cname}: fields {py_fields} in Python, {c.member_bit_offsets} in C")
    for enum in (ROUTE_ENUM, REASON_ENUM, DROP_ENUM, DIRECTION_ENUM):
        if enum not in btf.enums:
            problems.append(f"enum {enum} not in BTF")
    if problems:
        raise LayoutError("; ".join(problems))


def _names(values: dict[str, int], prefix: str) -> list[str]:
    """Enum members by value, lower-cased without prefix, the trailing *_COUNT left out."""
    ordered = sorted((v, k) for k, v in values.items() if not k.endswith("_COUNT"))
    if [v for v, _ in ordered] != list(range(len(ordered))):
        raise LayoutError(f"enum with prefix {prefix} is not dense from 0")
    return [k.removeprefix(prefix).lower() for _, k in ordered]


def route_names(btf: BtfInfo) -> list[str]:
    """Counter names by route index, e.g. "ipv4_channel_to_ipv6_udp"."""
    return _names(btf.enums[ROUTE_ENUM], _ROUTE_PREFIX)


def reason_names(btf: BtfInfo) -> list[str]:
    """Pass-reason names by index, e.g. "no_channel"."""
    return _names(btf.enums[REASON_ENUM], _REASON_PREFIX)


def drop_names(btf: BtfInfo) -> list[str]:
    """Drop-reason names by index, e.g. "unknown_client"."""
    return _names(btf.enums[DROP_ENUM], _DROP_PREFIX)


def family_of(ip: IPAddress) -> int:
    return FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6


def addr16(ip: IPAddress) -> bytes:
    """16 bytes as the kernel keys hold them: IPv4 as ::ffff:a.b.c.d."""
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def chan_entry(
    client: TransportAddr, channel: int, relay_port: int, peer: TransportAddr
) -> tuple[ChanKey, ChanValue]:
    key = ChanKey(
        client_addr=_Addr16(*addr16(client.ip)),
        client_port=client.port,
        channel=channel,
        family=family_of(client.ip),
    )
    value = ChanValue(
        peer_addr=_Addr16(*addr16(peer.ip)),
        peer_port=peer.port,
        relay_port=relay_port,
        peer_family=family_of(peer.ip),
    )
    return key, value


def udp_entry(
    client: TransportAddr, channel: int, relay_port: int, peer: TransportAddr
) -> tuple[UdpKey, UdpValue]:
    key = UdpKey(
        peer_addr=_Addr16(*addr16(peer.ip)),
        peer_port=peer.port,
        relay_port=relay_port,
        family=family_of(peer.ip),
    )
    value = UdpValue(
        client_addr=_Addr16(*addr16(client.ip)),
        client_port=client.port,
        channel=channel,
        client_family=family_of(client.ip),
    )
    return key, value


def addr_key(ip: IPAddress) -> AddrKey:
    return AddrKey(addr=_Addr16(*addr16(ip)), family=family_of(ip))


def next_hop_entry(
    dst: IPAddress, ifindex: int, src: IPAddress, smac: bytes, dmac: bytes, mtu: int
) -> tuple[AddrKey, NextHop]:
    value = NextHop(
        src=_Addr16(*addr16(src)),
        ifindex=ifindex,
        smac=(ctypes.c_uint8 * 6)(*smac),
        dmac=(ctypes.c_uint8 * 6)(*dmac),
        mtu=min(mtu, 0xFFFF),
    )
    return addr_key(dst), value


def make_config(
    turn_port: int,
    local_ipv4: ipaddress.IPv4Address | None,
    local_ipv6: ipaddress.IPv6Address | None,
) -> Config:
    def packed(ip: IPAddress | None, size: int) -> bytes:
        return ip.packed if ip is not None else b"\x00" * size

    return Config(
        local_ipv4=_Addr4(*packed(local_ipv4, 4)),
        local_ipv6=_Addr16(*packed(local_ipv6, 16)),
        turn_port=turn_port,
    )
