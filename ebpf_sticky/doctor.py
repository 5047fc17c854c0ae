"""`ebpf-sticky doctor`: can this machine run a sticky group? Each problem comes with its fix."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .addresses import parse_bind
from .errors import PrivilegeError, StickyError
from .hashing import HashSpec
from .kernel import capabilities, syscalls
from .kernel.cbpf import MAX_CBPF_SLOTS
from .kernel.loaders import BCC_FIX, import_bcc
from .kernel.router import Router
from .sessions import prefilter

MIN_KERNEL = (5, 14)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # False: only the bcc loader or an optional feature needs it


def kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_kernel() -> Check:
    release = platform.release()
    ok = kernel_version(release) >= MIN_KERNEL
    return Check("kernel", ok, release, "" if ok else "upgrade to Linux 5.14 or newer")


def check_privileges() -> Check:
    """The same diagnosis as a refused launch: a missing capability is named; capabilities that are
    there and a bpf(2) that still says EPERM mean a seccomp filter or an LSM (probed with a tiny map)."""
    status = capabilities.read_status()
    effective = capabilities.parse_status(status).effective
    seccomp = capabilities.status_field(status, "Seccomp")
    held = ", ".join(
        f"CAP_{name} {'yes' if effective >> cap & 1 else 'no'}"
        for name, cap in (
            ("BPF", capabilities.CAP_BPF),
            ("SYS_ADMIN", capabilities.CAP_SYS_ADMIN),
            ("NET_ADMIN", capabilities.CAP_NET_ADMIN),
        )
    )
    filtered = {"0": "no", "2": "yes"}.get(seccomp, seccomp)
    detail = f"uid {os.geteuid()}, {held}, seccomp filter {filtered}"
    try:
        if capabilities.lacks_bpf(effective):
            raise capabilities.explain_own_eperm("bpf(2)")
        os.close(syscalls.map_create(syscalls.MAP_TYPE_ARRAY, 4, 4, 1, "sticky_probe"))
    except PrivilegeError as exc:
        # Without bpf(2), --loader auto runs the classic-BPF router: a warning, not a failure.
        reason = str(exc).removesuffix(": " + exc.fix)
        fix = f"{exc.fix} (--loader auto does that by itself: no counters, at most {MAX_CBPF_SLOTS} workers)"
        return Check("privileges", False, f"{detail}: {reason}", fix, required=False)
    except StickyError as exc:
        return Check("privileges", False, f"{detail}: {exc}", "see the kernel line", required=False)
    return Check("privileges", True, f"{detail}: bpf(2) allowed")


def check_group() -> Check:
    """A real group with --loader auto: which router a launch would run here, and why."""
    try:
        with Router.open(parse_bind("127.0.0.1:0"), HashSpec(os.urandom(16)), 2) as router:
            return Check(
                "sticky group",
                True,
                f"router {router.choice}; its program ({router.insn_count} instructions) attaches",
            )
    except PrivilegeError as exc:
        return Check("sticky group", False, str(exc).removesuffix(": " + exc.fix), exc.fix)
    except StickyError as exc:
        return Check("sticky group", False, str(exc), "see the privileges and kernel lines")


def check_bcc() -> Check:
    try:
        bcc = import_bcc()
    except StickyError:
        return Check("bcc", False, "not importable", BCC_FIX, required=False)
    build = Path(f"/lib/modules/{platform.release()}/build")
    if not build.exists():
        return Check(
            "bcc", False, f"bcc {getattr(bcc, '__version__', '?')} but no {build}", BCC_FIX, required=False
        )
    return Check(
        "bcc", True, f"bcc {getattr(bcc, '__version__', '?')}, headers at {build.resolve()}", required=False
    )


def check_migrate() -> Check:
    path = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    value = path.read_text().strip() if path.exists() else "absent"
    return Check(
        "tcp_migrate_req", True, f"{value} (not needed: the master keeps every slot's socket)", required=False
    )


def check_head_search() -> Check:
    if prefilter.NATIVE:
        return Check("session-key search", True, "in C", required=False)
    return Check(
        "session-key search",
        False,
        "in Python (built without a C compiler): --session-key costs each request about a microsecond more",
        "reinstall with a C compiler and Python's headers at hand (Debian: gcc libc6-dev python3-dev),"
        " with pip's --no-cache-dir so that a wheel built without them is not reused",
        required=False,
    )


CHECKS: tuple[Callable[[], Check], ...] = (
    check_kernel,
    check_privileges,
    check_group,
    check_bcc,
    check_migrate,
    check_head_search,
)


def run_doctor() -> int:
    checks = [check() for check in CHECKS]
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        print(f"{mark} {check.name}: {check.detail}")
        if check.fix and not check.ok:
            print(f"     fix: {check.fix}")
    ready = all(check.ok for check in checks if check.required)
    print("launch will work" if ready else "launch will not work until the FAIL lines are fixed")
    return 0 if ready else 1
