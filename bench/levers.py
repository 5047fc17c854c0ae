"""One server setting at a time, measured by what it costs: ``python -m bench.levers LEVER...``.

For each lever, two ebpf-sticky instances serve the same Python app on the same uvicorn, "as
shipped" (A) and with the lever turned (B), in alternating rounds of the same load: one request
per new connection. The figure is the server's CPU time per connection (each instance's cgroup),
which other jobs on the machine do not change much; rates are shown but, on a shared machine,
say little. Every ratio B/A is taken within a round, then summarised over rounds.

The lever ``tree`` compares code rather than a setting: B runs ebpf_sticky as of ``--ref`` (main by
default). ``--strace`` adds, after the rounds, each side's syscalls per connection (see strace.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from ebpf_sticky.contract import LISTEN_FD
from ebpf_sticky.kernel.syscalls import borrow_socket

from . import machine, routers, stats, strace
from .common import REPO, RESULTS, Contender, CpuGroup, Settings, interleaved, started, untracked
from .main import launch_help, uvicorn_configs
from .profiles import python_workers
from .report import table
from .workloads.http_requests import load_row


@dataclass(frozen=True)
class Lever:
    describe: str  # what B is, against A as shipped
    options: tuple[str, ...] = ()  # `launch` options of B
    undefer: bool = False  # B: TCP_DEFER_ACCEPT turned off on the running slot sockets
    from_ref: bool = False  # B: ebpf_sticky as of --ref (master and workers), the rest as A


LEVERS = {
    "defer-accept": Lever("TCP_DEFER_ACCEPT off (B) against on, as shipped (A)", undefer=True),
    "server-header": Lever(
        "--no-server-header (B) against the Server header sent (A)", ("--no-server-header",)
    ),
    "date-header": Lever("--no-date-header (B) against the Date header sent (A)", ("--no-date-header",)),
    "access-log": Lever(
        "--access-log at info level (B) against no access log, as shipped (A)",
        ("--access-log", "--log-level", "info"),
    ),
    "proxy-headers": Lever(
        "--no-proxy-headers (B) against uvicorn's default, which checks every client against "
        "--forwarded-allow-ips (A)",
        ("--no-proxy-headers",),
    ),
    "tree": Lever("ebpf_sticky as of --ref (B) against this tree (A)", from_ref=True),
    "recycling": Lever(
        "--limit-max-requests (B: the recycling check on every tick) against none (A)",
        ("--limit-max-requests", "1000000000"),
    ),
}


def undeferred(start: Callable[[Contender], None]) -> Callable[[Contender], None]:
    """``start``, then TCP_DEFER_ACCEPT off on every worker's slot socket (the very sockets the
    master keeps: an option belongs to the socket, not to the fd)."""

    def run(c: Contender) -> None:
        start(c)
        for pid in python_workers(c):
            with borrow_socket(pid, LISTEN_FD) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 0)

    return run


def from_tree(start: Callable[[Contender], None], tree: Path) -> Callable[[Contender], None]:
    """``start`` with ``tree``'s ebpf_sticky first on the path: the master's, and its workers'
    (which inherit its environment)."""

    def run(c: Contender) -> None:
        os.environ["PYTHONPATH"] = str(tree)
        try:
            start(c)
        finally:
            del os.environ["PYTHONPATH"]

    return run


def extract(ref: str) -> Path:
    """``ref``'s ebpf_sticky package, in a directory of its own."""
    tree = Path(tempfile.mkdtemp(prefix="ebpf-sticky-ref-"))
    tree.chmod(0o755)  # the workers run as another user
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "ebpf_sticky"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def pair(
    settings: Settings, worker: routers.Worker, name: str, lever: Lever, ref_tree: Path | None
) -> list[Contender]:
    assert worker.uvicorn is not None
    turned = replace(
        worker,
        uvicorn=replace(worker.uvicorn, launch_options=(*worker.uvicorn.launch_options, *lever.options)),
    )
    b_start = routers.ebpf(settings, turned, "native")
    return [
        Contender(f"{name}:A", routers.ebpf(settings, worker, "native")),
        Contender(f"{name}:B", _turned(b_start, lever, ref_tree)),
    ]


def _turned(
    start: Callable[[Contender], None], lever: Lever, ref_tree: Path | None
) -> Callable[[Contender], None]:
    if lever.undefer:
        return undeferred(start)
    if lever.from_ref:
        assert ref_tree is not None
        return from_tree(start, ref_tree)
    return start


@dataclass(frozen=True)
class Run:
    rounds: int
    seconds: float
    concurrency: int
    ref_tree: Path | None  # --ref's ebpf_sticky, for the "tree" lever
    strace: bool  # after the rounds, count each side's syscalls per connection


