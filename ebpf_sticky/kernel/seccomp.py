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

The listener on fd 3 (``LISTEN_FD``): ``shutdown(3, …)`` or ``connect(3, AF_UNSPEC)`` takes a
listening socket out of the reuseport group, and a later ``listen()`` puts it back at the end, which
reorders the group (the classic program's positions) and empties its sockarray entry (eBPF). Both
answer EPERM on fd 3, as does ``setsockopt(3, SOL_SOCKET, SO_BINDTODEVICE/SO_BINDTOIFINDEX)``
(which rehashes a UDP socket out of the group). A filter sees argument values, never what a pointer
points to, so it guards the fd *number*: our Python worker never duplicates its listener, so for it
``dup(3)``, ``dup2/dup3(3, …)`` and ``fcntl(3, F_DUPFD*)`` answer EPERM too, and ``pidfd_getfd``
(another way to duplicate) always does. A ``-- COMMAND`` may need to duplicate fd 3 (gunicorn's
``fd://3`` does, then closes 3), so for commands the dup family stays open and a duplicate is not
guarded. Passing fd 3 to oneself over a Unix socket (SCM_RIGHTS) also yields an unguarded duplicate;
the master's membership watch (``supervisor/membership.py``) is the line behind the filter.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from enum import Enum

from ..contract import LISTEN_FD
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
    """What the filter needs to know of one architecture (system call numbers)."""

    def __init__(
        self,
        audit: int,
        setsockopt: int,
        denied: tuple[int, ...],
        x32: bool,
        unhash: tuple[int, ...],
        dups: tuple[int, ...],
        fcntl: int,
    ) -> None:
        self.audit = audit  # AUDIT_ARCH_* of the native ABI
        self.setsockopt = setsockopt
        self.denied = denied  # bpf, io_uring_setup, io_uring_enter, io_uring_register, pidfd_getfd
        self.x32 = x32  # numbers with X32_SYSCALL_BIT are another ABI on this arch
        self.unhash = unhash  # shutdown, connect: take a listener out of its group
        self.dups = dups  # dup, dup2 (x86_64 only), dup3: the fd to duplicate is the first argument
        self.fcntl = fcntl


ARCHES = {
    "x86_64": Arch(0xC000003E, 54, (321, 425, 426, 427, 438), True, (48, 42), (32, 33, 292), 72),
    "aarch64": Arch(0xC00000B7, 208, (280, 425, 426, 427, 438), False, (210, 203), (23, 24), 25),
}


class Listener(Enum):
    """How much of fd 3 the filter guards (see the module's docstring)."""

    SEALED = "sealed"  # our Python worker: no unhashing, no duplicate
    DUPLICABLE = "duplicable"  # a -- COMMAND: no unhashing through fd 3; duplicates allowed


# Classic BPF opcodes: load word absolute, jump if equal / greater or equal (constant), return.
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
# struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 * i (low half first on little-endian;
# fds, levels, optnames and fcntl commands are ints, so the kernel itself reads only that half).
NR, ARCH, ARG0 = 0, 4, 16
_ARG1, _ARG2 = ARG0 + 8, ARG0 + 16
_LEVEL, _OPTNAME = _ARG1, _ARG2
SO_BINDTODEVICE, SO_BINDTOIFINDEX = 25, 62
F_DUPFD, F_DUPFD_CLOEXEC = 0, 1030
# (code, k, true target, false target): a target is a label, None falls through; a bare str is a label.
_Step = tuple[int, int, "str | None", "str | None"] | str


def insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    """One struct sock_filter."""
    return struct.pack("=HBBI", code, jt, jf, k)


def filter_program(machine: str, listener: Listener = Listener.SEALED) -> bytes:
    """The workers' filter for this architecture, as struct sock_filter[]; pure.

    Steps are laid out with symbolic labels; a jump's offset is the number of instructions it
    skips, target - (pc + 1), and every jump goes forward.
    """
    arch = ARCHES[machine]
    guarded_fd = [*arch.unhash, *(arch.dups if listener is Listener.SEALED else ())]
    steps: list[_Step] = [
        (LD_W_ABS, ARCH, None, None),
        (JEQ_K, arch.audit, None, "kill"),
        (LD_W_ABS, NR, None, None),
    ]
    if arch.x32:
        steps.append((JGE_K, X32_SYSCALL_BIT, "kill", None))
    steps += [(JEQ_K, nr, "eperm", None) for nr in arch.denied]
    steps += [(JEQ_K, nr, "fd3", None) for nr in guarded_fd]
    if listener is Listener.SEALED:
        steps.append((JEQ_K, arch.fcntl, "fcntl", None))
    steps += [(JEQ_K, arch.setsockopt, None, "allow"), *_setsockopt_steps()]
    steps += ["fd3", (LD_W_ABS, ARG0, None, None), (JEQ_K, LISTEN_FD, "eperm", "allow")]
    if listener is Listener.SEALED:
        steps += [
            "fcntl",
            (LD_W_ABS, ARG0, None, None),
            (JEQ_K, LISTEN_FD, None, "allow"),
            (LD_W_ABS, _ARG1, None, None),
            (JEQ_K, F_DUPFD, "eperm", None),
            (JEQ_K, F_DUPFD_CLOEXEC, "eperm", "allow"),
        ]
    steps += ["allow", (RET_K, RET_ALLOW, None, None), "eperm", (RET_K, RET_ERRNO_EPERM, None, None)]
    steps += ["kill", (RET_K, RET_KILL_PROCESS, None, None)]
    return _assemble(steps)


def _setsockopt_steps() -> list[_Step]:
    """After ``nr == setsockopt``: the program-changing options on any fd, and the options that
    rehash a socket on fd 3."""
    forbidden = (SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF)
    return [
        (LD_W_ABS, _LEVEL, None, None),
        (JEQ_K, SOL_SOCKET, None, "allow"),
        (LD_W_ABS, _OPTNAME, None, None),
        *[(JEQ_K, option, "eperm", None) for option in forbidden],
        (JEQ_K, SO_BINDTODEVICE, "fd3", None),
        (JEQ_K, SO_BINDTOIFINDEX, "fd3", "allow"),
    ]


def _assemble(steps: list[_Step]) -> bytes:
    """Resolve labels to forward offsets and encode."""
    target: dict[str, int] = {}
    insns: list[tuple[int, int, str | None, str | None]] = []
    for step in steps:
        if isinstance(step, str):
            target[step] = len(insns)
        else:
            insns.append(step)

    def offset(pc: int, name: str | None) -> int:
        jump = 0 if name is None else target[name] - (pc + 1)
        if not 0 <= jump <= 0xFF:
            raise ValueError(f"seccomp jump from {pc} to {name} does not fit")
        return jump

    encoded = (insn(code, k, offset(pc, jt), offset(pc, jf)) for pc, (code, k, jt, jf) in enumerate(insns))
    return b"".join(encoded)


def install(program: bytes) -> None:
    """Install ``program`` on the calling thread (inherited across fork and exec). Without
    CAP_SYS_ADMIN the kernel requires no_new_privs to be set first. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"installing the seccomp filter: {os.strerror(err)}")


def forbid_program_changes(listener: Listener = Listener.SEALED) -> None:
    """Install the workers' filter on the calling process. Raises OSError where the kernel refuses,
    and on an architecture the filter does not know (it would not be a filter)."""
    machine = platform.machine()
    if machine not in ARCHES:
        raise OSError(0, f"no seccomp filter for {machine}: ebpf-sticky supports x86_64 and aarch64")
    install(filter_program(machine, listener))
