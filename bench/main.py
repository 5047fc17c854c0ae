"""`python -m bench`: parse the options, run the chosen workloads, write bench/results/."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import kernel_figures, machine, plots, report
from .common import CLIENT_NET, REPO, RESULTS, CpuGroup, Settings, UvicornConfig, started, untracked
from .workloads import Block, Workload, http_requests, socketio_echo

WORKLOADS: tuple[Workload, ...] = (http_requests.WORKLOAD, socketio_echo.WORKLOAD)


PLAIN, FAST = ("asyncio", "h11", "wsproto"), ("uvloop", "httptools", "websockets")


def installed_fast_modules(venv_bin: Path) -> set[str]:
    probe = f"import importlib.util as u; print(' '.join(m for m in {FAST!r} if u.find_spec(m)))"
    done = subprocess.run([str(venv_bin / "python"), "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def uvicorn_configs(venv_bin: Path, fast_venv: Path | None, launch_help: str) -> tuple[UvicornConfig, ...]:
    """What the Python workers run on, behind every router alike: "plain" (asyncio, h11,
    wsproto) and, where installed, "fast" (uvloop, httptools, websockets).

    Where `launch` has --loop/--http/--ws, both come from one venv and are named on every command
    line. Where it has not, its worker takes uvicorn's "auto" choice (httptools and websockets if
    installed) on asyncio's loop: then each venv is one configuration, and the uvicorns behind
    the proxies are told the same."""
    venvs = [venv_bin, *([fast_venv] if fast_venv else [])]
    if all(f"--{option} " in launch_help for option in ("loop", "http", "ws")):
        out = [
            UvicornConfig(
                "plain", venv_bin, *PLAIN, ("--loop", PLAIN[0], "--http", PLAIN[1], "--ws", PLAIN[2])
            )
        ]
        fast_bin = next((v for v in reversed(venvs) if installed_fast_modules(v) == set(FAST)), None)
        if fast_bin:
            out.append(
                UvicornConfig(
                    "fast", fast_bin, *FAST, ("--loop", FAST[0], "--http", FAST[1], "--ws", FAST[2])
                )
            )
        return tuple(out)
    out = []
    for venv in venvs:
        have = installed_fast_modules(venv)
        http, ws = (
            ("httptools" if "httptools" in have else "h11"),
            ("websockets" if "websockets" in have else "wsproto"),
        )
        out.append(UvicornConfig("fast" if http == "httptools" else "plain", venv, "asyncio", http, ws, ()))
    return tuple(out)


def launch_help(venv_bin: Path) -> str:
    return subprocess.run(
        [str(venv_bin / "ebpf-sticky"), "launch", "--help"], capture_output=True, text=True, check=True
    ).stdout


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# ebpf-sticky benchmark {result['date']}", "", result["setup"], ""]
    lines += [report.load_line(result["load"]), ""]
    by_name = {w.name: w for w in WORKLOADS}
    for name, blocks in result["workloads"].items():
        for label, block in blocks.items():
            lines += by_name[name].report(label, block)
    lines += report.kernel_section(result["kernel"])
    lines += report.hash_section(result["hash"])
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stamp}.md").write_text(markdown(result))
    by_name = {w.name: w for w in WORKLOADS}
    charts = [chart for name, blocks in result["workloads"].items() for chart in by_name[name].charts(blocks)]
    written = plots.render(charts, result["hash"]["remap"], out_dir, stamp)
    return [out_dir / f"{stamp}.json", out_dir / f"{stamp}.md", *written]


def measure(settings: Settings, chosen: list[Workload]) -> dict[str, Any]:
    result: dict[str, Any] = {"workloads": {}, "kernel": {}, "load": []}
    with kernel_figures.bpf_stats_enabled():
        for workload in chosen:
            blocks: dict[str, Block] = {}
            for worker in workload.workers(settings):
                contenders = workload.contenders(settings, worker)
                before = machine.load()
                with started(contenders, worker.label):
                    blocks[worker.label] = workload.run(settings, worker, contenders)
                    for c in contenders:
                        if c.name.startswith("ebpf-sticky"):
                            stats = kernel_figures.bpf_stats(c.procs[0].pid)
                            result["kernel"][f"{c.name}/{worker.label}"] = {**c.info, **stats}
                block = f"{workload.name}/{worker.label}"
                result["load"].append({"block": block, "before": before, "after": machine.load()})
            result["workloads"][workload.name] = blocks
        result["kernel"]["floor"] = kernel_figures.floor_programs(300 if settings.quick else 2000)
        result["kernel"]["instructions"] = kernel_figures.program_sizes(settings.workers)
    result["hash"] = kernel_figures.hash_figures(settings.quick)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer routers, levels and rounds: under 60 s; a smoke run, so bench/results/ is left alone",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--tools",
        type=Path,
        help="where loadgen and bare were built (default: build them into a temporary directory)",
    )
    parser.add_argument(
        "--python-only", action="store_true", help="HTTP workload: Python workers only (no Node.js block)"
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the measured rounds, record one worker of each router with py-spy for this long "
        "under the same load: flame graph and top functions in the results (not in the figures)",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="write bench/results/ from a tree with uncommitted changes (marked dirty in the results)",
    )
    parser.add_argument(
        "--fast-venv",
        type=Path,
        help="a second venv with uvloop, httptools and websockets: Python workloads run from both",
    )
    parser.add_argument("--only", help="comma-separated workloads: " + ",".join(w.name for w in WORKLOADS))
    parser.add_argument("--replot", type=Path, help="only rewrite the table and plots of this results JSON")
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.replot:
        saved: dict[str, Any] = json.loads(args.replot.read_text())
        if "workloads" not in saved:
            print(f"python -m bench: {args.replot} is from an earlier bench (no 'workloads'): cannot replot")
            return 2
        for path in write_outputs(saved, args.replot.parent, args.replot.stem):
            print(f"wrote {path}")
        return 0
    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    # To the minute: two runs of one day are both kept.
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M")
    tree = machine.tree()
    writes = not args.no_write and not args.quick
    if writes and tree["dirty"] and not args.allow_dirty:
        print(
            "python -m bench: the tree has uncommitted changes (" + ", ".join(tree["changed"][:5]) + "): "
            "commit them so the results name the tree measured, or pass --no-write or --allow-dirty"
        )
        return 2
    venv_bin = Path(sys.executable).parent
    help_text = launch_help(venv_bin)
    configs = uvicorn_configs(venv_bin, args.fast_venv and args.fast_venv / "bin", help_text)
    if len({c.name for c in configs}) != len(configs):
        print(f"python -m bench: --fast-venv: both venvs run {configs[0].name}: {FAST} must differ")
        return 2
    settings = Settings(
        workers=args.workers,
        tools=args.tools or machine.build_tools(Path(tempfile.mkdtemp(prefix="ebpf-sticky-bench-tools-"))),
        venv_bin=venv_bin,
        quick=args.quick,
        uvicorn_configs=configs,
        launch_help=help_text,
        loadgen_python=configs[-1].venv_bin / "python",
        loadgen_group=CpuGroup("loadgen"),
        python_only=args.python_only,
        profile_seconds=args.profile,
        profile_dir=None if args.quick or args.no_write else RESULTS / f"{stamp}-profiles",
    )
    try:
        with untracked() as exempt:
            result = run(settings, chosen, tree)
    finally:
        settings.loadgen_group.remove()
    result["setup"] += (
        f"; the load generators' {CLIENT_NET} exempt from conntrack"
        if exempt
        else "; conntrack on for the load generators' traffic (no iptables): a full table drops SYNs"
    )
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    # A quick run is too short to stand as the day's results: it would overwrite a full run's.
    if writes:
        for path in write_outputs(result, RESULTS, stamp):
            print(f"wrote {path.relative_to(REPO)}")
    return 0


def run(settings: Settings, chosen: list[Workload], tree: machine.Tree) -> dict[str, Any]:
    began, configs = time.monotonic(), settings.uvicorn_configs
    grouped = (
        "each router and the load generator in a cpu cgroup of its own"
        if settings.loadgen_group.path
        else "no cpu cgroups (no cgroup v1 cpu controller): routers of more processes get more CPU under load"
    )
    named = tree["commit"][:12] + (" with uncommitted changes (dirty)" if tree["dirty"] else "")
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tree": tree,  # the commit measured, and whether the tree had uncommitted changes
        "setup": (
            f"tree {named}, {os.cpu_count()} cores, kernel {os.uname().release}, "
            f"{settings.workers} workers, {grouped}, "
            f"Python workers on uvicorn: "
            + "; ".join(f"{c.name} = {c.loop} loop, {c.http}, {c.ws}" for c in configs)
            + f"; interleaved rounds{' (--quick)' if settings.quick else ''}; ratios are taken within a "
            "round; absolute rates hold only on a quiet machine (see the load averages)"
        ),
        "uvicorn": {
            c.name: {"loop": c.loop, "http": c.http, "ws": c.ws, "venv": str(c.venv_bin)} for c in configs
        },
    }
    result.update(measure(settings, chosen))
    result["load_end"] = machine.load()
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
