"""Network namespaces: create, delete, and run code inside one from this process."""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

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
    return os.path.exists(f"/run/netns/{name}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into namespace `name`, and back on exit.

    Sockets opened inside stay in that namespace after the block ends.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)