def measure_lever(settings: Settings, worker: routers.Worker, name: str, run: Run) -> dict[str, Any]:
    rounds, seconds, concurrency = run.rounds, run.seconds, run.concurrency
    contenders = pair(settings, worker, name, LEVERS[name], run.ref_tree)
    runs: stats.Runs = {c.name: {"1": []} for c in contenders}
    before = machine.load()
    with started(contenders, worker.label):
        for round_, order in interleaved(contenders, rounds):
            for c in order:
                row = load_row(settings, c, concurrency, seconds, 1)
                runs[c.name]["1"].append(row)
                cpu = row["cpu_s_per_1k"]
                print(
                    f"  round {round_ + 1} {c.name:<16} {row['conn_per_s']:7.0f} conn/s "
                    f"{1000 * cpu if cpu else 0:6.0f} µs CPU/conn",
                    flush=True,
                )
        calls = {c.name: strace.count(c, partial(load_row, settings, c, concurrency, seconds, 1))
                 for c in (contenders if run.strace else [])}  # fmt: skip
    a, b = (c.name for c in contenders)
    return {
        "describe": LEVERS[name].describe,
        "load": {"before": before, "after": machine.load()},
        "cpu_us_per_conn": {side: _spread_us(runs[side]["1"]) for side in (a, b)},
        "cpu_ratio": stats.ratios(runs, "cpu_s_per_1k", b, [a]).get(a),
        "rate_ratio": stats.ratios(runs, "conn_per_s", b, [a]).get(a),
        "runs": runs,
        "syscalls_per_conn": calls,
    }


def _spread_us(rows: list[stats.Row]) -> stats.Spread | None:
    return stats.spread([1000 * v for r in rows if (v := r["cpu_s_per_1k"]) is not None])


def markdown(result: dict[str, Any]) -> str:
    def span(s: stats.Spread | None, digits: int = 0) -> str:
        return (
            "n/a" if s is None else f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
        )

    rows = []
    for name, lever in result["levers"].items():
        a, b = lever["cpu_us_per_conn"].values()
        load = lever["load"]
        rows.append(
            [
                name,
                lever["describe"],
                span(a),
                span(b),
                span(lever["cpu_ratio"], 3),
                span(lever["rate_ratio"], 3),
                f"{load['before']['load1']:.1f}→{load['after']['load1']:.1f}",
            ]
        )
    header = ["lever", "B against A", "A µs CPU/conn", "B µs CPU/conn", "B/A CPU", "B/A conn/s", "load"]
    lines = [
        f"# Levers {result['date']}",
        "",
        result["setup"],
        "",
        "Medians over rounds with their ranges; ratios taken within each round.",
        "",
        *table(header, rows),
        "",
    ]
    for name, lever in result["levers"].items():
        lines += syscalls_table(name, lever.get("syscalls_per_conn") or {})
    return "\n".join(lines)


def syscalls_table(name: str, calls: dict[str, dict[str, float]]) -> list[str]:
    """Syscalls per connection of each side (``NAME!``: the calls that failed), under strace."""
    if not calls:
        return []
    sides = list(calls)
    names = sorted(
        {n for side in calls.values() for n in side}, key=lambda n: -max(s.get(n, 0) for s in calls.values())
    )
    rows = [[n, *(f"{calls[side].get(n, 0):.2f}" for side in sides)] for n in names]
    rows.append(["**total**", *(f"**{sum(calls[side].values()):.2f}**" for side in sides)])
    title = f"{name}: syscalls per connection of the workers (strace -f -c, one run per side)"
    return [title, "", *table(["syscall", *sides], rows), ""]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__)
    parser.add_argument("levers", nargs="+", choices=sorted(LEVERS), metavar="LEVER")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--config", choices=["plain", "fast"], default="fast", help="uvicorn's loop and parser"
    )
    parser.add_argument("--ref", default="main", help='the git ref the "tree" lever runs as B')
    parser.add_argument(
        "--strace", action="store_true", help="also count each side's syscalls per connection"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--write", action="store_true", help="write bench/results/<date>T<time>-levers.{json,md}"
    )
    args = parser.parse_args()
    tree = machine.tree()
    if args.write and tree["dirty"]:
        print(
            "python -m bench.levers: the tree has uncommitted changes: commit them first, or do not --write"
        )
        return 2
    venv_bin = Path(sys.executable).parent
    help_text = launch_help(venv_bin)
    config = next(c for c in uvicorn_configs(venv_bin, None, help_text) if c.name == args.config)
    settings = Settings(
        workers=args.workers,
        tools=machine.build_tools(Path(tempfile.mkdtemp(prefix="ebpf-sticky-bench-tools-"))),
        venv_bin=venv_bin,
        quick=False,
        uvicorn_configs=(config,),
        launch_help=help_text,
        loadgen_python=venv_bin / "python",
        loadgen_group=CpuGroup("loadgen"),
    )
    worker = routers.Worker(f"python ({config.name})", "app.py", config)
    run = Run(
        args.rounds,
        args.seconds,
        args.concurrency,
        extract(args.ref) if "tree" in args.levers else None,
        args.strace,
    )
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tree": tree,
        "setup": (
            f"tree {tree['commit'][:12]}{' (dirty)' if tree['dirty'] else ''}, {settings.workers} workers on "
            f"{config.loop} + {config.http}, one request per new connection, {args.concurrency} concurrent, "
            f"{args.rounds} alternating rounds of {args.seconds:g} s per side"
            + (f"; --ref {args.ref} is {machine.commit_of(args.ref)[:12]}" if run.ref_tree else "")
        ),
        "levers": {},
    }
    try:
        with untracked():
            for name in args.levers:
                print(f"{name}: {LEVERS[name].describe}", flush=True)
                result["levers"][name] = measure_lever(settings, worker, name, run)
    finally:
        settings.loadgen_group.remove()
        if run.ref_tree is not None:
            shutil.rmtree(run.ref_tree)
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.write:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M")
        (RESULTS / f"{stamp}-levers.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{stamp}-levers.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
