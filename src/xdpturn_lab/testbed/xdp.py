"""A two-instruction XDP_PASS program, loaded without clang or libbpf.

Measured on kernel 6.18: a veth end only delivers frames its peer sent with XDP_TX/redirect if it
has an XDP program itself. Enabling GRO is not enough: the peer's `xdp_tx` counter rises without
errors, but the frames stay queued on the receiving end (its NAPI is only kicked when it has an XDP
program) and never reach the stack. So the testbed attaches this program to every veth end that
faces a relay's interface.
"""

from __future__ import annotations

import ctypes
import os
import struct

from pyroute2 import IPRoute

from xdpturn_lab.testbed import netns

_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_XDP = 6
_XDP_PASS = 2
# struct bpf_insn {u8 code; u8 dst:4, src:4; s16 off; s32 imm}: r0 = XDP_PASS; exit.
_INSNS = struct.pack("<BBhi", 0xB7, 0, 0, _XDP_PASS) + struct.pack("<BBhi", 0x95, 0, 0, 0)
PROG_NAME = "xtb_pass"

_libc = ctypes.CDLL(None, use_errno=True)


def load_pass_program() -> int:
    """Load the program; returns its fd (the caller closes it)."""
    nr = _BPF_SYSCALL.get(os.uname().machine)
    if nr is None:
        raise OSError(f"bpf() syscall number unknown for {os.uname().machine}")
    insns = ctypes.create_string_buffer(_INSNS, len(_INSNS))
    license_ = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr, BPF_PROG_LOAD part: prog_type, insn_cnt, insns, license; prog_name at 48.
    attr = ctypes.create_string_buffer(128)
    struct.pack_into(
        "<IIQQ",
        attr,
        0,
        _BPF_PROG_TYPE_XDP,
        len(_INSNS) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
    )
    struct.pack_into("16s", attr, 48, PROG_NAME.encode())
    fd = int(_libc.syscall(nr, _BPF_PROG_LOAD, attr, len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}")
    return fd


def attach_pass(netns_name: str, ifname: str) -> None:
    """Attach XDP_PASS (native mode) to `ifname` in `netns_name`, replacing any program there."""
    fd = load_pass_program()
    try:
        with netns.entered(netns_name), IPRoute() as ipr:
            index = ipr.link_lookup(ifname=ifname)
            if not index:
                raise LookupError(f"no interface {ifname} in {netns_name}")
            ipr.link("set", index=index[0], xdp_fd=fd)
    finally:
        # The attached link holds its own reference to the program.
        os.close(fd)
