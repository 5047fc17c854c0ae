"""Syscalls per connection of a contender's Python workers: ``strace -f -c`` attached to them for
one load run, each syscall's count divided by the connections accepted meanwhile.

strace slows the workers down many times over: its run gives counts, never CPU or rates.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypedDict

from .common import Contender
from .profiles import python_workers


class Calls(TypedDict):
    calls: int
    errors: int


def parse_summary(text: str) -> dict[str, Calls]:
    """The rows of ``strace -c``'s table ("% time seconds usecs/call calls [errors] syscall")."""
    rows: dict[str, Calls] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0][0].isdigit() or fields[-1] == "total":
            continue
        numbers = fields[3:-1]  # calls, and errors when there were any
        rows[fields[-1]] = {"calls": int(numbers[0]), "errors": int(numbers[1]) if len(numbers) > 1 else 0}
    return rows


def per_connection(rows: dict[str, Calls]) -> dict[str, float]:
    """Each syscall's calls (failed ones under ``NAME!``) per accepted connection: per
    successful accept4."""
    accept = rows.get("accept4", {"calls": 0, "errors": 0})
    accepted = accept["calls"] - accept["errors"]
    if accepted <= 0:
        return {}
    out: dict[str, float] = {}
    for name, row in rows.items():
        if row["calls"] - row["errors"]:
            out[name] = (row["calls"] - row["errors"]) / accepted
        if row["errors"]:
            out[f"{name}!"] = row["errors"] / accepted
    return out


@contextlib.contextmanager
def _attached(pids: list[int], out: Path) -> Iterator[None]:
    argv = ["strace", "-f", "-c", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        # strace says "Process N attached" once per thread it attached to.
        assert tracer.stderr is not None
        attached = 0
        while attached < len(pids):
            line = tracer.stderr.readline()
            if not line:
                raise RuntimeError(f"strace exited with {tracer.wait()}")
            attached += b"attached" in line
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(tracer.pid, signal.SIGINT)  # detaches and writes the summary
        tracer.wait(30)


def count(contender: Contender, run_load: Callable[[], object]) -> dict[str, float]:
    """Syscalls per connection of ``contender``'s workers over one ``run_load()``."""
    with tempfile.TemporaryDirectory(prefix="ebpf-sticky-strace-") as tmp:
        out = Path(tmp) / "summary"
        with _attached(python_workers(contender), out):
            run_load()
        return per_connection(parse_summary(out.read_text()))
