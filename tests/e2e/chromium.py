"""Debian's Chromium, headless, in a testbed namespace, driven over the DevTools protocol.

`--remote-debugging-pipe` makes Chromium read commands from fd 3 and write replies and events to
fd 4, each a JSON object ended by a NUL byte: no TCP port, no download, only the standard library.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Any

from xdpturn_lab.testbed import Testbed

EXECUTABLE = "chromium"
CALL_TIMEOUT = 10.0  # seconds for a DevTools command that does not wait on the network
# The first command waits for the browser's start-up too: on a loaded 2-core machine that alone
# took over 10 s (seen twice while other test suites ran).
START_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0  # seconds from Browser.close to exit, before SIGKILL
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
    "--disable-gpu",
    # The testbed has no internet: without these Chromium keeps trying to reach Google's services.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # A camera and microphone that need no device and no permission prompt.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--remote-debugging-pipe",
]
# Chromium takes the DevTools pipe on fds 3 and 4; subprocess only keeps fd numbers, so a shell
# moves the two pipe ends there before starting it.
_ON_FDS_3_AND_4 = 'exec 3<&"$1" 4>&"$2"; shift 2; exec "$@"'


def executable() -> str | None:
    return shutil.which(EXECUTABLE)


class DevToolsError(Exception):
    pass


class Chromium:
    """One browser in the node's namespace with one page, on a fresh profile in a temp dir.

    `with Chromium(tb, "client") as browser:` starts it; leaving the block closes it (Browser.close,
    then SIGKILL to its process group after CLOSE_TIMEOUT) and removes the profile, also on failure.
    """

    def __init__(self, tb: Testbed, node: str) -> None:
        self.tb = tb
        self.node = node
        self._profile = tempfile.TemporaryDirectory(prefix=f"xdpturn-chromium-{node}-")
        self._log = Path(self._profile.name) / "stderr.log"
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        self._session: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._to_browser = -1

    def __enter__(self) -> Chromium:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        path = executable()
        if path is None:
            raise FileNotFoundError(EXECUTABLE)
        commands_in, commands_out = os.pipe()
        replies_in, replies_out = os.pipe()
        profile = Path(self._profile.name) / "profile"
        argv = ["bash", "-c", _ON_FDS_3_AND_4, "bash", str(commands_in), str(replies_out), path]
        argv += [*FLAGS, f"--user-data-dir={profile}", "about:blank"]
        try:
            with self._log.open("wb") as log:
                self._proc = self.tb.popen(
                    self.node,
                    argv,
                    pass_fds=(commands_in, replies_out),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # its own process group: renderers and all go on close
                )
        finally:
            os.close(commands_in)
            os.close(replies_out)
        self._to_browser = commands_out
        threading.Thread(
            target=self._read, args=(replies_in,), name=f"devtools-{self.node}", daemon=True
        ).start()
        self._session = self._attach_to_page()

    def _read(self, fd: int) -> None:
        """Replies to commands go to the queue; events are not used here. None marks the end."""
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    message: dict[str, Any] = json.loads(raw)
                    if "id" in message:
                        self._replies.put(message)
        self._replies.put(None)

    def _attach_to_page(self) -> str:
        targets = self.call("Target.getTargets", timeout=START_TIMEOUT)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        session: str = attached["sessionId"]
        return session

    def call(
        self, method: str, *, timeout: float = CALL_TIMEOUT, page: bool = False, **params: Any
    ) -> dict[str, Any]:
        """Send one command (to the page's session with `page`) and wait for its reply."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if page:
            command["sessionId"] = self._session
        data = memoryview(json.dumps(command).encode() + b"\0")
        while data:
            data = data[os.write(self._to_browser, data) :]
        while True:
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise DevToolsError(f"{self.node}: no {method} reply within {timeout} s") from None
            if reply is None:
                raise DevToolsError(f"{self.node}: Chromium exited: {self.log_tail()}")
            if reply["id"] != self._next_id:
                continue  # a reply to an earlier command that timed out
            if "error" in reply:
                raise DevToolsError(f"{self.node}: {method}: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result

    def open(self, url: str) -> None:
        """Navigate the page and wait until the document has loaded."""
        self.call("Page.navigate", page=True, url=url)
        loaded = self.evaluate(
            "new Promise((resolve) => document.readyState === 'complete'"
            " ? resolve(location.href) : addEventListener('load', () => resolve(location.href)))"
        )
        if loaded != url:
            raise DevToolsError(f"{self.node}: loaded {loaded!r}, not {url!r}")

    def evaluate(self, expression: str, timeout: float = CALL_TIMEOUT) -> Any:
        """The value of a JavaScript expression in the page, promises awaited."""
        reply = self.call(
            "Runtime.evaluate",
            page=True,
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"{self.node}: {text}")
        return reply["result"].get("value")

    def run(self, function: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """`function(*args)` in the page (arguments as JSON), awaited."""
        return self.evaluate(f"{function}(...{json.dumps(list(args))})", timeout)

    def log_tail(self, lines: int = 20) -> str:
        """The end of Chromium's stderr, for failure messages."""
        try:
            text = self._log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "its log ends:\n" + "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Ask Chromium to quit, kill its process group if it lingers, remove the profile."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                self.call("Browser.close", timeout=CLOSE_TIMEOUT)
                proc.wait(timeout=CLOSE_TIMEOUT)
            except (DevToolsError, OSError, subprocess.TimeoutExpired):
                pass
        if proc is not None:
            # Renderers and helpers share the browser's process group (start_new_session).
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._to_browser >= 0:
            os.close(self._to_browser)
            self._to_browser = -1
        self._profile.cleanup()
