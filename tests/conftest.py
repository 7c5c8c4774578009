"""Shared test configuration.

Tests marked `kernel` need root, BPF, XDP and network namespaces. Off CI they skip when the
machine cannot run them; under CI=true they fail instead, so a kernel test never silently skips.
"""

from __future__ import annotations

import os

import pytest

from tests.support import unavailable


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (BPF, XDP and network namespaces)"
    if not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"):
        return "kernel has no BPF support"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    reason = kernel_unavailable_reason()
    if reason is not None:
        unavailable(reason)
