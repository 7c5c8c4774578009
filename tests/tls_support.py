"""Self-signed certificates for TLS tests, made by the openssl command (no Python crypto
package needed), and a relay configuration with TCP and TLS listeners on loopback."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.server.helpers import PUBLIC_V4, PUBLIC_V6, loopback_config
from tests.support import unavailable
from xdpturn.config import ServeConfig
from xdpturn.proto.addr import TransportAddr


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    name: str  # the subject's common name, to tell certificates apart


def make_certificate(directory: Path, name: str) -> Certificate:
    """A self-signed EC certificate for 127.0.0.1, ::1 and localhost, valid for two days."""
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Certificate(cert, key, name)


def stream_config(certificate: Certificate, **overrides: Any) -> ServeConfig:
    values: dict[str, Any] = {
        "public_ipv4": PUBLIC_V4,
        "public_ipv6": PUBLIC_V6,
        "listen_tcp": [TransportAddr.parse("127.0.0.1:0"), TransportAddr.parse("[::1]:0")],
        "listen_tls": [TransportAddr.parse("127.0.0.1:0")],
        "tls_cert": certificate.cert,
        "tls_key": certificate.key,
    }
    values.update(overrides)
    return loopback_config(**values)


def common_name(peer_certificate: dict[str, Any] | None) -> str | None:
    """The CN of a certificate as `getpeercert()` returns it."""
    if peer_certificate is None:
        return None
    for rdn in peer_certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
