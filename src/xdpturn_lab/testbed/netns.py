"""Network namespaces: create, delete, and run code inside one from this process."""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_T = TypeVar("_T")
_NETNS_DIR = "/run/netns"

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def create(name: str) -> None:
    """`ip netns add NAME`, with loopback up."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def delete(name: str) -> None:
    """Delete a namespace; a missing one is not an error (teardown must be idempotent)."""
    subprocess.run(["ip", "netns", "delete", name], check=False, stderr=subprocess.DEVNULL)


def exists(name: str) -> bool:
    return os.path.exists(f"{_NETNS_DIR}/{name}")


def names() -> list[str]:
    """Names of all named namespaces (`ip netns list`, without spawning `ip`)."""
    try:
        return sorted(os.listdir(_NETNS_DIR))
    except FileNotFoundError:
        return []


def pids(name: str) -> list[int]:
    """Processes whose network namespace is `name` (`ip netns pids`)."""
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    return [int(word) for word in out.split()]


def sysctl(name: str, settings: dict[str, str]) -> None:
    """Write sysctls (dotted keys) inside namespace `name`.

    /proc/sys/net resolves against the writing thread's namespace, so no `ip netns exec` is needed.
    """
    with entered(name):
        for key, value in settings.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)


def call(name: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run `fn(*args, **kwargs)` in this thread, moved into namespace `name` for the call."""
    with entered(name):
        return fn(*args, **kwargs)


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into namespace `name`, and back on exit.

    Sockets opened inside stay in that namespace after the block ends.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"{_NETNS_DIR}/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
