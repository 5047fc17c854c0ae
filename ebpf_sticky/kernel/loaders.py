"""The two ways to get the selection program into the kernel; both use the router's maps.

* ``native`` (default): bytecode from ``program.py``, loaded with bpf(2). No compiler, no headers.
* ``bcc``: compiles ``bpf/select.c`` at run time with bcc (Debian/Ubuntu: python3-bpfcc).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoaderUnavailableError, PrivilegeError, VerifierError
from ..hashing import BUCKETS, MAX_SLOTS, ProgramConstants
from . import program, syscalls
from .asm import encode

PROGRAM_NAME = "sticky_select"
# Debian installs bcc's Python module for its own interpreter only; a venv or pyenv Python on the
# same machine can still use it, since the module is pure Python over libbcc.
_DISTRO_PYTHON_PATHS = ("/usr/lib/python3/dist-packages",)
BCC_FIX = (
    "install bcc and kernel headers (Debian/Ubuntu: apt-get install python3-bpfcc "
    "linux-headers-$(uname -r)), or use the default --loader native"
)


@dataclass
class LoadedProgram:
    fd: int
    insn_count: int
    keepalive: Any = field(default=None, repr=False)  # bcc's BPF object owns its fd

    def close(self) -> None:
        if self.keepalive is not None:
            self.keepalive.cleanup()
            self.keepalive = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def load_native(consts: ProgramConstants, fds: program.MapFds) -> LoadedProgram:
    insns = program.build(consts, fds)
    fd = syscalls.prog_load(
        syscalls.PROG_TYPE_SK_REUSEPORT,
        encode(insns),
        PROGRAM_NAME,
        syscalls.ATTACH_SK_REUSEPORT_SELECT,
    )
    return LoadedProgram(fd, len(insns))


def import_bcc() -> Any:
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for path in _DISTRO_PYTHON_PATHS:
        if (Path(path) / "bcc").is_dir() and path not in sys.path:
            sys.path.append(path)
    try:
        return importlib.import_module("bcc")
    except ImportError as exc:
        raise LoaderUnavailableError(f"--loader bcc: cannot import bcc ({exc}): {BCC_FIX}") from exc


def c_source() -> str:
    return (Path(__file__).parent / "select.c").read_text()


def bcc_cflags(consts: ProgramConstants, fds: program.MapFds) -> list[str]:
    defines = {
        "SOCKS_FD": fds.socks,
        "TABLE_FD": fds.table,
        "LIVE_FD": fds.live,
        "COUNTERS_FD": fds.counters,
        "V0": consts.v_init[0],
        "V1": consts.v_init[1],
        "V2": consts.v_init[2],
        "V3": consts.v_init[3],
        "MASK4": consts.mask4,
        "MASK6_0": consts.mask6[0],
        "MASK6_1": consts.mask6[1],
        "BUCKETS": BUCKETS,
        "MAX_SLOTS": MAX_SLOTS,
    }
    return [f"-D{name}={value:#x}ULL" for name, value in defines.items()]


def load_bcc(consts: ProgramConstants, fds: program.MapFds) -> LoadedProgram:
    bcc = import_bcc()
    if os.geteuid() != 0:
        raise PrivilegeError(f"--loader bcc needs root: {syscalls.PRIVILEGE_FIX}")
    try:
        bpf = bcc.BPF(text=c_source().encode(), cflags=bcc_cflags(consts, fds))
    except Exception as exc:
        # bcc raises plain Exception for a failed compile, most often missing kernel headers.
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LoaderUnavailableError(
            f"--loader bcc: compiling bpf/select.c failed ({first}): {BCC_FIX}"
        ) from exc
    try:
        fn = bpf.load_func(b"select_slot", syscalls.PROG_TYPE_SK_REUSEPORT)
    except Exception as exc:
        bpf.cleanup()
        raise VerifierError(f"--loader bcc: the kernel rejected the program ({exc})", str(exc)) from exc
    return LoadedProgram(fn.fd, len(bpf.dump_func(b"select_slot")) // 8, keepalive=bpf)


LOADERS: dict[str, Callable[[ProgramConstants, program.MapFds], LoadedProgram]] = {
    "native": load_native,
    "bcc": load_bcc,
}
