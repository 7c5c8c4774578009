"""UDP helpers for testbed tests: a "who am I" echo and a request with bounded retries."""

from __future__ import annotations

import ipaddress
import socket
import threading
from types import TracebackType

from xdpturn_lab.testbed import NodeRef, Testbed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def udp_socket(tb: Testbed, node: NodeRef, family: socket.AddressFamily) -> socket.socket:
    """A UDP socket living in `node`'s namespace (usable from any thread afterwards)."""
    return tb.call(node, socket.socket, family, socket.SOCK_DGRAM)


def family_of(ip: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


class WhoAmI:
    """Answers every datagram with the sender's address as it arrived: b"IP PORT"."""

    def __init__(self, tb: Testbed, node: NodeRef, ip: IPAddress, port: int) -> None:
        self.sock = udp_socket(tb, node, family_of(ip))
        self.sock.bind((str(ip), port))
        self.sock.settimeout(0.05)
        self.seen: list[tuple[IPAddress, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                _, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            source = (ipaddress.ip_address(addr[0]), int(addr[1]))
            self.seen.append(source)
            self.sock.sendto(f"{source[0]} {source[1]}".encode(), addr)

    def __enter__(self) -> WhoAmI:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def request(
    sock: socket.socket, ip: IPAddress, port: int, payload: bytes, tries: int = 3
) -> tuple[bytes, tuple[IPAddress, int]]:
    """Send `payload` until a reply comes (first packets may wait on ARP/ND); reply and source."""
    sock.settimeout(1.0)
    for _ in range(tries):
        sock.sendto(payload, (str(ip), port))
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        return data, (ipaddress.ip_address(addr[0]), int(addr[1]))
    raise TimeoutError(f"no reply from {ip} port {port} after {tries} tries")


def parse_whoami(reply: bytes) -> tuple[IPAddress, int]:
    ip, port = reply.decode().split()
    return ipaddress.ip_address(ip), int(port)
