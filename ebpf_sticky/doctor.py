"""`ebpf-sticky doctor`: can this machine run a sticky group? Each problem comes with its fix."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import parse_bind
from .errors import StickyError
from .hashing import HashSpec
from .kernel.cbpf import MAX_CBPF_SLOTS
from .kernel.loaders import BCC_FIX, import_bcc
from .kernel.router import Router

MIN_KERNEL = (5, 14)
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


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


def effective_caps(status_text: str) -> int:
    match = re.search(r"^CapEff:\s*([0-9a-f]+)", status_text, re.M)
    return int(match.group(1), 16) if match else 0


def check_privileges() -> Check:
    caps = effective_caps(Path("/proc/self/status").read_text())
    has_bpf = bool(caps & (1 << CAP_BPF) or caps & (1 << CAP_SYS_ADMIN))
    has_net = bool(caps & (1 << CAP_NET_ADMIN))
    ok = has_bpf and has_net
    yes_no = {True: "yes", False: "no"}
    detail = f"uid {os.geteuid()}, CAP_BPF/CAP_SYS_ADMIN {yes_no[has_bpf]}, CAP_NET_ADMIN {yes_no[has_net]}"
    # Without them --loader auto runs the classic-BPF router: a warning, not a failure.
    fix = (
        "run as root, or grant CAP_BPF and CAP_NET_ADMIN, for the eBPF router "
        f"(without: the classic-BPF router, no counters, at most {MAX_CBPF_SLOTS} workers)"
    )
    return Check("privileges", ok, detail, "" if ok else fix, required=False)


def check_group() -> Check:
    """A real group with --loader auto: which router a launch would run here, and why."""
    try:
        with Router.open(parse_bind("127.0.0.1:0"), HashSpec(os.urandom(16)), 2) as router:
            return Check(
                "sticky group",
                True,
                f"router {router.choice}; its program ({router.insn_count} instructions) attaches",
            )
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


CHECKS: tuple[Callable[[], Check], ...] = (
    check_kernel,
    check_privileges,
    check_group,
    check_bcc,
    check_migrate,
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
