"""Loopback helpers for runtime tests: UDP sockets awaited with bounded timeouts."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from xdpturn.config import ServeConfig
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.auth import mint_rest_credentials
from xdpturn.proto.ports import PortRange

T = TypeVar("T")
TIMEOUT = 5.0
# Outside the kernel's ephemeral range (32768-60999 here), so test sockets never take them.
TEST_PORTS = PortRange(20000, 29999)
SECRET = "s3cret"
# The relay listens on loopback but tells clients documentation addresses, as a relay behind
# 1:1 NAT does. Peers on loopback are then plain peers: the core treats a peer at the relay's
# *public* address as the relay itself (packets to itself), never as a socket to send to.
PUBLIC_V4 = ipaddress.IPv4Address("203.0.113.1")
PUBLIC_V6 = ipaddress.IPv6Address("2001:db8::1")

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(coro: Coroutine[Any, Any, T], loop_factory: str = "asyncio") -> T:
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop_factory]) as runner:
        return runner.run(coro)


def loopback_config(**overrides: Any) -> ServeConfig:
    values: dict[str, Any] = {
        "listen": [TransportAddr.parse("127.0.0.1:0"), TransportAddr.parse("[::1]:0")],
        "ports": TEST_PORTS,
        "auth_secrets": [SECRET],
        "realm": "test.example",
        "allow_peers": [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")],
    }
    values.update(overrides)
    return ServeConfig(**values)


def behind_nat_config(**overrides: Any) -> ServeConfig:
    """`loopback_config` telling clients PUBLIC_V4 / PUBLIC_V6 (see there)."""
    return loopback_config(public_ipv4=PUBLIC_V4, public_ipv6=PUBLIC_V6, **overrides)


def rest_credentials(user_id: str = "test") -> tuple[str, str]:
    """A REST API username and password for SECRET, valid for ten minutes."""
    creds = mint_rest_credentials(SECRET, now=time.time(), ttl=600, user_id=user_id)
    return creds.username, creds.password


def udp(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((host, 0))
    return sock


def sockaddr(addr: TransportAddr) -> tuple[str, int]:
    return (str(addr.ip), addr.port)


def local(sock: socket.socket) -> TransportAddr:
    host, port = sock.getsockname()[:2]
    return TransportAddr(ipaddress.ip_address(host), port)


async def recv(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, TransportAddr]:
    """The next datagram on `sock`, waiting at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            try:
                data, (host, port, *_) = sock.recvfrom(65535)
                return data, TransportAddr(ipaddress.ip_address(host), port)
            except BlockingIOError:
                pass
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
