"""Helpers shared by tests."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import pytest

from xdpturn.proto import stun
from xdpturn.proto.addr import TransportAddr
from xdpturn.proto.stun import AttrType, Message, MessageClass, Method

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BOUNDED = 10.0  # seconds any subprocess step may take before the test fails


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose prerequisite is missing; under CI=true fail instead, because CI
    installs everything and a skip there would hide a broken set-up."""
    if IN_CI:
        pytest.fail(f"cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


class Serve:
    """`xdpturn serve` as a subprocess, its JSON log lines read by a thread into a queue. One
    worker unless `env` sets XDPTURN_WORKERS (the default, the CPUs, varies by machine)."""

    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "xdpturn", "serve", *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "XDPTURN_WORKERS": "1", **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.records: list[dict[str, Any]] = []  # the log records `record` has read
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit within the bound; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=BOUNDED)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def record(
        self, message: str, where: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> dict[str, Any]:
        """The first record so far, or within BOUNDED, with `message` for which `where` holds."""
        for seen in self.records:
            if seen["message"] == message and where(seen):
                return seen
        deadline = time.monotonic() + BOUNDED
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"serve exited ({self.proc.wait()}) before {message!r}")
            record: dict[str, Any] = json.loads(line)
            self.records.append(record)
            if record["message"] == message and where(record):
                return record
        raise AssertionError(f"no {message!r} record within {BOUNDED} s")

    def wait_for(self, message: str) -> dict[str, object]:
        deadline = time.monotonic() + BOUNDED
        while (left := deadline - time.monotonic()) > 0:
            line = self.lines.get(timeout=left)
            if line is None:
                raise AssertionError(f"serve exited ({self.proc.wait()}) before {message!r}")
            record: dict[str, object] = json.loads(line)
            if record["message"] == message:
                return record
        raise AssertionError(f"no {message!r} log line within {BOUNDED} s")


def binding(server: TransportAddr) -> bool:
    """A STUN Binding request answered by `server`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(BOUNDED)
        request = Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
        sock.sendto(stun.encode(request), (str(server.ip), server.port))
        reply = stun.decode(sock.recv(2048))
        return (
            reply.cls is MessageClass.SUCCESS and reply.get(AttrType.XOR_MAPPED_ADDRESS) is not None
        )
