"""HTTP requests from the C load generator (loadgen.c): one GET per new connection at several
concurrency levels, then 20 GETs per keep-alive connection. Node and Python (uvicorn) workers."""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path

from .. import profiles, routers, stats
from ..common import Contender, Settings, interleaved, run_load
from ..plots import BarChart, Panel
from ..report import cell, ratio_line, table
from ..routers import Worker
from . import Block, Workload

SOURCES = 4096  # client addresses 127.0.x.y cycled by the load generator
# Keep-alive runs make 20 times fewer connections: fewer sources, so each still makes several
# connections and stickiness across them can be judged.
KEEPALIVE_SOURCES = 512
KEEPALIVE_REQUESTS = 20
KEEPALIVE_CONCURRENCY = 64
BASES = ("reuseport", "sticky-session", "nginx-ip-hash", "haproxy-source")
CEILING = "bare-accept"


def workers(settings: Settings) -> list[Worker]:
    node = Worker("node", "worker.js")
    python = [Worker(f"python ({u.name})", "app.py", u) for u in settings.uvicorn_configs]
    if settings.python_only:
        return python
    return [node] if settings.quick else [node, *python]


def contenders(settings: Settings, worker: Worker) -> list[Contender]:
    out = routers.contenders(settings, worker, with_bcc=not settings.quick)
    if settings.quick:  # a smoke run: one router of each kind
        out = [c for c in out if c.name in ("ebpf-sticky", "reuseport", "nginx-ip-hash")]
    # The cheapest server there is, in the same rounds: what the load generator can do at most.
    return [Contender(CEILING, routers.bare(settings)), *out] if worker.is_node else out


def load_row(
    settings: Settings, c: Contender, concurrency: int, seconds: float, per_connection: int
) -> stats.Row:
    """One run of the C load generator against ``c``: rates, latency, stickiness, and the CPU
    the server (``c``'s cgroup), the load generator and the rest of the machine spent."""
    sources = SOURCES if per_connection == 1 else KEEPALIVE_SOURCES
    argv = [str(settings.tools / "loadgen"), "127.0.0.1", str(c.port), str(sources), str(concurrency)]
    out, cpu = run_load(
        [*argv, str(seconds), str(per_connection)],
        seconds + 60,
        c,
        settings.loadgen_group,
    )
    r = json.loads(out)
    completed = r["completed"]
    return {
        "conn_per_s": completed / r["elapsed"] / per_connection,
        "req_per_s": completed / r["elapsed"],
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "errors": r["errors"],
        # None: no source made two connections, so stickiness was not observed.
        "sticky_pct": 100.0 * r["sticky_sources"] / r["sources_seen_twice"]
        if r["sources_seen_twice"]
        else None,
        "balance": stats.balance(r["per_worker"], settings.workers),
        "cpu_s_per_1k": stats.per_thousand(cpu.server, completed),
        "loadgen_cpu_s_per_1k": stats.per_thousand(cpu.loadgen, completed),
        "others_cores": cpu.others / r["elapsed"],
    }


def _measure(
    settings: Settings,
    contenders: list[Contender],
    levels: list[int],
    rounds: int,
    seconds: float,
    per_conn: int,
) -> stats.Runs:
    runs: stats.Runs = {c.name: {str(level): [] for level in levels} for c in contenders}
    for round_, order in interleaved(contenders, rounds):
        for level in levels:
            for c in order:
                row = load_row(settings, c, level, seconds, per_conn)
                runs[c.name][str(level)].append(row)
                print(
                    f"  round {round_ + 1} c={level:<4} requests/conn={per_conn:<3} {c.name:<18} "
                    f"{row['req_per_s']:9.0f} req/s",
                    flush=True,
                )
    return runs


def _profiles(
    settings: Settings, contenders: list[Contender], worker: Worker, level: int, seconds: float
) -> dict[str, profiles.Recorded]:
    """One py-spy run per router of Python workers, one request per connection (not measured)."""
    if not settings.profile_seconds or worker.is_node:
        return {}
    out_dir = settings.profile_dir or Path(tempfile.mkdtemp(prefix="ebpf-sticky-profiles-"))
    out_dir = out_dir / worker.label.replace(" ", "").replace("(", "-").replace(")", "")
    out: dict[str, profiles.Recorded] = {}
    for c in contenders:
        print(f"  profiling one worker of {c.name} for {settings.profile_seconds:g} s", flush=True)
        load = partial(load_row, settings, c, level, settings.profile_seconds, 1)
        if (summary := profiles.record(c, settings.profile_seconds, out_dir, load)) is not None:
            out[c.name] = summary
    return out


