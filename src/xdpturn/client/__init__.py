"""TURN client side: an asyncio client library and the end-to-end relay probe."""

from __future__ import annotations

from xdpturn.client.probe import ProbeResult, format_probe, probe
from xdpturn.client.streams import StreamTransport, open_tcp, open_tls
from xdpturn.client.turn import (
    ClientOptions,
    MessageTransport,
    TransportOpener,
    TurnClient,
    TurnClientError,
    UdpTransport,
    open_udp,
)

__all__ = [
    "ClientOptions",
    "MessageTransport",
    "ProbeResult",
    "StreamTransport",
    "TransportOpener",
    "TurnClient",
    "TurnClientError",
    "UdpTransport",
    "format_probe",
    "open_tcp",
    "open_tls",
    "open_udp",
    "probe",
]
