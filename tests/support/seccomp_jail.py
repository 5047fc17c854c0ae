"""Run a command under a seccomp filter of our own that answers EPERM to chosen system calls: the
platform a hardened container runtime gives (bpf(2) filtered, seccomp refused).

    python seccomp_jail.py bpf -- COMMAND...            # bpf(2) denied
    python seccomp_jail.py seccomp prctl:22 -- COMMAND  # seccomp(2), prctl(PR_SET_SECCOMP) denied

A NAME:N rule denies the call only when its first argument is N. Needs root (CAP_SYS_ADMIN), so
no_new_privs stays unset and the command keeps every capability it is given.
"""

from __future__ import annotations

import os
import platform
import sys

from ebpf_sticky.kernel.seccomp import (
    ARCH,
    ARCHES,
    ARG0,
    JEQ_K,
    LD_W_ABS,
    NR,
    RET_ALLOW,
    RET_ERRNO_EPERM,
    RET_K,
    insn,
    install,
)

SYSCALLS = {
    "x86_64": {"bpf": 321, "seccomp": 317, "prctl": 157},
    "aarch64": {"bpf": 280, "seccomp": 277, "prctl": 167},
}


def jail_program(machine: str, rules: list[str]) -> bytes:
    """EPERM for each rule, everything else allowed (a foreign arch too: this jail is a platform,
    not a security boundary)."""
    # (code, k, jump if true, jump if false): a number skips that many instructions, a name goes
    # to that return.
    body: list[tuple[int, int, int | str, int | str]] = [
        (LD_W_ABS, ARCH, 0, 0),
        (JEQ_K, ARCHES[machine].audit, 0, "allow"),
        (LD_W_ABS, NR, 0, 0),
    ]
    for rule in rules:
        name, _, arg = rule.partition(":")
        nr = SYSCALLS[machine][name]
        if arg:
            # Not this call: skip the three that check its first argument and reload nr.
            body += [
                (JEQ_K, nr, 0, 3),
                (LD_W_ABS, ARG0, 0, 0),
                (JEQ_K, int(arg), "eperm", 0),
                (LD_W_ABS, NR, 0, 0),
            ]
        else:
            body.append((JEQ_K, nr, "eperm", 0))
    returns = {"allow": len(body), "eperm": len(body) + 1}

    def jump(pc: int, to: int | str) -> int:
        return returns[to] - (pc + 1) if isinstance(to, str) else to

    out = [insn(code, k, jump(pc, jt), jump(pc, jf)) for pc, (code, k, jt, jf) in enumerate(body)]
    return b"".join([*out, insn(RET_K, RET_ALLOW), insn(RET_K, RET_ERRNO_EPERM)])


def main(argv: list[str]) -> None:
    split = argv.index("--")
    install(jail_program(platform.machine(), argv[:split]))
    os.execvp(argv[split + 1], argv[split + 1 :])


if __name__ == "__main__":
    main(sys.argv[1:])
