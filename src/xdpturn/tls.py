"""TLS contexts for TURN over TLS (RFC 8656 section 3.1), kept apart so that configuration
checks and the runtime build them the same way."""

from __future__ import annotations

import ssl
from pathlib import Path

# RFC 7443: the ALPN id for TURN, so a TLS front end on port 443 can tell TURN from HTTPS.
ALPN_TURN = "stun.turn"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with the PEM certificate chain and key. Raises OSError (unreadable
    file) or ssl.SSLError (not PEM, key does not match)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_TURN])
    context.load_cert_chain(cert, key)
    return context


def client_context(cafile: Path | str | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, or only `cafile` when given."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_TURN])
    return context


__all__ = ["ALPN_TURN", "client_context", "server_context"]
