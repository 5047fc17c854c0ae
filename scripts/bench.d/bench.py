"""ebpf-sticky against the routers users would use instead, side by side in one run.

Every router fronts the very same worker program (one Node.js HTTP worker, and separately one
Python ASGI worker), the same load generator hits each in interleaved rounds, and every figure is
a median over rounds. Run through `scripts/bench` (which builds the C tools and finds the venv).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from seedhash import seed_worker  # noqa: E402

from ebpf_sticky.config import parse_bind  # noqa: E402
from ebpf_sticky.hashing import (  # noqa: E402
    BUCKETS,
    Address,
    HashSpec,
    bucket_table,
    buckets_of,
)
from ebpf_sticky.kernel import asm, syscalls  # noqa: E402
from ebpf_sticky.kernel.router import Router  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SOURCES = 4096  # client addresses 127.0.x.y cycled by the load generator
# Keep-alive runs make 20 times fewer connections: fewer sources, so each still makes several
# connections and stickiness across them can be judged.
KEEPALIVE_SOURCES = 512


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(port: int, procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(proc.poll() is not None for proc in procs):
            raise RuntimeError(f"a process serving port {port} exited")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing serves on port {port} after {timeout} s")


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


@dataclass
class Router_:
    """One router under test: how to start it, and what it tells us once started."""

    name: str
    start: Callable[[Router_], None]
    port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ebpf-sticky-bench-")))
    info: dict[str, Any] = field(default_factory=dict)

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{len(self.procs)}.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_with_log(self, error: Exception) -> RuntimeError:
        logs = "\n".join(self.log(i) for i in range(len(self.procs)))
        return RuntimeError(f"{self.name}: {error}\n{logs}")

    def log(self, index: int = 0) -> str:
        return (self.tmp / f"{index}.log").read_text(errors="replace")

    def stop(self) -> None:
        # TERM first, so every router cleans up after itself (ebpf-sticky's control socket).
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def worker_argv(kind: str) -> list[str]:
    if kind == "node":
        return ["node", str(HERE / "worker.js"), "fd3"]
    return []


def start_ebpf(loader: str, kind: str, detach: bool = False) -> Callable[[Router_], None]:
    def start(r: Router_) -> None:
        target = ["--", *worker_argv(kind)] if kind == "node" else [str(HERE / "app.py")]
        argv = [
            str(VENV_BIN / "ebpf-sticky"),
            "launch",
            "-w",
            str(WORKERS),
            "-b",
            "127.0.0.1:0",
            "--loader",
            loader,
            "--log-level",
            "info",
            "--graceful-timeout",
            "1",
        ]
        started = time.monotonic()
        r.spawn([*argv, *target], cwd=HERE)
        end = started + 120
        while not (m := re.search(r"slots on 127\.0\.0\.1:(\d+) .*?(\d+) BPF instructions", r.log())):
            if time.monotonic() > end or r.procs[0].poll() is not None:
                raise RuntimeError(f"{r.name} did not start:\n{r.log()}")
            time.sleep(0.01)
        r.port, insns = int(m.group(1)), int(m.group(2))
        wait_http(r.port, r.procs)
        while "slots serving" not in r.log():
            time.sleep(0.01)
        r.info.update(
            launch_to_serving_s=round(time.monotonic() - started, 3),
            insns=insns,
            master_rss_kib=rss_kib(r.procs[0].pid),
        )
        if detach:
            # Join the group with a socket of our own (same uid), detach the program group-wide,
            # leave again: the very same sockets and workers, routed by the kernel's 4-tuple hash.
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(("127.0.0.1", r.port))
                sock.listen(1)
                sock.setsockopt(socket.SOL_SOCKET, syscalls.SO_DETACH_REUSEPORT_BPF, 0)

    return start


def start_sticky_session(r: Router_) -> None:
    r.port = free_port()
    r.spawn(["node", str(HERE / "worker.js"), "sticky", str(r.port), str(WORKERS)], cwd=REPO)
    wait_http(r.port, r.procs)


def start_backends(r: Router_, kind: str) -> list[int]:
    ports = [free_port() for _ in range(WORKERS)]
    for i, port in enumerate(ports):
        if kind == "node":
            r.spawn(["node", str(HERE / "worker.js"), "port", str(port), str(i)])
        else:
            r.spawn(
                [str(VENV_BIN / "uvicorn"), "app:app", "--port", str(port), "--log-level", "warning"],
                cwd=HERE,
                env={**os.environ, "WORKER_ID": str(i)},
            )
    for port in ports:
        wait_http(port, r.procs)
    return ports


def start_nginx(kind: str) -> Callable[[Router_], None]:
    def start(r: Router_) -> None:
        ports = start_backends(r, kind)
        r.port = free_port()
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in ports)
        (r.tmp / "nginx.conf").write_text(f"""
