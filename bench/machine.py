"""What a result must say about where it was measured: the committed tree, the machine's load
around each block, and the C tools built from ``native/``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TypedDict

from .common import NATIVE, REPO, RESULTS

TOOLS = ("loadgen", "bare")


class Tree(TypedDict):
    commit: str  # `git rev-parse HEAD`
    dirty: bool  # changes not committed: the figures belong to no commit
    changed: list[str]  # what differs from the commit (paths), for a dirty tree


class Load(TypedDict):
    load1: float  # 1-minute load average
    runnable: int  # processes runnable right now (procs_running), this one included
    cores: int


def changed_paths(porcelain: str, ignore: Path | None = None) -> list[str]:
    """Paths `git status --porcelain` lists, less those under ``ignore`` (relative to the repo):
    the results being written are not a change to the tree measured."""
    prefix = f"{ignore.as_posix().rstrip('/')}/" if ignore else None
    paths = [line[3:].split(" -> ")[-1] for line in porcelain.splitlines() if len(line) > 3]
    return [p for p in paths if not (prefix and p.startswith(prefix))]


def tree(repo: Path = REPO) -> Tree:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout

    changed = changed_paths(git("status", "--porcelain"), RESULTS.relative_to(REPO))
    return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed), "changed": changed}


def commit_of(ref: str, repo: Path = REPO) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", ref], capture_output=True, text=True, check=True
    ).stdout.strip()


def parse_loadavg(text: str) -> float:
    """The 1-minute figure of /proc/loadavg ("3.50 1.28 0.50 12/162 21300")."""
    return float(text.split()[0])


def parse_runnable(proc_stat: str) -> int:
    """``procs_running`` of /proc/stat: tasks on a run queue this instant (loadavg's 4th field
    counts the same, but /proc/stat names it)."""
    for line in proc_stat.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    raise ValueError("/proc/stat has no procs_running line")


def load() -> Load:
    return {
        "load1": parse_loadavg(Path("/proc/loadavg").read_text()),
        "runnable": parse_runnable(Path("/proc/stat").read_text()),
        "cores": os.cpu_count() or 1,
    }


def build_tools(dest: Path) -> Path:
    """Compile the C load generator and accept loop into ``dest`` (gcc -O2)."""
    dest.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(dest / tool), str(NATIVE / f"{tool}.c")], check=True)
    return dest
