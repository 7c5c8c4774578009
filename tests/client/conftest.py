"""A coturn (`turnserver`) on loopback with TURN REST API auth, for interop tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import unavailable
from xdpturn.proto import stun
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.auth import Credentials, mint_rest_credentials

SECRET = "interop-secret"
REALM = "xdpturn.test"
# Relay ports outside the kernel's ephemeral range (32768-60999), so they never collide with the
# test's own sockets.
RELAY_PORTS = (61000, 61999)
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Coturn:
    server: TransportAddr
    secret: str
    realm: str
    log: Path

    def credentials(self, user: str = "tester") -> Credentials:
        return mint_rest_credentials(self.secret, now=time.time(), ttl=3600, user_id=user)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers_binding(port: int, deadline: float) -> bool:
    """Poll with STUN Binding requests until one is answered or `deadline` passes."""
    request = stun.encode(
        stun.Message(stun.Method.BINDING, stun.MessageClass.REQUEST, bytes(range(12)))
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                s.send(request)
                if stun.is_stun(s.recv(2048)):
                    return True
            except (TimeoutError, ConnectionRefusedError):
                continue  # not listening yet (refused) or not answering yet (timeout)
    return False


@pytest.fixture(scope="session")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    binary = shutil.which("turnserver")
    if binary is None:
        unavailable("coturn's turnserver is not installed")
    workdir = tmp_path_factory.mktemp("coturn")
    port = _free_udp_port()
    log = workdir / "turnserver.log"
    args = [
        binary,
        "-n",  # no configuration file: only these options
        "--use-auth-secret",
        f"--static-auth-secret={SECRET}",
        f"--realm={REALM}",
        "--listening-ip=127.0.0.1",
        f"--listening-port={port}",
        "--relay-ip=127.0.0.1",
        "--allow-loopback-peers",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-tcp-relay",
        "--no-cli",
        f"--min-port={RELAY_PORTS[0]}",
        f"--max-port={RELAY_PORTS[1]}",
        f"--userdb={workdir / 'turndb'}",
        f"--pidfile={workdir / 'turnserver.pid'}",
        f"--log-file={log}",
        "--simple-log",
    ]
    with open(workdir / "stdout.log", "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        if not _answers_binding(port, time.monotonic() + START_TIMEOUT):
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(f"turnserver did not answer on 127.0.0.1:{port}:\n{tail}")
        yield Coturn(TransportAddr.parse(f"127.0.0.1:{port}"), SECRET, REALM, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
