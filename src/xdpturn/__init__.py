"""xdpturn: a TURN relay (RFC 8656) with a Python control plane and an XDP data plane."""

__version__ = "0.1.0"
