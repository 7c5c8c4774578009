"""The kernel fast path: an XDP program that relays ChannelData <-> UDP for bound channels.

The server only talks to the `FastPath` protocol (`api.py`); `open_fastpath` (`xdp.py`) returns
the XDP-backed implementation, or `NullFastPath` when the fast path is off or cannot load (Python
then relays everything, correctly, only slower).
"""

from xdpturn.fastpath.api import (
    FastPath,
    FastPathConfig,
    FastPathCounters,
    FastPathMode,
    GuardConfig,
    NullFastPath,
)
from xdpturn.fastpath.xdp import open_fastpath

__all__ = [
    "FastPath",
    "FastPathConfig",
    "FastPathCounters",
    "FastPathMode",
    "GuardConfig",
    "NullFastPath",
    "open_fastpath",
]
