"""The state file of a relay stopped for a restart (--state-dir), and taking it over.

Stopping for a restart (SIGINT with --state-dir) writes DIR/state.json: the core's state (see
xdpturn.proto.handover) and what the fast path pinned (xdpturn.fastpath.pinning). It is written
atomically (a temporary file, fsync, rename, fsync of the directory) and carries a digest of its
body, so a file is whole and unchanged or refused. The next `serve` reads it (`load`), adopts the
pins and the allocations, then deletes it: a state is taken over once.

Whatever cannot be taken over (no file, another format, a corrupt or truncated file, pins gone)
makes the relay start clean: one log line says why, and `discard` removes the state file and the
pins and detaches the program they held, so nothing is half adopted.

With several workers (xdpturn.server.workers) there is still one state file and one set of pins:
the supervisor reads the file, adopts the pins, deals the allocations out to its workers
(`partition`), and on a stop for a restart gathers the workers' states (`merge`) and writes the
file. Each worker restores and exports its share with the same core code as a single process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from xdpturn.config import ServeConfig
from xdpturn.fastpath import pinning
from xdpturn.proto.addr import ClientFlow
from xdpturn.proto.handover import CoreState, StateError, from_plain, to_plain

log = logging.getLogger("xdpturn.server")

STATE_FILE = "state.json"
FILE_FORMAT = 1  # the envelope's; the core's state has its own (handover.FORMAT_VERSION)


@dataclass(frozen=True)
class SavedRelay:
    core: CoreState
    fastpath: dict[str, Any] | None  # XdpFastPath.keep_for_restart's; None: no kernel path
    saved_at: float  # wall clock


def save(
    state_dir: Path, core: CoreState, fastpath: dict[str, Any] | None, wall_now: float
) -> Path:
    """Write the state file atomically; returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    body = {"saved_at": wall_now, "core": to_plain(core), "fastpath": fastpath}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    envelope = {
        "format": FILE_FORMAT,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "body": body,
    }
    path = state_dir / STATE_FILE
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
    # The file holds long-term keys and the nonce key: the relay's user only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(envelope, f, sort_keys=True, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return path


def load(state_dir: Path) -> SavedRelay:
    """The saved state. Raises StateError saying why it cannot be used."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"no state file {path}") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{path} is not whole JSON (truncated or corrupt): {e}") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FILE_FORMAT:
        found = envelope.get("format") if isinstance(envelope, dict) else None
        raise StateError(f"{path} is of format {found!r}, this relay reads {FILE_FORMAT}")
    body = envelope.get("body")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(text.encode()).hexdigest() != envelope.get("sha256"):
        raise StateError(f"{path} does not match its digest (corrupt)")
    if not isinstance(body, dict):
        raise StateError(f"{path} has no body")
    fastpath = body.get("fastpath")
    saved_at = body.get("saved_at")
    if fastpath is not None and not isinstance(fastpath, dict):
        raise StateError(f"{path}: malformed fast path section")
    if not isinstance(saved_at, int | float):
        raise StateError(f"{path}: malformed saved_at")
    return SavedRelay(from_plain(body.get("core")), fastpath, float(saved_at))


def discard(state_dir: Path, pin_dir: Path | None, interfaces: list[str]) -> None:
    """Remove the state file and the pins, detaching the pinned program from `interfaces`."""
    if pin_dir is not None:
        pinning.discard(pin_dir, interfaces)
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def partition(core: CoreState, count: int) -> list[CoreState]:
    """`core` dealt out to `count` workers: allocations in the order of their relay ports, the
    first to worker 0, the next to worker 1, and so on round the workers; reservations the same
    way. Any worker can carry any UDP allocation on: the one that restores it binds its port
    and the connected socket that steers the client's datagrams to it. Every part has the one
    nonce key."""
    allocations = sorted(core.allocations, key=lambda a: a.relay_port)
    reservations = sorted(core.reservations, key=lambda r: r.relay_port)
    return [
        replace(
            core,
            allocations=tuple(allocations[index::count]),
            reservations=tuple(reservations[index::count]),
        )
        for index in range(count)
    ]


def merge(parts: Sequence[CoreState]) -> CoreState:
    """The workers' states as one (they share the nonce key); raises StateError if they do
    not."""
    keys = {part.nonce_key for part in parts}
    if len(keys) != 1:
        raise StateError(f"{len(keys)} nonce keys among {len(parts)} workers' states")
    return CoreState(
        nonce_key=keys.pop(),
        allocations=tuple(a for part in parts for a in part.allocations),
        reservations=tuple(r for part in parts for r in part.reservations),
    )


class Handover(Protocol):
    """Where a relay's saved state comes from when it starts and goes to when it stops for a
    restart: the state file (`StateFile`), or a worker's supervisor."""

    def saved(self) -> SavedRelay | None:
        """The state to carry on with (None: start clean, having said why)."""
        ...

    def restored(self, allocations: int) -> None:
        """The saved state has been carried on with (`allocations` of it): it is spent."""
        ...

    def elsewhere(self) -> frozenset[ClientFlow]:
        """Saved allocations that another process carries on (a sibling worker's share)."""
        ...

    def keep(self, core: CoreState, fastpath: dict[str, Any] | None, wall_now: float) -> str:
        """Hand the state over; returns where it went. Raises when it cannot."""
        ...

    def abandon(self) -> None:
        """Keeping failed after the fast path was pinned: undo that."""
        ...