worker_processes {os.cpu_count()};
pid {r.tmp}/nginx.pid;
error_log stderr error;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  upstream workers {{
    hash $remote_addr consistent;
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{r.port} backlog=4096;
    location / {{
      proxy_pass http://workers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
        r.spawn(["nginx", "-p", str(r.tmp), "-c", str(r.tmp / "nginx.conf"), "-g", "daemon off;"])
        wait_http(r.port, r.procs)

    return start


def start_haproxy(kind: str) -> Callable[[Router_], None]:
    def start(r: Router_) -> None:
        ports = start_backends(r, kind)
        r.port = free_port()
        servers = "\n".join(f"  server w{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
        (r.tmp / "haproxy.cfg").write_text(f"""
global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend f
  bind 127.0.0.1:{r.port}
  default_backend workers
backend workers
  balance source
  hash-type consistent
  http-reuse always
{servers}
""")
        r.spawn(["haproxy", "-db", "-f", str(r.tmp / "haproxy.cfg")])
        wait_http(r.port, r.procs)

    return start


def start_bare(r: Router_) -> None:
    r.port = free_port()
    r.spawn([str(TOOLS / "bare"), str(r.port), str(WORKERS)])
    wait_http(r.port, r.procs)


def routers_for(kind: str) -> list[Router_]:
    routers = [
        Router_("ebpf-sticky", start_ebpf("native", kind)),
        Router_("ebpf-sticky-bcc", start_ebpf("bcc", kind)),
        Router_("reuseport", start_ebpf("native", kind, detach=True)),
    ]
    if kind == "node":
        routers.append(Router_("sticky-session", start_sticky_session))
    routers += [Router_("nginx-ip-hash", start_nginx(kind)), Router_("haproxy-source", start_haproxy(kind))]
    return routers


def busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load(port: int, concurrency: int, seconds: float, per_connection: int, sources: int) -> dict[str, Any]:
    """One load-generator run, plus CPU: the generator's own, and the server side's (the whole
    machine's busy time minus the generator's), so kernel and softirq work count too."""
    busy = busy_seconds()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [
        str(TOOLS / "loadgen"),
        "127.0.0.1",
        str(port),
        str(sources),
        str(concurrency),
        str(seconds),
        str(per_connection),
    ]
    out = subprocess.run(argv, capture_output=True, check=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = json.loads(out)
    result["loadgen_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["server_cpu_s"] = max(busy_seconds() - busy - result["loadgen_cpu_s"], 0.0)
    return result


def measure(
    routers: list[Router_], levels: list[int], rounds: int, seconds: float, per_connection: int = 1
) -> dict[str, Any]:
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {r.name: {c: [] for c in levels} for r in routers}
    for round_ in range(rounds):
        order = routers[round_ % len(routers) :] + routers[: round_ % len(routers)]
        for concurrency in levels:
            for router in order:
                sources = SOURCES if per_connection == 1 else KEEPALIVE_SOURCES
                result = load(router.port, concurrency, seconds, per_connection, sources)
                completed = result["completed"]
                per_worker = result["per_worker"]
                runs[router.name][concurrency].append(
                    {
                        "conn_per_s": completed / result["elapsed"] / per_connection,
                        "req_per_s": completed / result["elapsed"],
                        "p50_ms": result["p50_us"] / 1000,
                        "p99_ms": result["p99_us"] / 1000,
                        "errors": result["errors"],
                        # None: no source made two connections, so stickiness was not observed.
                        "sticky_pct": 100.0 * result["sticky_sources"] / result["sources_seen_twice"]
                        if result["sources_seen_twice"]
                        else None,
                        "balance": max(per_worker) / (sum(per_worker) / WORKERS) if per_worker else 0.0,
                        "cpu_s_per_1k": 1000 * result["server_cpu_s"] / max(completed, 1),
                        "loadgen_cpu_s_per_1k": 1000 * result["loadgen_cpu_s"] / max(completed, 1),
                    }
                )
                print(
                    f"  round {round_ + 1} c={concurrency:<4} requests/conn={per_connection:<3} "
                    f"{router.name:<16} {runs[router.name][concurrency][-1]['req_per_s']:9.0f} req/s",
                    flush=True,
                )
    return runs


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 4) if known else None


def summarize(runs: dict[str, Any], levels: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, per_level in runs.items():
        levels_out = {}
        for concurrency in levels:
            rs = per_level[concurrency]
            levels_out[str(concurrency)] = {k: _median([r[k] for r in rs]) for k in rs[0]}
        top = levels_out[str(max(levels))]
        summary[name] = {**top, "by_concurrency": levels_out}
    return summary


def ratios(runs: dict[str, Any], levels: list[int], base: str) -> dict[str, float]:
    """ebpf-sticky's req/s over ``base``'s, per round and level (side by side), then the median."""
    if base not in runs:
        return {}
    values = [
        ours["req_per_s"] / theirs["req_per_s"]
        for c in levels
        for ours, theirs in zip(runs["ebpf-sticky"][c], runs[base][c], strict=True)
    ]
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def bpf_stats(master_pid: int) -> dict[str, float]:
    for fdinfo in Path(f"/proc/{master_pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            text = fdinfo.read_text()
            if re.search(r"^prog_type:\s+21$", text, re.M):
                run_ns = int(re.search(r"run_time_ns:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
                runs = int(re.search(r"run_cnt:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
                return {"run_cnt": runs, "ns_per_selection": round(run_ns / max(runs, 1), 1)}
    return {}


def floor_programs(connections: int) -> dict[str, float]:
    """What this kernel charges for the least a selection program can do: an empty program, and
    one that only reads the source address and selects slot 0."""
    spec = HashSpec(os.urandom(16))
    with Router.open(parse_bind("127.0.0.1:0"), spec, 2) as router:
        socks_fd = router._fds.socks if router._fds else -1  # noqa: SLF001 - a bench peeks inside
        variants = {
            "empty_program_ns": [asm.mov(asm.R0, 1), asm.exit_()],
            "load_and_select_ns": [
                asm.movr(asm.R6, asm.R1),
                asm.mov(asm.R2, 12),
                asm.movr(asm.R3, asm.R10),
                asm.alu64("add", asm.R3, -16),
                asm.mov(asm.R4, 4),
                asm.mov(asm.R5, 1),
                asm.call(68),
                asm.st(asm.W, asm.R10, -8, 0),
                asm.movr(asm.R1, asm.R6),
                *asm.ld_map_fd(asm.R2, socks_fd),
                asm.movr(asm.R3, asm.R10),
                asm.alu64("add", asm.R3, -8),
                asm.mov(asm.R4, 0),
                asm.call(82),
                asm.mov(asm.R0, 1),
                asm.exit_(),
            ],
        }
        out = {}
        programs = {
            name: syscalls.prog_load(21, asm.encode(asm.assemble(insns)), "floor", 39)
            for name, insns in variants.items()
        }
        programs["full_program_ns"] = router.program_fd
        for name, fd in programs.items():
            syscalls.attach_reuseport(router.sockets[0], fd)
            before = _fd_stats(fd)
            for i in range(connections):
                with socket.socket() as client:
                    client.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
                    client.connect(("127.0.0.1", router.port))
                for sock in router.sockets:
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            sock.accept()[0].close()
            after = _fd_stats(fd)
            out[name] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 1)
            if name != "full_program_ns":
                os.close(fd)
        return out


def _fd_stats(fd: int) -> tuple[int, int]:
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    ns = int(re.search(r"run_time_ns:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    cnt = int(re.search(r"run_cnt:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return ns, cnt


def hash_figures(quick: bool) -> dict[str, Any]:
    spec = HashSpec(os.urandom(16))
    rng = random.Random(7)
    n4, seq_prefix = (100_000, 15) if quick else (1_000_000, 12)
    sets: dict[str, list[Address]] = {
        "random_ipv4": [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(n4)],
        f"sequential_ipv4_{seq_prefix}": [
            ipaddress.IPv4Address(0x0A000000 + i) for i in range(1 << (32 - seq_prefix))
        ],
        "random_ipv6_64s": [ipaddress.IPv6Address(rng.getrandbits(64) << 64) for _ in range(100_000)],
    }
    balance = {}
    for name, addresses in sets.items():
        table = bucket_table(8)
        counts = Counter(table[b] for b in buckets_of(addresses, spec))
        balance[name] = {
            "addresses": len(addresses),
            "slots": 8,
            "max_over_mean": round(max(counts.values()) / (len(addresses) / 8), 4),
        }
    buckets = buckets_of(sets["random_ipv4"], spec)
    seed = rng.getrandbits(31)
    packed = [a.packed for a in sets["random_ipv4"][:100_000]]
    remap = []
    for n in range(2, 17):
        before, after = bucket_table(n), bucket_table(n + 1)
        ours = sum(before[b] != after[b] for b in buckets) / len(buckets)
        modulo = sum(seed_worker(p, seed, n) != seed_worker(p, seed, n + 1) for p in packed) / len(packed)
        remap.append(
            {
                "n": n,
                "ideal": round(1 / (n + 1), 4),
                "ebpf_sticky": round(ours, 4),
                "sticky_session_modulo": round(modulo, 4),
            }
        )
    # The seed's skew: its int31 hash over 10 workers (uqee/sticky-cluster measured 27,367 of 100k
    # on one worker); the worst of a few random seeds, as each restart draws a new one.
    worst = 0.0
    for _ in range(5):
        s = rng.getrandbits(31)
        counts10 = Counter(seed_worker(p, s, 10) for p in packed)
        worst = max(worst, max(counts10.values()) / len(packed))
    return {
        "buckets": BUCKETS,
        "balance": balance,
        "remap": remap,
        "sticky_session_max_share_10_workers": round(worst, 4),
        "ideal_share_10_workers": 0.1,
    }


def write_outputs(result: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stamp}.json"]
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / f"{stamp}.md").write_text(md)
    written.append(out_dir / f"{stamp}.md")
    written += plots(result, out_dir, stamp)
    return written


def _router_table(routers: dict[str, Any], rate: str) -> list[str]:
    lines = [
        f"| router | {rate} | p50 ms | p99 ms | sticky % | balance | server CPU s / 1k conn | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    key = "conn_per_s" if rate == "conn/s" else "req_per_s"
    for name, r in routers.items():
        sticky = "n/a" if r["sticky_pct"] is None else f"{r['sticky_pct']:.1f}"
        lines.append(
            f"| {name} | {r[key]:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {sticky} | "
            f"{r['balance']:.3f} | {r['cpu_s_per_1k']:.3f} | {r['errors']:.0f} |"
        )
    return lines


def _ratio_line(ratios_: dict[str, Any]) -> str:
    return ", ".join(f"vs {k} **{v['median']}×** ({v['min']}–{v['max']})" for k, v in ratios_.items())


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# ebpf-sticky benchmark {result['date']}", "", result["setup"], ""]
    for kind, block in result["workers"].items():
        lines += [
            f"## {kind} worker: one request per new connection, {block['levels'][-1]} concurrent "
            f"(medians of {block['rounds']} rounds)",
            "",
        ]
        lines += _router_table(block["routers"], "conn/s")
        lines += [
            "",
            "ebpf-sticky's rate, median of side-by-side per-round ratios over levels "
            f"{block['levels']}: " + _ratio_line(block["ratios"]),
            "",
        ]
        ka = block["keepalive"]
        lines += [
            f"### {kind} worker: {ka['requests_per_connection']} requests per connection, "
            f"{ka['concurrency']} concurrent",
            "",
        ]
        lines += _router_table(ka["routers"], "req/s")
        lines += ["", "ebpf-sticky's rate: " + _ratio_line(ka["ratios"]), ""]
    lines += [
        "## Kernel",
        "",
        "| router/worker | launch to serving s | BPF insns | master RSS KiB | "
        "selections | ns per selection |",
        "|---|---|---|---|---|---|",
    ]
    for name, k in result["kernel"].items():
        if name != "floor":
            lines.append(
                f"| {name} | {k['launch_to_serving_s']} | {k['insns']} | {k['master_rss_kib']} | "
                f"{k.get('run_cnt', '-')} | {k.get('ns_per_selection', '-')} |"
            )
    floor = result["kernel"]["floor"]
    lines += [
        "",
        "Same connections, same machine, one after another: an empty program "
        f"{floor['empty_program_ns']} ns, "
        f"reading the address and selecting a socket only {floor['load_and_select_ns']} ns, "
        f"the full program {floor['full_program_ns']} ns per selection.",
        "",
    ]
    h = result["hash"]
    lines += [
        "## Hash",
        "",
        f"{h['buckets']} buckets, 8 slots: "
        + ", ".join(
            f"{n} ({b['addresses']} addresses) max/mean {b['max_over_mean']}" for n, b in h["balance"].items()
        ),
        "",
        "| N→N+1 | ideal | ebpf-sticky moved | sticky-session modulo moved |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['n']}→{r['n'] + 1} | {r['ideal']} | {r['ebpf_sticky']} | {r['sticky_session_modulo']} |"
        for r in h["remap"]
    ]
    lines += [
        "",
        "sticky-session's hash over 10 workers: the busiest got "
        f"{h['sticky_session_max_share_10_workers']:.1%} of 100k random IPv4 (ideal 10%)",
        "",
    ]
    return "\n".join(lines)


def plots(result: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> Path:
        path = out_dir / f"{stamp}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def per_kind(name: str, draw: Callable[[Any, str, dict[str, Any]], None]) -> Path:
        """One panel per worker kind (node, python)."""
        kinds = result["workers"]
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
        for ax, (kind, block) in zip(axes[0], kinds.items(), strict=True):
            draw(ax, kind, block)
        return save(fig, name)

    def conn_per_s(ax: Any, kind: str, block: dict[str, Any]) -> None:
        names = list(block["routers"])
        width = 0.8 / len(block["levels"])
        for i, level in enumerate(block["levels"]):
            values = [block["routers"][n]["by_concurrency"][str(level)]["conn_per_s"] for n in names]
            ax.bar([x + i * width for x in range(len(names))], values, width, label=f"{level} concurrent")
        middle = width * (len(block["levels"]) - 1) / 2
        ax.set_xticks([x + middle for x in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("new connections / s")
        ax.set_title(f"{kind} worker, {WORKERS} workers, one request per connection")
        ax.legend(fontsize=8)

    def latency(ax: Any, kind: str, block: dict[str, Any]) -> None:
        names = list(block["routers"])
        for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
            values = [block["routers"][n][key] for n in names]
            ax.bar([x + offset for x in range(len(names))], values, 0.4, label=key.split("_")[0])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"latency ms at {block['levels'][-1]} concurrent")
        ax.set_title(f"{kind} worker")
        ax.legend()

    def keepalive(ax: Any, kind: str, block: dict[str, Any]) -> None:
        ka = block["keepalive"]
        names = list(ka["routers"])
        ax.bar(range(len(names)), [ka["routers"][n]["req_per_s"] for n in names], 0.6)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel("requests / s")
        ax.set_title(f"{kind} worker, {ka['requests_per_connection']} requests per connection")

    written = [
        per_kind("conn-per-s", conn_per_s),
        per_kind("latency", latency),
        per_kind("keepalive", keepalive),
    ]
    remap = result["hash"]["remap"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in remap]
    ax.plot(ns, [r["sticky_session_modulo"] for r in remap], "s-", label="sticky-session (hash % N)")
    ax.plot(ns, [r["ebpf_sticky"] for r in remap], "o-", label="ebpf-sticky (consistent table)")
    ax.plot(ns, [r["ideal"] for r in remap], "k--", label="ideal 1/(N+1)")
    ax.set_xlabel("workers N → N+1")
    ax.set_ylabel("fraction of clients moved")
    ax.set_ylim(0, 1)
    ax.legend()
    return [*written, save(fig, "remap")]


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(old)


def main() -> int:
    global WORKERS, TOOLS
    parser = argparse.ArgumentParser(prog="scripts/bench")
    parser.add_argument("--quick", action="store_true", help="one level, node workers only: under 60 s")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tools", type=Path, required=True, help="where loadgen and bare were built")
    parser.add_argument("--replot", type=Path, help="only rewrite the table and plots of this results JSON")
    args = parser.parse_args()
    if args.replot:
        saved: dict[str, Any] = json.loads(args.replot.read_text())
        WORKERS = int(re.search(r"(\d+) workers", saved["setup"]).group(1))  # type: ignore[union-attr]
        for path in write_outputs(saved, args.replot.parent, args.replot.stem):
            print(f"wrote {path}")
        return 0
    WORKERS, TOOLS = args.workers, args.tools
    levels = [64] if args.quick else [16, 64, 256]
    rounds = 2 if args.quick else 3
    seconds = 1.0 if args.quick else 4.0
    kinds = ["node"] if args.quick else ["node", "python"]
    started = time.monotonic()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "setup": (
            f"{os.cpu_count()} cores, kernel {os.uname().release}, {WORKERS} workers, {SOURCES} client "
            f"addresses, one GET per new connection, {seconds:g} s per run, levels {levels}, "
            f"{rounds} interleaved rounds{' (--quick)' if args.quick else ''}"
        ),
        "workers": {},
        "kernel": {},
    }
    with bpf_stats_enabled():
        ceiling = Router_("bare-accept", start_bare)
        for kind in kinds:
            routers = routers_for(kind)
            all_routers = [ceiling, *routers] if kind == "node" else routers
            try:
                for router in all_routers:
                    if not router.port:
                        print(f"starting {router.name} ({kind})", flush=True)
                        try:
                            router.start(router)
                        except RuntimeError as exc:
                            raise router.stop_with_log(exc) from exc
                runs = measure(all_routers, levels, rounds, seconds)
                # Long-lived connections (Socket.IO's case after the handshake): 20 requests each.
                # The bare accept loop answers one request per connection, so it sits this out.
                keepalive = measure(routers, [64], rounds, seconds, per_connection=KEEPALIVE_REQUESTS)
                for router in routers:
                    if router.name.startswith("ebpf-sticky"):
                        stats = bpf_stats(router.procs[0].pid)
                        result["kernel"][f"{router.name}/{kind}"] = {**router.info, **stats}
                block = {
                    "levels": levels,
                    "rounds": rounds,
                    "routers": summarize(runs, levels),
                    "ratios": {
                        base: ratios(runs, levels, base)
                        for base in ("reuseport", "sticky-session", "nginx-ip-hash", "haproxy-source")
                        if base in runs
                    },
                }
                block["keepalive"] = {
                    "requests_per_connection": KEEPALIVE_REQUESTS,
                    "concurrency": 64,
                    "routers": summarize(keepalive, [64]),
                    "ratios": {base: ratios(keepalive, [64], base) for base in BASES if base in keepalive},
                }
                result["workers"][kind] = block
            finally:
                for router in routers:
                    router.stop()
        ceiling.stop()
        result["kernel"]["floor"] = floor_programs(300 if args.quick else 2000)
    result["hash"] = hash_figures(args.quick)
    result["routers"] = result["workers"]["node"]["routers"]  # the top-level shape
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_write:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        for path in write_outputs(result, REPO / "bench" / "results", stamp):
            print(f"wrote {path.relative_to(REPO)}")
    return 0


WORKERS = 4
TOOLS = Path()
KEEPALIVE_REQUESTS = 20
BASES = ("reuseport", "sticky-session", "nginx-ip-hash", "haproxy-source")

if __name__ == "__main__":
    sys.exit(main())
