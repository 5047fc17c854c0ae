"""Socket.IO, the workload ebpf-sticky exists for: sessions established per second, and echo round
trips over WebSocket and over long-polling only, from sioload.py (raw Engine.IO v4, many client
addresses). python-socketio workers (sio_app.py) behind ebpf-sticky, nginx and HAProxy; a Node
socket.io worker (sio_worker.js) behind ebpf-sticky, sticky-session and @socket.io/sticky; and
sio_bare.js, the cheapest Engine.IO server, for the load generator's own ceiling."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .. import routers, stats
from ..common import Contender, Settings, interleaved, run_load
from ..plots import BarChart, Panel
from ..report import cell, ratio_line, table
from ..routers import Worker
from . import Block, Workload

SOURCES = 4096  # session loops cycle through these; each echo client keeps one address
BASES = ("nginx-ip-hash", "haproxy-source", "sticky-session", "socket.io-sticky")
CEILING = "engineio-bare"


@dataclass(frozen=True)
class Scenario:
    name: str  # sioload.py's scenario
    unit: str  # what one completion is
    concurrency: int  # session loops, or connected clients


SCENARIOS = (
    Scenario("sessions", "sessions", 32),
    # Enough clients that the hash's spread over 4 workers evens out (with 100, one worker often
    # holds a third of them, and the closed loop then waits on it).
    Scenario("websocket", "msgs", 200),
    Scenario("polling", "msgs", 200),
)


def workers(settings: Settings) -> list[Worker]:
    python = [
        Worker(f"socketio-python ({u.name})", "sio_app.py", u, socketio=True)
        for u in settings.uvicorn_configs
    ]
    if settings.quick:
        return python[:1]
    return [*python, Worker("socketio-node", "sio_worker.js", socketio=True)]


def contenders(settings: Settings, worker: Worker) -> list[Contender]:
    out = routers.contenders(settings, worker, with_bcc=False)
    if settings.quick:
        out = [c for c in out if c.name in ("ebpf-sticky", "nginx-ip-hash")]
    if worker.is_node:
        bare = Worker("engineio-bare", "sio_bare.js", socketio=True)
        out.insert(0, Contender(CEILING, routers.ebpf(settings, bare, "native")))
    return out


def _row(settings: Settings, worker: Worker, c: Contender, scenario: Scenario, seconds: float) -> stats.Row:
    before = routers.routed(settings, worker, c)
    argv = [str(settings.loadgen_python), "-m", "bench.sioload", "127.0.0.1", str(c.port), scenario.name]
    argv += [str(SOURCES), str(scenario.concurrency), str(seconds)]
    out, cpu = run_load(argv, seconds + 120, c, settings.loadgen_group)
    r = json.loads(out)
    if r["errors"]:
        print(f"    {c.name} {scenario.name}: {r['errors']} errors, e.g. {r['error_kinds']}", flush=True)
    completed = r["completed"]
    after = routers.routed(settings, worker, c)
    return {
        "rate": completed / r["elapsed"],
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": r["errors"],
        # How evenly ebpf-sticky spread this run's connections (the proxies' spread is not seen).
        "balance": stats.balance([b - a for a, b in zip(before, after, strict=True)], settings.workers)
        if before and after
        else None,
        "cpu_s_per_1k": stats.per_thousand(cpu.server, completed),
        # Of one core, over the whole run (setup included): the generator's headroom.
        "loadgen_cpu_pct": 100 * cpu.loadgen / max(r["elapsed"] + r["setup_s"], 1e-9),
        "others_cores": cpu.others / (r["elapsed"] + r["setup_s"]),
        "setup_s": r["setup_s"],
    }


def run(settings: Settings, worker: Worker, contenders: list[Contender]) -> Block:
    rounds = 1 if settings.quick else 3
    seconds = 1.0 if settings.quick else 3.0
    runs: stats.Runs = {c.name: {s.name: [] for s in SCENARIOS} for c in contenders}
    for round_, order in interleaved(contenders, rounds):
        for scenario in SCENARIOS:
            for c in order:
                row = _row(settings, worker, c, scenario, seconds)
                runs[c.name][scenario.name].append(row)
                print(
                    f"  round {round_ + 1} {scenario.name:<9} {c.name:<18} {row['rate']:8.0f} "
                    f"{scenario.unit}/s p99 {row['p99_ms']:.1f} ms",
                    flush=True,
                )
    by_scenario = {
        s.name: {
            "rate": stats.ratios(runs, "rate", "ebpf-sticky", BASES, [s.name]),
            "p99": stats.ratios(runs, "p99_ms", "ebpf-sticky", BASES, [s.name]),
            "cbpf_rate": stats.ratios(runs, "rate", "ebpf-sticky-cbpf", ("ebpf-sticky", *BASES), [s.name]),
        }
        for s in SCENARIOS
    }
    return {
        "rounds": rounds,
        "seconds": seconds,
        "sources": SOURCES,
        "scenarios": {s.name: {"unit": s.unit, "concurrency": s.concurrency} for s in SCENARIOS},
        "routers": stats.summarize(runs),
        "ratios": by_scenario,
        "runs": runs,
    }


def report(label: str, block: Block) -> list[str]:
    lines = [f"## {label}: Socket.IO (medians of {block['rounds']} rounds of {block['seconds']:g} s)", ""]
    for name, scenario in block["scenarios"].items():
        unit = scenario["unit"]
        header = [
            "router",
            f"{unit}/s",
            "p50 ms",
            "p99 ms",
            f"server CPU s / 1k {unit}",
            "errors",
            "balance",
            "loadgen % of a core",
        ]
        rows = [
            [
                router,
                cell(r["rate"]),
                cell(r["p50_ms"], 2),
                cell(r["p99_ms"], 2),
                cell(r["cpu_s_per_1k"], 3),
                cell(r["errors"]),
                cell(r["balance"], 3),
                cell(r["loadgen_cpu_pct"]),
            ]
            for router, by_scenario in block["routers"].items()
            for r in [by_scenario[name]]
        ]
        ratios = block["ratios"][name]
        lines += [
            f"### {name}: {scenario['concurrency']} concurrent",
            "",
            *table(header, rows),
            "",
            f"ebpf-sticky's {unit}/s, median of side-by-side per-round ratios: " + ratio_line(ratios["rate"]),
            "",
            "ebpf-sticky's p99 over theirs (below 1: lower): " + ratio_line(ratios["p99"]),
            "",
        ]
        if ratios["cbpf_rate"]:
            lines += [f"ebpf-sticky-cbpf's {unit}/s: " + ratio_line(ratios["cbpf_rate"]), ""]
    return lines


def charts(blocks: dict[str, Block]) -> list[BarChart]:
    panels = []
    for label, block in blocks.items():
        names = list(block["routers"])
        for name, scenario in block["scenarios"].items():
            series = {f"{scenario['unit']}/s": [block["routers"][n][name]["rate"] for n in names]}
            panels.append(Panel(f"{label}: {name}", f"{scenario['unit']} / s", names, series))
    # One figure per scenario kind keeps each one readable.
    return [
        BarChart(f"socketio-{kind}", [p for p in panels if p.title.endswith(f": {kind}")])
        for kind in ("sessions", "websocket", "polling")
    ]


WORKLOAD = Workload("socketio", workers, contenders, run, report, charts)
