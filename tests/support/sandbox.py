"""Privilege and syscall restrictions for tests: become nobody, or refuse bpf(2) with a filter.

Both act on the calling process (and what it execs): call them in a forked child or in a small
launcher that then execs the program under test.
"""

from __future__ import annotations

import os
import platform

from ebpf_sticky.kernel import capabilities
from ebpf_sticky.kernel.seccomp import install
from support.seccomp_jail import jail_program


def drop_to_nobody() -> None:
    """In a child: become nobody/nogroup with no capability at all, and check it from /proc."""
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)  # from root to non-root: the kernel clears every capability
    caps = capabilities.parse_status(capabilities.read_status())
    assert caps.effective == caps.permitted == caps.ambient == 0, caps
    assert os.geteuid() == 65534


def deny_bpf_syscall() -> None:
    """bpf(2) → EPERM for this process and what it execs, everything else allowed: the jail's
    filter (seccomp_jail.py), installed here rather than around an exec."""
    install(jail_program(platform.machine(), ["bpf"]))
