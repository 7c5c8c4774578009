"""A small typed wrapper over libbpf.so.1 (Debian 12: libbpf 1.1.2) through ctypes.

Only what xdpturn needs: open/load an object, find its program and maps, map operations (per-CPU
values included), XDP attach/detach/query, BPF_PROG_TEST_RUN, and reading an object's BTF (struct
layouts and enums). libbpf 1.x returns negative errno values; they become `BpfError` (an OSError
carrying the errno and its text).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1  # generic XDP
XDP_FLAGS_DRV_MODE = 1 << 2  # native XDP
XDP_FLAGS_REPLACE = 1 << 4  # with old_prog_fd: swap atomically (restarts, fastpath.pinning)

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
BPF_NOEXIST = 1  # map update: create only

# enum xdp_action
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4

# XDP attach modes reported by bpf_xdp_query
XDP_ATTACHED_NONE = 0
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2

# map types whose values are per CPU (BPF_MAP_TYPE_*)
_PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, ...

_BTF_KIND_STRUCT = 4
_BTF_KIND_UNION = 5
_BTF_KIND_ENUM = 6
_BTF_KIND_ENUM64 = 19


class BpfError(OSError):
    """A libbpf call failed; `errno` is set and the message names the call."""


def _load_lib() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise BpfError(0, f"libbpf.so.1 not loadable: {e}") from e


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """libbpf, loaded on first use with argument/result types declared."""
    global _lib
    if _lib is None:
        _lib = _load_lib()
        _declare(_lib)
    return _lib


def _declare(b: ctypes.CDLL) -> None:
    vp, c_int, u32, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    sigs: dict[str, tuple[list[type], type | None]] = {
        "bpf_object__open_file": ([cp, vp], vp),
        "bpf_object__load": ([vp], c_int),
        "bpf_object__close": ([vp], None),
        "bpf_object__find_program_by_name": ([vp, cp], vp),
        "bpf_object__find_map_by_name": ([vp, cp], vp),
        "bpf_program__fd": ([vp], c_int),
        "bpf_map__fd": ([vp], c_int),
        "bpf_map__key_size": ([vp], u32),
        "bpf_map__value_size": ([vp], u32),
        "bpf_map__max_entries": ([vp], u32),
        "bpf_map__type": ([vp], c_int),
        "bpf_map__map_flags": ([vp], u32),
        "bpf_map__name": ([vp], cp),
        "bpf_map__reuse_fd": ([vp, c_int], c_int),
        "bpf_object__next_map": ([vp, vp], vp),
        "bpf_obj_pin": ([c_int, cp], c_int),
        "bpf_obj_get": ([cp], c_int),
        "bpf_map_update_elem": ([c_int, vp, vp, ctypes.c_uint64], c_int),
        "bpf_map_lookup_elem": ([c_int, vp, vp], c_int),
        "bpf_map_delete_elem": ([c_int, vp], c_int),
        "bpf_map_get_next_key": ([c_int, vp, vp], c_int),
        "bpf_map_lookup_batch": ([c_int, vp, vp, vp, vp, ctypes.POINTER(u32), vp], c_int),
        "bpf_xdp_attach": ([c_int, c_int, u32, vp], c_int),
        "bpf_xdp_detach": ([c_int, u32, vp], c_int),
        "bpf_xdp_query": ([c_int, c_int, vp], c_int),
        "bpf_prog_get_fd_by_id": ([u32], c_int),
        "bpf_map_get_fd_by_id": ([u32], c_int),
        "bpf_obj_get_info_by_fd": ([c_int, vp, ctypes.POINTER(u32)], c_int),
        "bpf_prog_test_run_opts": ([c_int, vp], c_int),
        "libbpf_num_possible_cpus": ([], c_int),
        "btf__parse": ([cp, vp], vp),
        "btf__free": ([vp], None),
        "btf__type_cnt": ([vp], u32),
        "btf__type_by_id": ([vp, u32], vp),
        "btf__name_by_offset": ([vp, u32], cp),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(b, name)
        fn.argtypes = args
        fn.restype = res


def _check(rc: int, what: str) -> int:
    """libbpf 1.x returns -errno on failure."""
    if rc < 0:
        raise BpfError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        err = ctypes.get_errno() or 22
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


class XdpMd(ctypes.Structure):
    """struct xdp_md, the context of BPF_PROG_TEST_RUN for XDP."""

    _fields_ = (
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    )


class _TestRunOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    )


class _XdpQueryOpts(ctypes.Structure):
    _fields_ = (
        ("sz", ctypes.c_size_t),
        ("prog_id", ctypes.c_uint32),
        ("drv_prog_id", ctypes.c_uint32),
        ("hw_prog_id", ctypes.c_uint32),
        ("skb_prog_id", ctypes.c_uint32),
        ("attach_mode", ctypes.c_uint8),
    )


@dataclass(frozen=True)
class RunResult:
    retval: int  # the XDP action
    data: bytes  # the frame after the program (empty in live-frames mode)
    duration_ns: int  # average per repetition


@dataclass(frozen=True)
class XdpAttachment:
    prog_id: int  # 0: nothing attached
    mode: int  # XDP_ATTACHED_*


class Map:
    """A map of a loaded object, addressed by its fd. Keys and values are raw bytes."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int, map_type: int) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.percpu = map_type in _PERCPU_MAP_TYPES
        # Per-CPU values come as one slot per possible CPU, each rounded up to 8 bytes.
        self.cpus = possible_cpus() if self.percpu else 1
        self.slot_size = (value_size + 7) // 8 * 8 if self.percpu else value_size

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, map wants {self.key_size}")
        return ctypes.create_string_buffer(key, self.key_size)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        want = self.slot_size * self.cpus if self.percpu else self.value_size
        if len(value) != want:
            raise ValueError(f"{self.name}: value is {len(value)} bytes, map wants {want}")
        k = self._key(key)
        v = ctypes.create_string_buffer(value, want)
        _check(lib().bpf_map_update_elem(self.fd, k, v, flags), f"update {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        """The value (for per-CPU maps, all slots concatenated), or None if absent."""
        size = self.slot_size * self.cpus
        k = self._key(key)
        v = ctypes.create_string_buffer(size)
        rc = lib().bpf_map_lookup_elem(self.fd, k, v)
        if rc == -2:  # ENOENT
            return None
        _check(rc, f"lookup {self.name}")
        return v.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        """One value per possible CPU (padding cut off)."""
        raw = self.lookup(key)
        if raw is None:
            return []
        return self._per_cpu(raw)

    def _per_cpu(self, raw: bytes) -> list[bytes]:
        return [
            raw[i * self.slot_size : i * self.slot_size + self.value_size] for i in range(self.cpus)
        ]

    def items_percpu(self, chunk: int = 1024) -> Iterator[tuple[bytes, list[bytes]]]:
        """Every (key, one value per CPU), read `chunk` entries per system call
        (BPF_MAP_LOOKUP_BATCH) rather than two calls per key. Not a snapshot if the map changes
        meanwhile."""
        value_size = self.slot_size * self.cpus
        token = ctypes.create_string_buffer(max(self.key_size, 8))
        start: ctypes.Array[ctypes.c_char] | None = None
        while True:
            keys = ctypes.create_string_buffer(chunk * self.key_size)
            values = ctypes.create_string_buffer(chunk * value_size)
            count = ctypes.c_uint32(chunk)
            rc = lib().bpf_map_lookup_batch(
                self.fd, start, token, keys, values, ctypes.byref(count), None
            )
            if rc == -errno.ENOSPC and count.value == 0:  # a bucket holds more than `chunk`
                chunk *= 2
                continue
            if rc < 0 and rc != -errno.ENOENT:
                _check(rc, f"lookup_batch {self.name}")
            for i in range(count.value):
                key = keys.raw[i * self.key_size : (i + 1) * self.key_size]
                yield key, self._per_cpu(values.raw[i * value_size : (i + 1) * value_size])
            if rc == -errno.ENOENT:  # the end
                return
            start = ctypes.create_string_buffer(token.raw, len(token))

    def delete(self, key: bytes) -> bool:
        """False if the key was absent."""
        rc = lib().bpf_map_delete_elem(self.fd, self._key(key))
        if rc == -2:
            return False
        _check(rc, f"delete {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        """All keys, by bpf_map_get_next_key (not a snapshot if the map changes meanwhile)."""
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            rc = lib().bpf_map_get_next_key(self.fd, cur, nxt)
            if rc == -2:
                return
            _check(rc, f"get_next_key {self.name}")
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)


@dataclass(frozen=True)
class MapShape:
    """What the kernel fixes when a map is created: a map can stand in for another only if
    these are equal."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int

    def __str__(self) -> str:
        return (
            f"type {self.map_type}, key {self.key_size} B, value {self.value_size} B, "
            f"{self.max_entries} entries, flags {self.flags:#x}"
        )


class BpfObject:
    """An opened and loaded BPF object file. close() frees it (maps and programs with it).

    `reuse` names maps (by name) to take from existing fds instead of creating them: the
    loaded program then works on those maps (bpf_map__reuse_fd); the caller checks they fit
    (`map_shapes`, `map_shape_of`)."""

    def __init__(self, path: Path, reuse: dict[str, int] | None = None) -> None:
        self.path = path
        ctypes.set_errno(0)
        self._obj: int | None = _check_ptr(
            lib().bpf_object__open_file(str(path).encode(), None), f"open {path}"
        )
        try:
            for name, fd in (reuse or {}).items():
                m = self._find_map(name)
                _check(lib().bpf_map__reuse_fd(m, fd), f"reuse map {name}")
            _check(lib().bpf_object__load(self._obj), f"load {path}")
        except BaseException:
            self.close()
            raise

    @classmethod
    def map_shapes(cls, path: Path) -> dict[str, MapShape]:
        """The maps an object defines, by name, without loading it. Internal maps (global
        data: `.rodata`, `.bss`) are left out."""
        b = lib()
        ctypes.set_errno(0)
        obj = _check_ptr(b.bpf_object__open_file(str(path).encode(), None), f"open {path}")
        try:
            shapes: dict[str, MapShape] = {}
            m = b.bpf_object__next_map(obj, None)
            while m:
                raw: bytes = b.bpf_map__name(m)
                name = raw.decode()
                if "." not in name:
                    shapes[name] = MapShape(
                        b.bpf_map__type(m),
                        b.bpf_map__key_size(m),
                        b.bpf_map__value_size(m),
                        b.bpf_map__max_entries(m),
                        b.bpf_map__map_flags(m),
                    )
                m = b.bpf_object__next_map(obj, m)
            return shapes
        finally:
            b.bpf_object__close(obj)

    def _find_map(self, name: str) -> int:
        ctypes.set_errno(0)
        return _check_ptr(
            lib().bpf_object__find_map_by_name(self._handle(), name.encode()), f"map {name}"
        )

    def _handle(self) -> int:
        if self._obj is None:
            raise BpfError(9, f"{self.path}: object is closed")
        return self._obj

    def program_fd(self, name: str) -> int:
        ctypes.set_errno(0)
        prog = _check_ptr(
            lib().bpf_object__find_program_by_name(self._handle(), name.encode()),
            f"program {name}",
        )
        return _check(lib().bpf_program__fd(prog), f"fd of program {name}")

    def map(self, name: str) -> Map:
        m = self._find_map(name)
        b = lib()
        return Map(
            name,
            _check(b.bpf_map__fd(m), f"fd of map {name}"),
            b.bpf_map__key_size(m),
            b.bpf_map__value_size(m),
            b.bpf_map__type(m),
        )

    def close(self) -> None:
        if self._obj is not None:
            lib().bpf_object__close(self._obj)
            self._obj = None


class _XdpAttachOpts(ctypes.Structure):
    _fields_ = (("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int))


def xdp_attach(ifindex: int, prog_fd: int, flags: int, old_prog_fd: int | None = None) -> None:
    """Attach; with `old_prog_fd`, replace that program atomically (XDP_FLAGS_REPLACE), and
    fail (EEXIST) if another one is attached by then."""
    opts = None
    if old_prog_fd is not None:
        flags |= XDP_FLAGS_REPLACE
        opts = ctypes.byref(_XdpAttachOpts(ctypes.sizeof(_XdpAttachOpts), old_prog_fd))
    _check(lib().bpf_xdp_attach(ifindex, prog_fd, flags, opts), f"attach XDP to ifindex {ifindex}")


def obj_pin(fd: int, path: Path) -> None:
    """Pin a map or program at `path` on a bpffs, so it outlives this process."""
    _check(lib().bpf_obj_pin(fd, str(path).encode()), f"pin {path}")


def obj_get(path: Path) -> int:
    """An fd of the object pinned at `path` (the caller closes it)."""
    return _check(lib().bpf_obj_get(str(path).encode()), f"open pinned {path}")


def prog_id_of(fd: int) -> int:
    info = _ProgInfo()
    _info_by_fd(fd, info, "info of a program")
    return int(info.id)


def map_shape_of(fd: int) -> MapShape:
    info = _MapInfo()
    _info_by_fd(fd, info, "info of a map")
    return MapShape(info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(lib().bpf_xdp_detach(ifindex, flags, None), f"detach XDP from ifindex {ifindex}")


def xdp_query(ifindex: int) -> XdpAttachment:
    opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    _check(lib().bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"query XDP on ifindex {ifindex}")
    return XdpAttachment(opts.prog_id, opts.attach_mode)


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to its map ids (the kernel accepts a shorter struct)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    )


class _MapInfo(ctypes.Structure):
    """struct bpf_map_info up to its name."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    )


def _info_by_fd(fd: int, info: ctypes.Structure, what: str) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), what)


def prog_map_ids(prog_id: int) -> list[int]:
    """Ids of the maps a loaded program uses (any process's program; needs CAP_SYS_ADMIN)."""
    fd = _check(lib().bpf_prog_get_fd_by_id(prog_id), f"fd of program id {prog_id}")
    try:
        info = _ProgInfo()
        _info_by_fd(fd, info, f"info of program id {prog_id}")
        ids = (ctypes.c_uint32 * info.nr_map_ids)()
        # Second call: the kernel fills as many map ids as nr_map_ids says there is room for.
        info = _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
        _info_by_fd(fd, info, f"map ids of program id {prog_id}")
        return list(ids[: min(info.nr_map_ids, len(ids))])
    finally:
        os.close(fd)


def map_by_id(map_id: int) -> tuple[str, Map]:
    """(kernel name, Map) for a map id; the caller closes `Map.fd`."""
    fd = _check(lib().bpf_map_get_fd_by_id(map_id), f"fd of map id {map_id}")
    try:
        info = _MapInfo()
        _info_by_fd(fd, info, f"info of map id {map_id}")
        name = info.name.decode(errors="replace")
        return name, Map(name, fd, info.key_size, info.value_size, info.type)
    except BaseException:
        os.close(fd)
        raise


def prog_test_run(
    prog_fd: int,
    data: bytes,
    *,
    ingress_ifindex: int = 0,
    repeat: int = 1,
    flags: int = 0,
    batch_size: int = 0,
    out_room: int = 256,
    meta: bytes = b"",
) -> RunResult:
    """BPF_PROG_TEST_RUN on an XDP program.

    With `ingress_ifindex` the program sees that device (bpf_fib_lookup and XDP_TX need it; it is
    resolved in the calling thread's network namespace). With BPF_F_TEST_XDP_LIVE_FRAMES frames are
    really sent and no data comes back. `out_room`: bytes the program may add to the frame.
    `meta` (a multiple of 4, at most 32 bytes) goes in front of the frame as XDP metadata; it moves
    with the frame's start, so headroom the program claims shows these bytes until it writes them
    (fill it with 0xff to expose fields never written). It is cut from the returned data.
    """
    live = bool(flags & BPF_F_TEST_XDP_LIVE_FRAMES)
    full = meta + data
    buf_in = ctypes.create_string_buffer(full, len(full))
    out_size = 0 if live else len(full) + out_room
    buf_out = ctypes.create_string_buffer(max(out_size, 1))
    md = XdpMd(data=len(meta), data_end=len(full), ingress_ifindex=ingress_ifindex)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(buf_in, ctypes.c_void_p),
        data_out=None if live else ctypes.cast(buf_out, ctypes.c_void_p),
        data_size_in=len(full),
        data_size_out=out_size,
        ctx_in=ctypes.addressof(md),
        ctx_size_in=ctypes.sizeof(md),
        repeat=repeat,
        flags=flags,
        batch_size=batch_size,
    )
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    out = b"" if live else buf_out.raw[len(meta) : opts.data_size_out]
    return RunResult(opts.retval, out, opts.duration)


@dataclass(frozen=True)
class BtfStruct:
    size: int
    member_bit_offsets: dict[str, int]


@dataclass(frozen=True)
class BtfInfo:
    structs: dict[str, BtfStruct]
    enums: dict[str, dict[str, int]]


class _BtfType(ctypes.Structure):
    _fields_ = (("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32))


class _BtfMember(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
    )


class _BtfEnum(ctypes.Structure):
    _fields_ = (("name_off", ctypes.c_uint32), ("val", ctypes.c_int32))


class _BtfEnum64(ctypes.Structure):
    _fields_ = (
        ("name_off", ctypes.c_uint32),
        ("val_lo32", ctypes.c_uint32),
        ("val_hi32", ctypes.c_uint32),
    )


def read_btf(path: Path) -> BtfInfo:
    """Named structs (size, member bit offsets) and enums (name -> value) of an object's BTF."""
    b = lib()
    ctypes.set_errno(0)
    btf = _check_ptr(b.btf__parse(str(path).encode(), None), f"parse BTF of {path}")
    structs: dict[str, BtfStruct] = {}
    enums: dict[str, dict[str, int]] = {}

    def name(off: int) -> str:
        raw: bytes | None = b.btf__name_by_offset(btf, off)
        return raw.decode() if raw else ""

    try:
        for type_id in range(1, b.btf__type_cnt(btf)):
            addr = _check_ptr(b.btf__type_by_id(btf, type_id), f"BTF type {type_id}")
            t = _BtfType.from_address(addr)
            kind = (t.info >> 24) & 0x1F
            vlen = t.info & 0xFFFF
            kind_flag = bool(t.info >> 31)
            tname = name(t.name_off)
            after = addr + ctypes.sizeof(_BtfType)
            if kind in (_BTF_KIND_STRUCT, _BTF_KIND_UNION) and tname:
                members = (_BtfMember * vlen).from_address(after)
                structs[tname] = BtfStruct(
                    t.size,
                    {
                        name(m.name_off): (m.offset & 0xFFFFFF) if kind_flag else m.offset
                        for m in members
                    },
                )
            elif kind == _BTF_KIND_ENUM and tname:
                values = (_BtfEnum * vlen).from_address(after)
                enums[tname] = {name(v.name_off): v.val for v in values}
            elif kind == _BTF_KIND_ENUM64 and tname:
                values64 = (_BtfEnum64 * vlen).from_address(after)
                enums[tname] = {name(v.name_off): (v.val_hi32 << 32) | v.val_lo32 for v in values64}
    finally:
        b.btf__free(btf)
    return BtfInfo(structs, enums)
