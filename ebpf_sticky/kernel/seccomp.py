"""A seccomp filter that keeps workers from replacing or detaching the selection program.

The kernel checks no privilege for SO_DETACH_REUSEPORT_BPF, nor for attaching a classic BPF
program: any process holding one socket of the group could undo the routing for all of them, and
every worker holds its slot's socket. The filter answers EPERM to exactly those setsockopt calls on
the native system-call ABI.

A filter that looks only at native syscall numbers is bypassed through another ABI of the same
kernel: a 64-bit x86 process can make i386 system calls with `int $0x80` (setsockopt is 366 there)
and x32 ones by setting bit 30 of the number. So every system call from a foreign architecture, and
on x86_64 every x32 call, kills the process, as systemd's SystemCallArchitectures=native and
libseccomp's bad-arch default do: a worker never has a reason to make one, a 32-bit program under
the filter fails at once and visibly (SIGSYS) instead of limping along on EPERMs, and an exploit
attempt ends the worker, which the supervisor logs and replaces.

io_uring can set socket options without the setsockopt system call (IORING_OP_URING_CMD,
Linux 6.7+), out of the filter's sight: its three calls answer EPERM, as under Docker's default
profile; libuv and friends then fall back to epoll. bpf(2) answers EPERM too: updating a map
through an fd needs no capability, so a worker that somehow got one of the master's map fds could
rewrite the routing; no worker has a use for bpf(2).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from .syscalls import (
    SO_ATTACH_REUSEPORT_CBPF,
    SO_ATTACH_REUSEPORT_EBPF,
    SO_DETACH_REUSEPORT_BPF,
    SockFprog,
)

SOL_SOCKET = 1
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
RET_ERRNO_EPERM = 0x00050000 | 1
X32_SYSCALL_BIT = 0x40000000


class Arch:
    """What the filter needs to know of one architecture."""

    def __init__(self, audit: int, setsockopt: int, denied: tuple[int, ...], x32: bool) -> None:
        self.audit = audit  # AUDIT_ARCH_* of the native ABI
        self.setsockopt = setsockopt
        self.denied = denied  # bpf, io_uring_setup, io_uring_enter, io_uring_register
        self.x32 = x32  # numbers with X32_SYSCALL_BIT are another ABI on this arch


ARCHES = {
    "x86_64": Arch(0xC000003E, 54, (321, 425, 426, 427), x32=True),
    "aarch64": Arch(0xC00000B7, 208, (280, 425, 426, 427), x32=False),
}
# Classic BPF opcodes: load word absolute, jump if equal / greater or equal (constant), return.
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 * i (low half first on little-endian;
# setsockopt's level and optname are ints, so the kernel itself reads only that half).
NR, ARCH, ARG0 = 0, 4, 16
_LEVEL, _OPTNAME = ARG0 + 8, ARG0 + 16


def insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    """One struct sock_filter."""
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str) -> bytes:
    """The workers' filter for this architecture, as struct sock_filter[]; pure.

    Instructions are laid out with symbolic targets; a jump's offset is the number of instructions
    it skips, target - (pc + 1).
    """
    arch = ARCHES[machine]
    forbidden = (SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF)
    # (code, k, true target, false target); None falls through.
    body: list[tuple[int, int, str | None, str | None]] = [
        (LD_W_ABS, ARCH, None, None),
        (JEQ_K, arch.audit, None, "kill"),
        (LD_W_ABS, NR, None, None),
    ]
    if arch.x32:
        body.append((JGE_K, X32_SYSCALL_BIT, "kill", None))
    body += [(JEQ_K, nr, "eperm", None) for nr in arch.denied]
    body += [
        (JEQ_K, arch.setsockopt, None, "allow"),
        (LD_W_ABS, _LEVEL, None, None),
        (JEQ_K, SOL_SOCKET, None, "allow"),
        (LD_W_ABS, _OPTNAME, None, None),
    ]
    body += [(JEQ_K, option, "eperm", None) for option in forbidden]
    returns = {"allow": RET_ALLOW, "eperm": RET_ERRNO_EPERM, "kill": RET_KILL_PROCESS}
    target = {name: len(body) + i for i, name in enumerate(returns)}

    def offset(pc: int, name: str | None) -> int:
        return 0 if name is None else target[name] - (pc + 1)

    out = [insn(code, k, offset(pc, jt), offset(pc, jf)) for pc, (code, k, jt, jf) in enumerate(body)]
    # The last check falls through to "allow", which comes first among the returns.
    out += [insn(RET_K, value) for value in returns.values()]
    return b"".join(out)


def install(program: bytes) -> None:
    """Install ``program`` on the calling thread (inherited across fork and exec). Without
    CAP_SYS_ADMIN the kernel requires no_new_privs to be set first. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter: {os.strerror(err)}")


def forbid_program_changes() -> None:
    """Install the workers' filter on the calling process. Raises OSError where the kernel refuses,
    and on an architecture the filter does not know (it would not be a filter)."""
    machine = platform.machine()
    if machine not in ARCHES:
        raise OSError(0, f"no seccomp filter for {machine}: ebpf-sticky supports x86_64 and aarch64")
    install(filter_program(machine))
