"""Packet builders (scapy) and a runner for the XDP program under BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from xdpturn.fastpath import libbpf as bpf
from xdpturn.fastpath.xdp import XdpFastPath
from xdpturn.proto.addr import ClientAddr, PeerAddr, TransportAddr
from xdpturn.proto.commands import ChannelRoute
from xdpturn_lab.testbed import netns

# Bytes in front of the frame that the program may claim as headroom: 0xff exposes any byte of a
# grown header that it forgot to write.
META = b"\xff" * 32
RELAY_MAC_IN = "02:00:00:00:00:01"


def taddr(text: str) -> TransportAddr:
    return TransportAddr.parse(text)


def route(client: str, channel: int, relay_port: int, peer: str) -> ChannelRoute:
    return ChannelRoute(ClientAddr(taddr(client)), channel, relay_port, PeerAddr(taddr(peer)))


def channel_data(channel: int, payload: bytes, pad: int = 0, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack("!HH", channel, n) + payload + b"\x00" * pad


def ip_layer(src: str, dst: str, ttl: int = 64, tos: int = 0) -> Packet:
    if ipaddress.ip_address(src).version == 4:
        return IP(src=src, dst=dst, ttl=ttl, tos=tos)
    return IPv6(src=src, dst=dst, hlim=ttl, tc=tos)


def udp_frame(
    src: TransportAddr, dst: TransportAddr, payload: bytes, ttl: int = 64, tos: int = 0
) -> bytes:
    """A frame as it arrives at the relay: Ethernet / IP / UDP / payload, checksums by scapy."""
    pkt = (
        Ether(src="02:00:00:00:00:99", dst=RELAY_MAC_IN)
        / ip_layer(str(src.ip), str(dst.ip), ttl, tos)
        / UDP(sport=src.port, dport=dst.port)
        / Raw(payload)
    )
    return bytes(pkt)


def expected_frame(
    src_mac: str,
    dst_mac: str,
    src: TransportAddr,
    dst: TransportAddr,
    payload: bytes,
    ttl: int,
    tos: int = 0,
    zero_checksum: bool = False,
) -> bytes:
    """What the program must send, every field and checksum computed by scapy from scratch."""
    if src.ip.version == 4:
        ipl: Packet = IP(src=str(src.ip), dst=str(dst.ip), ttl=ttl, tos=tos, id=0, flags="DF")
    else:
        ipl = IPv6(src=str(src.ip), dst=str(dst.ip), hlim=ttl, tc=tos, fl=0)
    udp = (
        UDP(sport=src.port, dport=dst.port, chksum=0)
        if zero_checksum
        else UDP(sport=src.port, dport=dst.port)
    )
    return bytes(Ether(src=src_mac, dst=dst_mac) / ipl / udp / Raw(payload))


def udp_checksum_ok(frame: bytes) -> bool:
    """Does the UDP checksum in `frame` equal scapy's full recompute (0 allowed over IPv4)?"""
    pkt = Ether(frame)
    got = pkt[UDP].chksum
    if got == 0 and IP in pkt:
        return True
    again = pkt.copy()
    del again[UDP].chksum
    return bool(Ether(bytes(again))[UDP].chksum == got)


@dataclass(frozen=True)
class Outcome:
    action: int
    frame: bytes


def run(fp: XdpFastPath, ns: str, ifindex: int, frame: bytes) -> Outcome:
    """One BPF_PROG_TEST_RUN (repeat=1: a repeat would rerun on the rewritten buffer)."""
    with netns.entered(ns):
        r = bpf.prog_test_run(fp.prog_fd, frame, ingress_ifindex=ifindex, meta=META)
    return Outcome(r.retval, r.data)
