"""bpf(2) and the SO_REUSEPORT socket options through ctypes; errno becomes our errors.

Only this module talks to the kernel's BPF interface. It knows nothing of hashing or slots.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform
import socket

from ..errors import KernelError, PrivilegeError, UnsupportedKernelError, VerifierError
from . import capabilities

_SYS_BPF = {"x86_64": 321, "aarch64": 280}

# bpf(2) commands.
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, PROG_LOAD = 0, 1, 2, 3, 5
# Map and program types.
MAP_TYPE_ARRAY, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_REUSEPORT_SOCKARRAY = 2, 6, 20
PROG_TYPE_SK_REUSEPORT = 21
ATTACH_SK_REUSEPORT_SELECT = 39
# 5.14+: the program is also asked where to move the connections of a listener that closes.
ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE = 40
UPDATE_ANY = 0
# Socket options (x86 and arm values; parisc and sparc differ and are not supported).
SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68

PRIVILEGE_FIX = capabilities.GRANT

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


class _ElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
    ]


def _bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """Returns (result, errno); the caller turns errno into the right error for its context."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise UnsupportedKernelError(
            f"bpf(2) syscall number unknown on {platform.machine()}: ebpf-sticky supports x86_64 and aarch64"
        )
    result = _libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return result, (ctypes.get_errno() if result < 0 else 0)


def _raise_common(err: int, what: str) -> None:
    # EPERM is a missing capability, or a seccomp filter or LSM: the message tells which.
    # EACCES from PROG_LOAD is the verifier's "invalid access".
    if err == errno_mod.EPERM:
        raise capabilities.explain_own_eperm(what)
    if err == errno_mod.ENOSYS:
        raise UnsupportedKernelError(
            f"the kernel has no bpf(2) ({what}): use Linux 5.14 or newer built with CONFIG_BPF_SYSCALL",
            err,
        )


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0
) -> int:
    attr = _MapCreateAttr(map_type, key_size, value_size, max_entries, flags, 0, 0, name.encode())
    fd, err = _bpf(MAP_CREATE, attr)
    if fd < 0:
        _raise_common(err, f"creating BPF map {name!r}")
        if err == errno_mod.EINVAL:
            raise UnsupportedKernelError(
                f"the kernel does not support BPF map {name!r} (type {map_type}, flags {flags:#x}): "
                "use Linux 5.14 or newer",
                err,
            )
        raise KernelError(f"creating BPF map {name!r} failed: {os.strerror(err)}", err)
    return int(fd)


def _elem(
    cmd: int,
    fd: int,
    key: ctypes.Array[ctypes.c_char],
    value: ctypes.Array[ctypes.c_char] | None,
    flags: int = 0,
) -> int:
    attr = _ElemAttr(fd, ctypes.addressof(key), ctypes.addressof(value) if value is not None else 0, flags)
    result, err = _bpf(cmd, attr)
    return err if result < 0 else 0


def map_update(fd: int, key: bytes, value: bytes, what: str) -> None:
    err = _elem(
        MAP_UPDATE_ELEM,
        fd,
        ctypes.create_string_buffer(key, len(key)),
        ctypes.create_string_buffer(value, len(value)),
        UPDATE_ANY,
    )
    if err:
        _raise_common(err, what)
        raise KernelError(f"{what} failed: {os.strerror(err)}", err)


def map_delete(fd: int, key: bytes) -> None:
    """Delete an entry; a missing one is fine (the goal, an empty entry, holds)."""
    err = _elem(MAP_DELETE_ELEM, fd, ctypes.create_string_buffer(key, len(key)), None)
    if err and err != errno_mod.ENOENT:
        raise KernelError(f"deleting a BPF map entry failed: {os.strerror(err)}", err)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    err = _elem(MAP_LOOKUP_ELEM, fd, ctypes.create_string_buffer(key, len(key)), value)
    if err == errno_mod.ENOENT:
        return None
    if err:
        _raise_common(err, "reading a BPF map")
        raise KernelError(f"reading a BPF map failed: {os.strerror(err)}", err)
    return value.raw


def prog_load(prog_type: int, code: bytes, name: str, expected_attach_type: int) -> int:
    license_ = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(code, len(code))

    def attempt(log_level: int, log: ctypes.Array[ctypes.c_char] | None) -> tuple[int, int]:
        attr = _ProgLoadAttr(
            prog_type=prog_type,
            insn_cnt=len(code) // 8,
            insns=ctypes.addressof(insns),
            license=ctypes.addressof(license_),
            log_level=log_level,
            log_size=len(log) if log is not None else 0,
            log_buf=ctypes.addressof(log) if log is not None else 0,
            prog_name=name.encode()[:15],
            expected_attach_type=expected_attach_type,
        )
        return _bpf(PROG_LOAD, attr)

    fd, err = attempt(0, None)
    if fd >= 0:
        return int(fd)
    _raise_common(err, f"loading BPF program {name!r}")
    # Load again with a log: the verifier's words are the only useful diagnosis.
    log = ctypes.create_string_buffer(1 << 20)
    fd, err = attempt(1, log)
    if fd >= 0:
        return int(fd)
    text = log.value.decode(errors="replace").strip()
    last = text.splitlines()[-1] if text else os.strerror(err)
    raise VerifierError(
        f"the BPF verifier rejected {name!r}: {last} (kernel too old? use Linux 5.14 or newer; "
        "otherwise report this with the log from `ebpf-sticky doctor`)",
        text,
        err,
    )


def attach_reuseport(sock: socket.socket, prog_fd: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog_fd)
    except OSError as exc:
        if exc.errno == errno_mod.EPERM:
            raise capabilities.explain_own_eperm("attaching the program") from exc
        raise KernelError(
            f"attaching the program to the socket failed: {exc.strerror}", exc.errno or 0
        ) from exc


class SockFprog(ctypes.Structure):
    """struct sock_fprog: a classic BPF program as SO_ATTACH_REUSEPORT_CBPF and seccomp take it."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_reuseport_cbpf(sock: socket.socket, code: bytes) -> None:
    """Attach (or atomically replace) a classic BPF program on the socket's whole group.

    Needs no capability and no bpf(2): only a socket of the group.
    """
    insns = ctypes.create_string_buffer(code, len(code))
    fprog = SockFprog(len(code) // 8, ctypes.addressof(insns))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as exc:
        if exc.errno == errno_mod.EPERM:
            raise PrivilegeError(
                "attaching the classic BPF program was refused (permission denied): a seccomp filter "
                "or LSM forbids SO_ATTACH_REUSEPORT_CBPF here; allow it, or use --loader native",
                exc.errno,
            ) from exc
        if exc.errno == errno_mod.EINVAL:
            raise UnsupportedKernelError(
                "the kernel rejected the classic BPF program (EINVAL): use Linux 5.14 or newer",
                exc.errno,
            ) from exc
        raise KernelError(
            f"attaching the classic BPF program failed: {exc.strerror}", exc.errno or 0
        ) from exc


def possible_cpus() -> int:
    """Per-CPU map values have one entry per *possible* CPU, not per online CPU."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)


def borrow_socket(pid: int, fd: int) -> socket.socket:
    """A duplicate of process ``pid``'s socket ``fd`` (pidfd_getfd: ptrace rights over ``pid``,
    as root has). Options set on it are set on the very socket ``pid`` holds: for the benchmark
    and the tests, which inspect and turn a running instance's slot sockets."""
    pidfd = os.pidfd_open(pid)
    try:
        dup = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=dup)
