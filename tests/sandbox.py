"""Privilege and syscall restrictions for tests: become nobody, or refuse bpf(2) with a filter.

Both act on the calling process (and what it execs): call them in a forked child or in a small
launcher that then execs the program under test.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from ebpf_sticky.kernel import casm


def drop_to_nobody() -> None:
    """In a child: become nobody/nogroup with no capability at all, and check it from /proc."""
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)  # from root to non-root: the kernel clears every capability
    status = Path("/proc/self/status").read_text()
    caps = {
        line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines() if line.startswith("Cap")
    }
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == 0, caps
    assert os.geteuid() == 65534


def deny_bpf_syscall() -> None:
    """A seccomp filter of our own, built with casm: bpf(2) → EPERM, everything else allowed."""
    arch, nr = {"x86_64": (0xC000003E, 321), "aarch64": (0xC00000B7, 280)}[os.uname().machine]
    program = casm.assemble(
        [
            casm.ld_abs(casm.W, 4),  # seccomp_data.arch
            casm.jmp("jeq", arch, None, "allow"),
            casm.ld_abs(casm.W, 0),  # seccomp_data.nr
            casm.jmp("jeq", nr, None, "allow"),
            casm.ret(0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
            "allow",
            casm.ret(0x7FFF0000),
        ]
    )
    code = casm.encode(program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("=H6xQ", len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # no_new_privs
    assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0, ctypes.get_errno()
