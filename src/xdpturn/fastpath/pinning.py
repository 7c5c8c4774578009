"""Keeping the kernel path alive across a restart: pinned program and maps on a bpffs.

A relay that stops for a restart pins its program and every map of its object, by name, under one
directory of the bpffs (`pin_dir`), and leaves the program attached. The next process opens the
pins (`open_pins`), checks that its own object's maps can stand in for them (`check_fits`: the
kernel's shape of each map, and the layout of every struct and enum the two objects share, from
BTF), loads its object on the pinned maps and replaces the program atomically. Maps are found by
name, so a map added to the object later is pinned and adopted with no change here; a map new in
the next object is created empty.

`discard` undoes it all for a clean start: the pinned program is detached where it is still
attached, and the pins are removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdpturn.fastpath import libbpf as bpf

log = logging.getLogger("xdpturn.fastpath")

BPFFS = Path("/sys/fs/bpf")
PROGRAM_PIN = "program"  # map names cannot clash with it: the maps sit in maps/
MAPS_DIR = "maps"


class AdoptError(Exception):
    """What the previous process left cannot be adopted (missing or foreign pins): start
    clean."""


class LayoutMismatch(Exception):
    """The new object's maps cannot take over the pinned ones; the message names the first
    difference."""


def pin_dir_for(state_dir: Path, bpffs: Path = BPFFS) -> Path:
    """The directory on the bpffs that goes with a state directory (one per relay on a host)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return bpffs / "xdpturn" / digest


def ensure_bpffs(root: Path = BPFFS) -> None:
    """Mount a bpffs at `root` unless one is there (a fresh machine has none)."""
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == str(root) and fields[2] == "bpf":
                return
    res = subprocess.run(
        ["mount", "-t", "bpf", "bpf", str(root)], check=False, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise OSError(f"cannot mount a bpffs at {root}: {res.stderr.strip() or res.returncode}")
    log.info("mounted a bpffs at %s", root)


def layouts(btf: bpf.BtfInfo) -> dict[str, Any]:
    """An object's struct layouts and enum values as plain data, saved beside the pins."""
    return {
        "structs": {
            name: {"size": s.size, "members": dict(s.member_bit_offsets)}
            for name, s in btf.structs.items()
        },
        "enums": {name: dict(values) for name, values in btf.enums.items()},
    }


def shapes_plain(shapes: dict[str, bpf.MapShape]) -> dict[str, list[int]]:
    return {
        name: [s.map_type, s.key_size, s.value_size, s.max_entries, s.flags]
        for name, s in shapes.items()
    }


@dataclass
class Pins:
    """Open fds of what a stopped relay pinned. close() closes them (the pins stay)."""

    dir: Path
    program_fd: int
    program_id: int
    maps: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in [self.program_fd, *self.maps.values()]:
            os.close(fd)
        self.maps.clear()
        self.program_fd = -1


def pin(pin_dir: Path, program_fd: int, maps: dict[str, int]) -> None:
    """Pin the program and `maps` (name -> fd) under `pin_dir`, replacing older pins there."""
    remove_pins(pin_dir)
    try:
        (pin_dir / MAPS_DIR).mkdir(parents=True, mode=0o700)
        for name, fd in maps.items():
            bpf.obj_pin(fd, pin_dir / MAPS_DIR / name)
        bpf.obj_pin(program_fd, pin_dir / PROGRAM_PIN)  # last: a program pin means all maps are
    except BaseException:
        remove_pins(pin_dir)
        raise


def open_pins(pin_dir: Path, names: list[str]) -> Pins:
    """The pinned program and the maps `names`. Raises AdoptError when any is missing."""
    try:
        program_fd = bpf.obj_get(pin_dir / PROGRAM_PIN)
    except OSError as e:
        raise AdoptError(f"no pinned program in {pin_dir}: {e.strerror or e}") from e
    pins = Pins(pin_dir, program_fd, bpf.prog_id_of(program_fd))
    try:
        for name in names:
            try:
                pins.maps[name] = bpf.obj_get(pin_dir / MAPS_DIR / name)
            except OSError as e:
                raise AdoptError(f"pinned map {name} missing: {e.strerror or e}") from e
    except BaseException:
        pins.close()
        raise
    return pins


def check_fits(
    pins: Pins,
    saved_layouts: dict[str, Any],
    new_shapes: dict[str, bpf.MapShape],
    new_btf: bpf.BtfInfo,
) -> None:
    """Raise LayoutMismatch unless every pinned map that the new object also has is of the same
    kernel shape, and every struct and enum both objects define has the same layout (a changed
    struct would be read at the wrong offsets; a renumbered enum would mix counters up)."""
    for name, fd in pins.maps.items():
        want = new_shapes.get(name)
        have = bpf.map_shape_of(fd)
        if want is not None and want != have:
            raise LayoutMismatch(f"map {name}: pinned ({have}), the new object's ({want})")
    new = layouts(new_btf)
    for name, old in saved_layouts.get("structs", {}).items():
        now = new["structs"].get(name)
        if now is not None and now != old:
            raise LayoutMismatch(f"struct {name}: was {old}, the new object has {now}")
    for name, old_values in saved_layouts.get("enums", {}).items():
        new_values = new["enums"].get(name, {})
        for member, value in old_values.items():
            if member in new_values and new_values[member] != value:
                raise LayoutMismatch(
                    f"enum {name}: {member} was {value}, the new object has {new_values[member]}"
                )


def discard(pin_dir: Path, interfaces: list[str]) -> None:
    """Detach the pinned program from `interfaces` where it is still attached, remove the
    pins. Quiet when there is nothing; failures are logged."""
    program = pin_dir / PROGRAM_PIN
    if program.exists():
        try:
            fd = bpf.obj_get(program)
            try:
                prog_id = bpf.prog_id_of(fd)
            finally:
                os.close(fd)
            for ifname in interfaces:
                detach_if_attached(ifname, prog_id)
        except OSError as e:
            log.warning("cannot detach the pinned program: %s", e)
    remove_pins(pin_dir)


def detach_if_attached(ifname: str, prog_id: int) -> bool:
    """Detach program `prog_id` from `ifname` if it is the one attached there."""
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        return False
    attached = bpf.xdp_query(ifindex)
    if attached.prog_id != prog_id:
        return False
    bpf.xdp_detach(ifindex, mode_flags(attached.mode))
    log.info("XDP program detached from %s", ifname)
    return True


def mode_flags(attach_mode: int) -> int:
    """The attach flag of a program attached in `attach_mode` (XDP_ATTACHED_*)."""
    return bpf.XDP_FLAGS_SKB_MODE if attach_mode == bpf.XDP_ATTACHED_SKB else bpf.XDP_FLAGS_DRV_MODE


def remove_pins(pin_dir: Path) -> None:
    # Unlinking a pin drops only the name: the kernel frees a map when nothing holds it.
    if pin_dir.exists():
        shutil.rmtree(pin_dir, ignore_errors=True)


__all__ = [
    "AdoptError",
    "LayoutMismatch",
    "Pins",
    "check_fits",
    "discard",
    "ensure_bpffs",
    "layouts",
    "open_pins",
    "pin",
    "pin_dir_for",
    "remove_pins",
]
