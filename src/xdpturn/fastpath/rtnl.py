"""The few rtnetlink questions the loader asks the kernel, answered synchronously.

A plain AF_NETLINK socket, so it works from any thread, inside a running asyncio loop too
(pyroute2's synchronous API drives an event loop of its own and cannot be called there). Only
what next hops and relay addresses need: a route lookup (RTM_GETROUTE, as `ip route get`), one
neighbour (RTM_GETNEIGH, as `ip neigh get`), one link (RTM_GETLINK) and the addresses of a link.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from xdpturn.proto.addr import IPAddress

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3

RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_METRICS = 1, 4, 5, 7, 8
RTAX_MTU = 2
NDA_DST, NDA_LLADDR = 1, 2
IFLA_ADDRESS, IFLA_MTU = 1, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


class NetlinkError(OSError):
    """The kernel answered a request with an error (errno set)."""


@dataclass(frozen=True, slots=True)
class Route:
    type: int  # RTN_*
    oif: int | None
    gateway: IPAddress | None
    prefsrc: IPAddress | None
    mtu: int | None  # a route's own MTU metric, if it has one


@dataclass(frozen=True, slots=True)
class Neighbour:
    state: int  # NUD_*
    lladdr: bytes | None


@dataclass(frozen=True, slots=True)
class Link:
    address: bytes | None
    mtu: int


@dataclass(frozen=True, slots=True)
class Address:
    ip: IPAddress
    scope: int


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + _RTATTR.size : offset + length]
        offset += _align(length)
    return out


def _attr(kind: int, value: bytes) -> bytes:
    length = _RTATTR.size + len(value)
    return _RTATTR.pack(length, kind) + value + b"\x00" * (_align(length) - length)


def _ip(raw: bytes | None) -> IPAddress | None:
    return ipaddress.ip_address(raw) if raw is not None and len(raw) in (4, 16) else None


class Rtnl:
    """A request/response rtnetlink socket in the namespace of the thread that made it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = itertools.count(1)

    def close(self) -> None:
        self._sock.close()

    def _request(self, kind: int, flags: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        """Send one request; yield (message type, payload) of every answer until it is done."""
        seq = next(self._seq)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0)
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, mtype, _, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
                payload = data[offset + _NLMSGHDR.size : offset + length]
                offset += _align(length)
                if mseq != seq:
                    continue  # the answer to an earlier request that timed out; not ours
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", payload)
                    if error:
                        raise NetlinkError(-error, os.strerror(-error))
                    return  # an acknowledgement
                yield mtype, payload
                if not flags & NLM_F_DUMP:
                    return

    def route_get(self, dst: IPAddress) -> Route:
        """The route the kernel would use to send to `dst` (raises NetlinkError if none)."""
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        body = _RTMSG.pack(family, 8 * len(dst.packed), 0, 0, 0, 0, 0, 0, 0)
        body += _attr(RTA_DST, dst.packed)
        for mtype, payload in self._request(RTM_GETROUTE, 0, body):
            if mtype != RTM_NEWROUTE:
                continue
            rtype = payload[7]
            attrs = _attrs(payload, _RTMSG.size)
            oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
            mtu = None
            if RTA_METRICS in attrs:
                metrics = _attrs(attrs[RTA_METRICS], 0)
                if RTAX_MTU in metrics:
                    mtu = struct.unpack("=I", metrics[RTAX_MTU])[0] or None
            return Route(rtype, oif, _ip(attrs.get(RTA_GATEWAY)), _ip(attrs.get(RTA_PREFSRC)), mtu)
        raise NetlinkError(0, "no route in the answer")

    def neighbour(self, ifindex: int, ip: IPAddress) -> Neighbour | None:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        body = _NDMSG.pack(family, ifindex, 0, 0, 0) + _attr(NDA_DST, ip.packed)
        try:
            for mtype, payload in self._request(RTM_GETNEIGH, 0, body):
                if mtype == RTM_NEWNEIGH:
                    _, _, state, _, _ = _NDMSG.unpack_from(payload)
                    return Neighbour(state, _attrs(payload, _NDMSG.size).get(NDA_LLADDR))
        except NetlinkError as e:
            if e.errno == 2:  # ENOENT: no entry
                return None
            raise
        return None

    def link(self, ifindex: int) -> Link:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
        for mtype, payload in self._request(RTM_GETLINK, 0, body):
            if mtype == RTM_NEWLINK:
                attrs = _attrs(payload, _IFINFOMSG.size)
                mtu = struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 1500
                return Link(attrs.get(IFLA_ADDRESS), mtu)
        raise NetlinkError(0, f"no link {ifindex}")

    def addresses(self, ifindex: int) -> list[Address]:
        out = []
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        for mtype, payload in self._request(RTM_GETADDR, NLM_F_DUMP, body):
            if mtype != RTM_NEWADDR:
                continue
            family, _, _, scope, index = _IFADDRMSG.unpack_from(payload)
            if index != ifindex:
                continue
            attrs = _attrs(payload, _IFADDRMSG.size)
            # IPv4: IFA_LOCAL is our address (IFA_ADDRESS is the far end on point-to-point).
            raw = attrs.get(IFA_LOCAL if family == socket.AF_INET else IFA_ADDRESS)
            ip = _ip(raw if raw is not None else attrs.get(IFA_ADDRESS))
            if ip is not None:
                out.append(Address(ip, scope))
        return out