class StateFile:
    """The Handover of one relay process: DIR/state.json and the pins."""

    def __init__(self, config: ServeConfig) -> None:
        assert config.state_dir is not None
        self._config = config
        self._state_dir = config.state_dir

    def saved(self) -> SavedRelay | None:
        return load_saved(self._config)

    def restored(self, allocations: int) -> None:
        (self._state_dir / STATE_FILE).unlink(missing_ok=True)

    def elsewhere(self) -> frozenset[ClientFlow]:
        return frozenset()

    def keep(self, core: CoreState, fastpath: dict[str, Any] | None, wall_now: float) -> str:
        return str(save(self._state_dir, core, fastpath, wall_now))

    def abandon(self) -> None:
        discard_pins(self._config)


def load_saved(config: ServeConfig) -> SavedRelay | None:
    """The state of --state-dir, or None having started clean (see start_clean)."""
    assert config.state_dir is not None
    try:
        return load(config.state_dir)
    except StateError as e:
        start_clean(config, str(e))
        return None


def start_clean(config: ServeConfig, why: str) -> None:
    """One line saying why, then nothing of the previous process is left to adopt."""
    state_dir = config.state_dir
    assert state_dir is not None
    first = not (state_dir / STATE_FILE).exists()
    (log.info if first else log.warning)("starting clean", extra={"reason": why})
    discard_pins(config)
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def discard_pins(config: ServeConfig) -> None:
    """Detach the pinned program (from the interfaces configured or saved), unpin."""
    assert config.state_dir is not None
    pin_dir = config.fastpath_settings.pin_dir
    saved = saved_interfaces(config.state_dir)
    if pin_dir is not None:
        pinning.discard(pin_dir, sorted(set(config.interfaces) | set(saved)))


def keep(
    handover: Handover,
    export: Callable[[], tuple[CoreState, dict[str, Any] | None]],
    wall_now: float,
) -> bool:
    """Stop for a restart: `export()` gives the core's state and pins the fast path (its
    section); the state is handed over. False, having logged why and undone the pins, when
    that fails: the relay then stops for good."""
    try:
        core, fastpath = export()
    except Exception:
        log.exception("cannot keep the kernel path for a restart; stopping for good")
        return False
    try:
        where = handover.keep(core, fastpath, wall_now)
    except Exception:
        log.exception("cannot save the state for a restart; stopping for good")
        handover.abandon()
        return False
    log.info(
        "state saved for a restart",
        extra={"path": where, "allocations": len(core.allocations)},
    )
    return True


def saved_interfaces(state_dir: Path) -> list[str]:
    """The interfaces a saved fast path section names, read leniently (for clean-up only)."""
    try:
        body = json.loads((state_dir / STATE_FILE).read_bytes())["body"]
        return [str(i) for i in body["fastpath"]["interfaces"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def add_detach_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "detach",
        help="stop for good after a stop for a restart: detach the kept XDP program",
        description="After `xdpturn serve --state-dir DIR` stopped for a restart (SIGINT), the "
        "XDP program stays attached and keeps relaying bound channels. This detaches it from "
        "the interfaces the saved state names (and any --interface), removes its pinned maps "
        "and deletes the saved state. Harmless when nothing was kept.",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        default=os.environ.get("XDPTURN_STATE_DIR"),
        help="the relay's --state-dir (default: $XDPTURN_STATE_DIR)",
    )
    p.add_argument(
        "--interface", metavar="IF", action="append", default=[], help="also this interface"
    )
    p.add_argument(
        "--bpffs",
        metavar="DIR",
        default=os.environ.get("XDPTURN_BPFFS", str(pinning.BPFFS)),
        help="the relay's --bpffs (default: $XDPTURN_BPFFS, else /sys/fs/bpf)",
    )
    p.set_defaults(run=_detach)


def _detach(args: argparse.Namespace) -> int:
    if not args.state_dir:
        print("xdpturn detach: --state-dir: needed", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir).absolute()
    pin_dir = pinning.pin_dir_for(state_dir, Path(args.bpffs).absolute())
    had_state = (state_dir / STATE_FILE).exists()
    had_pins = pin_dir.exists()
    interfaces = sorted(set(saved_interfaces(state_dir)) | set(args.interface))
    try:
        discard(state_dir, pin_dir, interfaces)
    except OSError as e:
        print(f"xdpturn detach: {e}", file=sys.stderr)
        return 1
    if not had_state and not had_pins:
        print(f"nothing kept for {state_dir}")
    else:
        print(
            f"removed the saved state and the pins of {state_dir}; "
            f"the kept program is detached from {', '.join(interfaces) or 'no interface'}"
        )
    return 0


__all__ = [
    "STATE_FILE",
    "Handover",
    "SavedRelay",
    "StateFile",
    "add_detach_command",
    "discard",
    "discard_pins",
    "keep",
    "load",
    "load_saved",
    "merge",
    "partition",
    "save",
    "saved_interfaces",
    "start_clean",
]
