#!/usr/bin/env python3
"""Derive ebpf-sticky's seccomp profile from a container runtime's default profile.

    python3 derive.py < /usr/share/containers/seccomp.json > ebpf-sticky.json

The default profiles of podman/CRI-O (containers-common) allow bpf(2) only to holders of
CAP_SYS_ADMIN: a container given just CAP_BPF and CAP_NET_ADMIN gets EPERM from its first bpf()
call. This keeps every rule of the default and changes one thing: bpf(2) is also allowed when
the container holds CAP_BPF (the capability the kernel itself checks since Linux 5.8). Without
CAP_BPF or CAP_SYS_ADMIN it is still refused, as before. Standard library only.
"""

from __future__ import annotations

import json
import sys
from typing import Any

SYSCALL = "bpf"
CAP = "CAP_BPF"


def derive(default: dict[str, Any]) -> dict[str, Any]:
    """The default profile with bpf(2) allowed to CAP_BPF holders; pure."""
    profile: dict[str, Any] = json.loads(json.dumps(default))  # a deep copy: the caller's stays as it was
    rules: list[dict[str, Any]] = []
    for rule in profile["syscalls"]:
        excluded = rule.get("excludes", {}).get("caps", [])
        if SYSCALL in rule["names"] and rule["action"] != "SCMP_ACT_ALLOW" and excluded:
            # The rule that refuses bpf to containers without CAP_SYS_ADMIN: bpf leaves it for a
            # copy that also spares CAP_BPF holders, so the other syscalls keep their rule.
            refusal = {**rule, "names": [SYSCALL], "excludes": {**rule["excludes"], "caps": [*excluded, CAP]}}
            rest = [name for name in rule["names"] if name != SYSCALL]
            rules += [{**rule, "names": rest}, refusal] if rest else [refusal]
        else:
            rules.append(rule)
    rules.append(
        {
            "names": [SYSCALL],
            "action": "SCMP_ACT_ALLOW",
            "args": [],
            "comment": "ebpf-sticky: the kernel checks CAP_BPF for the maps and programs it loads",
            "includes": {"caps": [CAP]},
            "excludes": {},
        }
    )
    profile["syscalls"] = rules
    return profile


if __name__ == "__main__":
    json.dump(derive(json.load(sys.stdin)), sys.stdout, indent=2)
    sys.stdout.write("\n")