def run(settings: Settings, worker: Worker, contenders: list[Contender]) -> Block:
    levels = [64] if settings.quick else [64, 256]
    rounds = 2 if settings.quick else 3
    seconds = 1.0 if settings.quick else 3.0
    runs = _measure(settings, contenders, levels, rounds, seconds, 1)
    # Long-lived connections (Socket.IO's case after the handshake). The bare accept loop answers
    # one request per connection, so it sits this out.
    sticky = [c for c in contenders if c.name != CEILING]
    keepalive_rounds = 1 if settings.quick else rounds
    keepalive = _measure(
        settings, sticky, [KEEPALIVE_CONCURRENCY], keepalive_rounds, seconds, KEEPALIVE_REQUESTS
    )
    return {
        "profiles": _profiles(settings, contenders, worker, levels[-1], seconds),
        "levels": levels,
        "rounds": rounds,
        "seconds": seconds,
        "sources": SOURCES,
        "routers": stats.summarize(runs),
        "ratios": stats.ratios(runs, "conn_per_s", "ebpf-sticky", BASES),
        "ratios_cbpf": stats.ratios(runs, "conn_per_s", "ebpf-sticky-cbpf", ("reuseport", "ebpf-sticky")),
        # Lower is better here: ebpf-sticky's server CPU per connection over each base's.
        "cpu_ratios": stats.ratios(runs, "cpu_s_per_1k", "ebpf-sticky", BASES),
        "runs": runs,
        "keepalive": {
            "requests_per_connection": KEEPALIVE_REQUESTS,
            "concurrency": KEEPALIVE_CONCURRENCY,
            "sources": KEEPALIVE_SOURCES,
            "routers": stats.summarize(keepalive),
            "ratios": stats.ratios(keepalive, "req_per_s", "ebpf-sticky", BASES),
            "runs": keepalive,
        },
    }


def _table(routers_: dict[str, dict[str, stats.Row]], setting: str, rate: str) -> list[str]:
    header = [
        "router",
        rate,
        "p50 ms",
        "p99 ms",
        "sticky %",
        "balance",
        "server CPU µs / conn" if rate == "conn/s" else "server CPU µs / req",
        "errors",
    ]
    key = "conn_per_s" if rate == "conn/s" else "req_per_s"
    rows = [
        [
            name,
            cell(r[key]),
            cell(r["p50_ms"], 2),
            cell(r["p99_ms"], 2),
            cell(r["sticky_pct"], 1),
            cell(r["balance"], 3),
            cell(None if r["cpu_s_per_1k"] is None else 1000 * r["cpu_s_per_1k"], 0),
            cell(r["errors"]),
        ]
        for name, by_setting in routers_.items()
        for r in [by_setting[setting]]
    ]
    return table(header, rows)


def report(label: str, block: Block) -> list[str]:
    top = str(block["levels"][-1])
    lines = [
        f"## {label} worker: one request per new connection, {top} concurrent "
        f"(medians of {block['rounds']} rounds)",
        "",
        *_table(block["routers"], top, "conn/s"),
        "",
        "ebpf-sticky's rate, median of side-by-side per-round ratios over levels "
        f"{block['levels']}: " + ratio_line(block["ratios"]),
        "",
    ]
    if block.get("cpu_ratios"):
        lines += [
            "ebpf-sticky's server CPU per connection (lower is cheaper): " + ratio_line(block["cpu_ratios"]),
            "",
        ]
    for name, summary in block.get("profiles", {}).items():
        lines += list(profiles.lines(name, summary))
    if block["ratios_cbpf"]:
        lines += ["ebpf-sticky-cbpf's rate: " + ratio_line(block["ratios_cbpf"]), ""]
    ka = block["keepalive"]
    return [
        *lines,
        f"### {label} worker: {ka['requests_per_connection']} requests per connection, "
        f"{ka['concurrency']} concurrent",
        "",
        *_table(ka["routers"], str(ka["concurrency"]), "req/s"),
        "",
        "ebpf-sticky's rate: " + ratio_line(ka["ratios"]),
        "",
    ]


def charts(blocks: dict[str, Block]) -> list[BarChart]:
    def conn_panel(label: str, block: Block) -> Panel:
        names = list(block["routers"])
        series = {
            f"{level} concurrent": [block["routers"][n][str(level)]["conn_per_s"] for n in names]
            for level in block["levels"]
        }
        return Panel(f"{label} worker, one request per connection", "new connections / s", names, series)

    def cpu_panel(label: str, block: Block) -> Panel:
        # The figure that holds on a shared machine: each router's own cgroup, per connection.
        names, ka = list(block["routers"]), block["keepalive"]["routers"]

        def us(row: stats.Row | None) -> float | None:
            cpu = row and row["cpu_s_per_1k"]
            return 1000 * cpu if cpu else None

        series = {
            f"1 request/conn, {level} concurrent": [us(block["routers"][n][str(level)]) for n in names]
            for level in block["levels"]
        }
        concurrency = str(block["keepalive"]["concurrency"])
        series["per request, keep-alive"] = [us(ka.get(n, {}).get(concurrency)) for n in names]
        return Panel(f"{label} worker", "server CPU µs / conn (keep-alive: / req)", names, series)

    def latency_panel(label: str, block: Block) -> Panel:
        names, top = list(block["routers"]), str(block["levels"][-1])
        series = {k.split("_")[0]: [block["routers"][n][top][k] for n in names] for k in ("p50_ms", "p99_ms")}
        return Panel(f"{label} worker", f"latency ms at {top} concurrent", names, series)

    def keepalive_panel(label: str, block: Block) -> Panel:
        ka = block["keepalive"]
        names = list(ka["routers"])
        series = {"req/s": [ka["routers"][n][str(ka["concurrency"])]["req_per_s"] for n in names]}
        return Panel(
            f"{label} worker, {ka['requests_per_connection']} requests per connection",
            "requests / s",
            names,
            series,
        )

    return [
        BarChart("conn-per-s", [conn_panel(k, b) for k, b in blocks.items()]),
        BarChart("cpu-per-conn", [cpu_panel(k, b) for k, b in blocks.items()]),
        BarChart("latency", [latency_panel(k, b) for k, b in blocks.items()]),
        BarChart("keepalive", [keepalive_panel(k, b) for k, b in blocks.items()]),
    ]


WORKLOAD = Workload("http", workers, contenders, run, report, charts)
