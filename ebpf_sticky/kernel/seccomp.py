"""A seccomp filter that keeps workers from replacing or detaching the selection program.

The kernel checks no privilege for SO_DETACH_REUSEPORT_BPF, nor for attaching a classic BPF
program: any process holding one socket of the group could undo the routing for all of them, and
every worker holds its slot's socket. The filter answers EPERM to exactly those setsockopt calls.
"""

from __future__ import annotations

import ctypes
import platform
import struct

from .syscalls import SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF

SO_ATTACH_REUSEPORT_CBPF = 51
SOL_SOCKET = 1
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_ERRNO_EPERM = 0x7FFF0000, 0x00050000 | 1
# (audit arch, setsockopt syscall number)
_ARCHES = {"x86_64": (0xC000003E, 54), "aarch64": (0xC00000B7, 208)}
# Classic BPF opcodes: load word absolute, jump if equal (constant), return constant.
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 * i (low half first on little-endian).
_NR, _ARCH, _LEVEL, _OPTNAME = 0, 4, 16 + 8, 16 + 16


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str) -> bytes:
    """The filter for this architecture, as struct sock_filter[]; pure.

    Any mismatch on arch, syscall or level jumps to "allow"; a forbidden option jumps to "deny".
    A jump's offset counts the instructions it skips: target - (pc + 1).
    """
    arch, setsockopt = _ARCHES[machine]
    checks = ((_ARCH, arch), (_NR, setsockopt), (_LEVEL, SOL_SOCKET))
    forbidden = (SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF)
    allow = 2 * len(checks) + 1 + len(forbidden)
    deny = allow + 1
    out: list[bytes] = []
    for field, value in checks:
        out.append(_insn(_LD_W_ABS, field))
        out.append(_insn(_JEQ_K, value, 0, allow - len(out) - 1))
    out.append(_insn(_LD_W_ABS, _OPTNAME))
    for option in forbidden:
        out.append(_insn(_JEQ_K, option, deny - len(out) - 1, 0))
    out += [_insn(_RET_K, _RET_ALLOW), _insn(_RET_K, _RET_ERRNO_EPERM)]
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def forbid_program_changes() -> bool:
    """Install the filter on the calling process (inherited across exec). Sets no_new_privs, which
    an unprivileged process needs for seccomp. Returns False where the kernel refuses."""
    if platform.machine() not in _ARCHES:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    code = filter_program(platform.machine())
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.addressof(buffer))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return bool(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0)
