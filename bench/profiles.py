"""Where one worker's time goes: py-spy samples of one worker per router under the workload's
load, as a flame graph (SVG) and as collapsed stacks summarised into a "top" table.

Profiling runs after the measured rounds and its load run is not in any figure: py-spy pauses the
worker for each sample (``--native`` needs it), so a sampled worker is slower. With ``--native``
uvloop's, httptools' and libc's C frames appear under the Python ones. py-spy leaves out samples
of a thread that is waiting (in epoll_wait): the shares are of the worker's busy time.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypedDict

from .common import RESULTS, Contender, tree_pids

TOP = 15  # functions kept in a summary


class Line(TypedDict):
    function: str
    self_pct: float  # samples with this function on top of the stack
    total_pct: float  # samples with this function anywhere on the stack


class Summary(TypedDict):
    samples: int
    idle_pct: float  # samples waiting in the event loop's poll that py-spy still recorded
    top: list[Line]


class Recorded(Summary):
    flame_graph: str | None  # the SVG, relative to bench/results/ when it is there


# The innermost frames of a loop waiting for events. py-spy drops most such samples itself, but
# not all in --native mode (uvloop waits in epoll_pwait); a poll that returns at once is counted
# as waiting too, a small undercount of busy time.
IDLE_MARKERS = ("epoll_wait (", "epoll_pwait (", "select (selectors.py")


def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's ``--format raw`` (Brendan Gregg's collapsed stacks): one ``a;b;c COUNT`` per line,
    outermost frame first. Lines that do not end in a count are skipped."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def is_idle(stack: tuple[str, ...]) -> bool:
    """The innermost frame waits for events (the loop's poll): the worker had nothing to do."""
    return bool(stack) and any(marker in stack[-1] for marker in IDLE_MARKERS)


def summarize(stacks: Counter[tuple[str, ...]], keep: int = TOP) -> Summary:
    """Self and total shares of each function over the busy samples (idle ones left out), the
    heaviest by self time first; a function recursing counts once per sample in its total."""
    busy = {s: n for s, n in stacks.items() if not is_idle(s)}
    all_samples, samples = sum(stacks.values()), sum(busy.values())
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    for stack, n in busy.items():
        own[stack[-1]] += n
        for frame in set(stack):
            anywhere[frame] += n

    def pct(n: int) -> float:
        return round(100 * n / samples, 1) if samples else 0.0

    top = [Line(function=f, self_pct=pct(n), total_pct=pct(anywhere[f])) for f, n in own.most_common(keep)]
    idle = round(100 * (all_samples - samples) / all_samples, 1) if all_samples else 0.0
    return {"samples": samples, "idle_pct": idle, "top": top}


def python_workers(contender: Contender) -> list[int]:
    """The contender's Python processes that have no Python children: its uvicorn workers (an
    ebpf-sticky master has its workers as children; nginx and HAProxy are not Python)."""
    pids = tree_pids([p.pid for p in contender.procs])
    pythons = [p for p in pids if _is_python(p)]
    parents = {_ppid(p) for p in pythons}
    return sorted(p for p in pythons if p not in parents)


def _is_python(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "python" in Path(f"/proc/{pid}/exe").resolve().name
    return False


def _ppid(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


def py_spy() -> str | None:
    """py-spy from this venv (``pip install py-spy``), else from PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record(
    contender: Contender, seconds: float, out_dir: Path, load: Callable[[], object]
) -> Recorded | None:
    """Sample two workers of ``contender`` while ``load()`` runs: the first into a flame graph
    (``<name>.svg``), the second into collapsed stacks (``<name>.txt``) summarised here. None
    when py-spy is missing or the router has no Python workers."""
    spy, workers = py_spy(), python_workers(contender)
    if spy is None or not workers:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    svg, raw = out_dir / f"{contender.name}.svg", out_dir / f"{contender.name}.txt"
    common = ["record", "--native", "--duration", str(round(seconds)), "--rate", "200"]
    spies = [
        subprocess.Popen(
            [spy, *common, "--format", fmt, "--output", str(path), "--pid", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fmt, path, pid in (("flamegraph", svg, workers[0]), ("raw", raw, workers[-1]))
    ]
    load()
    for proc in spies:
        proc.wait(seconds + 60)
    if not raw.exists():
        return None
    summary = summarize(parse_collapsed(raw.read_text()))
    graph = (svg.relative_to(RESULTS) if svg.is_relative_to(RESULTS) else svg) if svg.exists() else None
    return Recorded(**summary, flame_graph=str(graph) if graph else None)


def lines(name: str, summary: Recorded) -> Iterable[str]:
    graph = f" ([flame graph]({summary['flame_graph']}))" if summary.get("flame_graph") else ""
    yield (
        f"**{name}**{graph}: {summary['samples']} busy samples of one worker (py-spy --native, "
        "200 Hz); self % is time in the function itself, total % with what it calls"
    )
    yield ""
    yield "| function | self % | total % |"
    yield "|---|---|---|"
    for line in summary["top"]:
        yield f"| `{line['function']}` | {line['self_pct']} | {line['total_pct']} |"
    yield ""
