"""Linux capabilities: read them, drop them, and tell a missing capability from a filtered bpf(2).

Facts this module relies on (verified on Linux 6.18; docs/discussion/how-it-works.md, "Privileges"):
capset(2) can always lower the effective, permitted and inheritable sets; PR_CAP_AMBIENT_CLEAR_ALL
needs nothing; PR_CAPBSET_DROP needs CAP_SETPCAP; once no_new_privs is set, an exec never gains a
capability the process did not already have in its permitted set (not even a root exec, nor a
binary with file capabilities). Map updates, lookups and deletes through an fd already held need no
capability at all.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from errno import EPERM
from pathlib import Path

from ..errors import BpfDeniedError, PrivilegeError

CAP_DAC_OVERRIDE, CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 1, 5, 6, 7, 8
CAP_NET_BIND_SERVICE, CAP_NET_ADMIN = 10, 12
CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 16, 19, 21
CAP_PERFMON, CAP_BPF = 38, 39
# capability(7) names by number, for messages and for decoding /proc/PID/status masks.
_NAMES = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
]


def mask(*caps: int) -> int:
    return sum(1 << cap for cap in set(caps))


def names(caps: int) -> str:
    """``cap_bpf,cap_net_admin`` (capsh's spelling), or ``none``."""
    found = [f"cap_{_NAMES[i]}" if i < len(_NAMES) else f"cap_{i}" for i in range(64) if caps >> i & 1]
    return ",".join(found) or "none"


# Every capability, present and future: what a worker drops.
ALL = (1 << 64) - 1


@dataclass(frozen=True)
class CapSets:
    """A process's five capability sets, as /proc/PID/status shows them."""

    effective: int
    permitted: int
    inheritable: int
    ambient: int
    bounding: int

    def holding(self, caps: int) -> int:
        """Which of ``caps`` any of the sets that can reach an exec'd program still hold."""
        return caps & (self.effective | self.permitted | self.inheritable | self.ambient)


def status_field(status_text: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(\S+)", status_text, re.M)
    return match.group(1) if match else ""


def parse_status(status_text: str) -> CapSets:
    def field(name: str) -> int:
        return int(status_field(status_text, name) or "0", 16)

    return CapSets(field("CapEff"), field("CapPrm"), field("CapInh"), field("CapAmb"), field("CapBnd"))


def read_status(pid: int | str = "self") -> str:
    return Path(f"/proc/{pid}/status").read_text()


def in_initial_user_namespace() -> bool:
    """Capabilities held in any other user namespace (rootless containers) do not count for bpf(2)."""
    try:
        first = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return True
    return first[:3] == ["0", "0", "4294967295"]


# ---- the system calls ------------------------------------------------------------------------------
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 4, 24, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, what: str = "prctl") -> int:
    return _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), what)


def capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) sets."""
    data = (_Data * 2)()
    _check(_libc.capget(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capget")
    low, high = data
    return (
        low.effective | high.effective << 32,
        low.permitted | high.permitted << 32,
        low.inheritable | high.inheritable << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    def half(shift: int) -> _Data:
        return _Data(
            effective >> shift & 0xFFFFFFFF,
            permitted >> shift & 0xFFFFFFFF,
            inheritable >> shift & 0xFFFFFFFF,
        )

    data = (_Data * 2)(half(0), half(32))
    _check(_libc.capset(ctypes.byref(_Header(_LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")


def drop(caps: int) -> None:
    """Remove ``caps`` from this process for good: from the effective, permitted and inheritable
    sets, and from the bounding set where CAP_SETPCAP allows it. The kernel lowers the ambient set
    with them (a capability is ambient only while permitted and inheritable), so an exec keeps
    what was ambient and is not dropped: a non-root master's own exec (an in-place upgrade) still
    holds CAP_SETUID to start its workers. Raises OSError naming the step that failed."""
    effective, permitted, inheritable = capget()
    if effective >> CAP_SETPCAP & 1:
        for cap in range(len(_NAMES)):
            if caps >> cap & 1:
                prctl(_PR_CAPBSET_DROP, cap, f"dropping cap_{_NAMES[cap]} from the bounding set")
    if caps == ALL:
        prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient capabilities")
    capset(effective & ~caps, permitted & ~caps, inheritable & ~caps)


def set_no_new_privs() -> None:
    prctl(_PR_SET_NO_NEW_PRIVS, 1, "setting no_new_privs")


def set_not_dumpable() -> None:
    """Only CAP_SYS_PTRACE may then ptrace this process, read its memory or take its fds
    (pidfd_getfd); an exec'd child is dumpable again."""
    prctl(_PR_SET_DUMPABLE, 0, "making the process non-dumpable")


# ---- what an EPERM from bpf(2) means ---------------------------------------------------------------
# SK_REUSEPORT programs and their maps need CAP_BPF only (or CAP_SYS_ADMIN, which covers it): the
# kernel lists the type with socket filters, not among the CAP_NET_ADMIN ones (verified: a launch
# with CAP_BPF alone serves).
GRANT = "run as root, or grant CAP_BPF"
_GRANT_HOW = (
    f"{GRANT} (Kubernetes: capabilities add [BPF]; docker/podman: --cap-add BPF; systemd: "
    "AmbientCapabilities=CAP_BPF), or use the unprivileged router --loader cbpf"
)
_WAYS_OUT = (
    "run it under a seccomp profile that allows bpf(2) (deploy/ has one), or add CAP_SYS_ADMIN "
    "(default container profiles allow bpf(2) to it), or use the unprivileged router --loader cbpf"
)


def lacks_bpf(effective: int) -> bool:
    return not effective & mask(CAP_BPF, CAP_SYS_ADMIN)


def explain_eperm(what: str, effective: int, seccomp_mode: str, initial_userns: bool) -> PrivilegeError:
    """The error for an EPERM from ``what``: a missing capability (named), or the capability there
    and a filter that still says no. Pure: the caller reads the process's state."""
    refused = f"the kernel refused {what} (permission denied)"
    if lacks_bpf(effective):
        fix = _GRANT_HOW
        return PrivilegeError(f"{refused}: this process lacks CAP_BPF (or CAP_SYS_ADMIN): {fix}", EPERM, fix)
    held = ", ".join(
        f"CAP_{_NAMES[cap].upper()}"
        for cap in (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN)
        if effective >> cap & 1
    )
    if not initial_userns:
        fix = (
            "run it with CAP_BPF outside a user namespace (a rootful container), or use the "
            "unprivileged router --loader cbpf"
        )
        return PrivilegeError(
            f"{refused} although this process holds {held}: they are a user namespace's (rootless "
            f"container), which bpf(2) does not honour: {fix}",
            EPERM,
            fix,
        )
    where = (
        "this process runs under a seccomp filter"
        if seccomp_mode == "2"
        else "no seccomp filter here, so an LSM: SELinux, AppArmor, BPF LSM or lockdown"
    )
    return BpfDeniedError(
        f"{refused} although this process holds {held}: bpf(2) is denied by a seccomp filter or an "
        f"LSM, not for lack of capabilities ({where}): {_WAYS_OUT}",
        EPERM,
        _WAYS_OUT,
    )


def explain_own_eperm(what: str) -> PrivilegeError:
    """``explain_eperm`` for this process, from /proc/self/status."""
    status = read_status()
    return explain_eperm(
        what, parse_status(status).effective, status_field(status, "Seccomp"), in_initial_user_namespace()
    )
