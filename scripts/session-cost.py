#!/usr/bin/env python3
"""What the session layer costs: new-connection rate with and without it, and a move's latency.

* **Rate**: the same launch (bench/apps/app.py, Python workers, one request per connection from
  many sources, driven by bench/native/loadgen.c) without ``--session-key`` ("off") and with
  ``--session-key engineio`` ("on"), and a second launch without it (the control), loaded in turn,
  a short window each, and started afresh for each of several rounds (identical launches differ by
  a few per cent for as long as they live). With the key on, every request is served where it
  landed (``GET /`` carries no key: a Socket.IO app's pages, assets and handshakes), so the figure
  is the gate's own cost, a search of each request head. The control's ratio to "off" is what the
  method reads when nothing differs: the noise floor beside the figure. Compare the ratios of one
  run, not absolutes; the CPU ratio (requests per worker CPU second, X / off) is the one other
  tenants disturb least.
* **Requests that carry their key** ("keyed"): a launch like "on", loaded with Engine.IO polling
  requests, each source's carrying an id the workers would have issued for its session on the
  slot it lands on: the request line read, the id's slot checked, the request served where it
  landed. It is read against "polls", a launch without ``--session-key`` loaded with the very
  same requests (whose longer line costs uvicorn more than ``GET /``, with or without the layer).
* **Connections behind a PROXY-protocol balancer** ("proxied", "proxied-v2"): a launch with
  ``--proxy-protocol`` (no session key), each connection opening with a PROXY header, v1 as
  HAProxy's ``send-proxy`` writes it, v2 as its ``send-proxy-v2`` does, that names the
  connection's own source. That is the client the kernel routed by, so nothing moves: the figure
  is what reading the header and routing by it cost a connection of one request, against "off"
  without a header.
* **A move**: one launch with ``--session-key header:x-session``; clients on slot 0 send requests
  of a session owned by slot 0 and of one owned by slot 1, alternating, one connection each; the
  difference of the two medians is what a move adds. Beside them, the workers' CPU time per
  request of either kind (how much of a move is their work), and what waking a process costs the
  machine (a byte sent to another process and back, on one CPU and across two), and how busy the
  host was: the share of the machine's CPU time the hypervisor gave other guests meanwhile
  (``steal_percent``).

With ``--packages DIR...``, two commits side by side: launches of each directory's
``ebpf_sticky`` (readable by the workers' user), loaded in turn, for the move and for the requests
that pass the layer ("on", "keyed"); each directory after the first is read against the first,
window by window (``vs_first``; with one directory, the move alone). The rates' rounds, windows
and window length are ``--rounds``, ``--windows`` and ``--seconds``; each directory's search
(``head_search``: C, or Python where its extension is not built) is recorded.

With ``--pin`` the load generator and the masters run on CPU 0 and each launch has a worker on
each other CPU, pinned there (one worker on a 2-core machine): as where the clients are other
machines and a worker has its core to itself. Without it, two workers and the load generator
share all CPUs, and each worker's Python runs with caches the others have just used.

    scripts/session-cost.py [--pin] [--rounds N] [--windows N] [--seconds S] [--requests N]
    scripts/session-cost.py --packages DIR [DIR ...] [--rounds N] [--windows N] [--seconds S] [--requests N]
    (needs root: BPF)
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import process_cpu_seconds, stolen_while  # noqa: E402
from bench.sioload import source_address  # noqa: E402
from ebpf_sticky.hashing import HashSpec, parse_address, slot_of  # noqa: E402
from ebpf_sticky.sessions.ownership import issue_id, table_key_of  # noqa: E402

KEY = "00112233445566778899aabbccddeeff"
SPEC = HashSpec(bytes.fromhex(KEY))
BENCH_APP = ROOT / "bench" / "apps" / "app.py"
SESSION_APP = ROOT / "tests" / "e2e" / "apps" / "session_app.py"


class Launch:
    def __init__(self, app: Path, workers: int, *extra: str, package: str = "") -> None:
        """``package``: a directory holding the ``ebpf_sticky`` to launch (default: the installed one)."""
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        argv = [sys.executable, "-m", "ebpf_sticky", "launch", str(app), "-w", str(workers),
                "--bind", "127.0.0.1:0", "--hash-key", KEY, *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": package} if package else None
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=app.parent, env=env)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            text = Path(self.log.name).read_text()
            match = re.search(r"slots on \S+:(\d+) ", text)
            if match and "slots serving" in text:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"launch failed:\n{Path(self.log.name).read_text()}")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def build_loadgen() -> Path:
    out = Path(tempfile.gettempdir()) / "ebpf-sticky-session-cost-loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench/native/loadgen.c")], check=True)
    return out


def workers_cpu(master: int) -> float:
    """CPU seconds the master's workers have run."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sum(process_cpu_seconds(int(child)) for child in children)


def pin_workers(launch: Launch, cpus: list[int]) -> None:
    """Each of the launch's workers (every thread of it) onto one of ``cpus``."""
    children = Path(f"/proc/{launch.proc.pid}/task/{launch.proc.pid}/children").read_text().split()
    for child, cpu in zip(sorted(children, key=int), cpus, strict=True):
        for task in Path(f"/proc/{child}/task").iterdir():
            os.sched_setaffinity(int(task.name), {cpu})


def rate(loadgen: Path, launch: Launch, seconds: float, mode: Mode) -> tuple[float, float]:
    """(requests per second, worker CPU microseconds per request) of one loadgen run (on the
    CPUs this process may use: CPU 0 alone with ``--pin``)."""
    before = workers_cpu(launch.proc.pid)
    out = subprocess.run(
        [
            str(loadgen),
            *mode.loadgen,
            "127.0.0.1",
            str(launch.port),
            str(SOURCES),
            "32",
            str(seconds),
            "1",
            mode.path,
        ],
        capture_output=True,
        check=True,
    ).stdout
    completed = float(json.loads(out)["completed"])
    return completed / seconds, (workers_cpu(launch.proc.pid) - before) / completed * 1e6


ENGINEIO = ("--session-key", "engineio")
PROXIED = ("--proxy-protocol", "--forwarded-allow-ips", "127.0.0.0/8")
# Per load-generator source, an Engine.IO polling request of its own session, whose id (issued as
# the workers issue them, under the launch's key) names the slot that source lands on.
KEYED_PATHS = Path(tempfile.gettempdir()) / "ebpf-sticky-session-cost-paths"


class Mode(NamedTuple):
    launch: tuple[str, ...]  # the launch's arguments
    path: str  # what its load asks for
    loadgen: tuple[str, ...] = ()  # the load generator's options
    against: str = "off"  # the mode whose launch is the same but for the layer: ratios are to it


MODES = {
    "off": Mode((), "/"),
    "on": Mode(ENGINEIO, "/"),
    "polls": Mode((), f"@{KEYED_PATHS}"),
    "keyed": Mode(ENGINEIO, f"@{KEYED_PATHS}", against="polls"),
    # Each connection starts with a PROXY header (v1, v2) naming its own source: the client the
    # kernel routed by, so every connection is on its client's slot.
    "proxied": Mode(PROXIED, "/", ("--proxy",)),
    "proxied-v2": Mode(PROXIED, "/", ("--proxy-v2",)),
    "control": Mode((), "/"),
}
SOURCES = 256


def write_keyed_paths(slots: int) -> None:
    table_key = table_key_of(SPEC.key)
    lines = []
    for i in range(SOURCES):
        slot = slot_of(parse_address(source_address(i)), SPEC, slots)
        sid = issue_id(slot, table_key, secrets.token_bytes(11))
        lines.append(f"/socket.io/?EIO=4&transport=polling&t=PabcdEf&sid={sid}\n")
    KEYED_PATHS.write_text("".join(lines))


Figures = dict[str, list[tuple[float, float]]]  # per mode, per window: (requests/s, CPU µs/request)


def rates(loadgen: Path, rounds: int, windows: int, seconds: float, pinned: list[int]) -> list[Figures]:
    """Per round, each mode's figures. A round starts the launches afresh, keeps them for
    all its windows and loads them in turn for ``seconds`` at a time (the order reversed every
    other window): the machine's drift over minutes (another tenant, the host's clock) falls on all
    alike. Rounds, because two identical launches differ by a few per cent for as long as they
    live (where their workers' memory and CPUs fall): more windows of one launch do not average
    that out, fresh launches do. ``pinned``: the CPUs to pin one worker each on (else two
    workers, unpinned)."""
    out = []
    for r in range(rounds):
        # Each mode is started first in turn: the start order alone can move a launch's figures
        # by a few per cent.
        modes = list(MODES)[r % len(MODES) :] + list(MODES)[: r % len(MODES)]
        launches: dict[str, Launch] = {}
        try:
            for mode in modes:
                launches[mode] = Launch(BENCH_APP, len(pinned) or 2, *MODES[mode].launch)
                if pinned:
                    pin_workers(launches[mode], pinned)
            for mode, launch in launches.items():
                rate(loadgen, launch, 2.0, MODES[mode])  # warm up
            figures: Figures = {mode: [] for mode in modes}
            for w in range(windows):
                for mode in modes if w % 2 == 0 else modes[::-1]:
                    figures[mode].append(rate(loadgen, launches[mode], seconds, MODES[mode]))
            out.append(figures)
        finally:
            for launch in launches.values():
                launch.close()
    return out


# The modes whose requests pass the layer: what a change to it can make cheaper or dearer.
LAYER_MODES = ("on", "keyed")


def package_rates(
    loadgen: Path, packages: tuple[str, ...], rounds: int, windows: int, seconds: float
) -> dict[str, dict[str, dict[str, float]]]:
    """Per package after the first, per layer mode: its rate and worker CPU per request against the
    first package's, window by window. Each package is a launch with ``--session-key engineio``
    that serves both modes; as in ``rates``, fresh launches each round (the start order
    alternating) and the load order reversed every other window. One package: nothing to read
    against, no launch."""
    if len(packages) < 2:
        return {}
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {
        (package, mode): [] for package in packages for mode in LAYER_MODES
    }
    for r in range(rounds):
        order = packages if r % 2 == 0 else packages[::-1]
        launches: dict[str, Launch] = {}
        try:
            for package in order:
                launches[package] = Launch(BENCH_APP, 2, *ENGINEIO, package=package)
            for launch in launches.values():
                for mode in LAYER_MODES:
                    rate(loadgen, launch, 2.0, MODES[mode])  # warm up
            for w in range(windows):
                for package in order if w % 2 == 0 else order[::-1]:
                    for mode in LAYER_MODES:
                        figures[package, mode].append(rate(loadgen, launches[package], seconds, MODES[mode]))
        finally:
            for launch in launches.values():
                launch.close()
    first = packages[0]
    return {
        package: {
            mode: {
                "rate_ratio_median": _median_ratio(figures[package, mode], figures[first, mode], 0),
                "cpu_us_added_median": _median_added(figures[package, mode], figures[first, mode]),
            }
            for mode in LAYER_MODES
        }
        for package in packages[1:]
    }


def request(port: int, source: str, session: str | None, path: str = "/") -> tuple[float, str, str]:
    """(seconds, slot, x-session of the answer) of one request on its own connection."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"x-session": session} if session else {})
        response = conn.getresponse()
        slot = response.read().split()[0].decode()
        return time.perf_counter() - began, slot, response.getheader("x-session") or ""
    finally:
        conn.close()


def move_cost(requests: int, packages: tuple[str, ...] = ("",)) -> dict[str, dict[str, float]]:
    """p50 of a request of a session on the worker it lands on ("local"), of one on the other
    worker ("moved"), and their difference, per package (a launch each, loaded in turn request
    by request, the launches' order reversed after each local and moved pair); and the CPU time
    the two workers spent per request of each kind (read before and after each), and its
    difference: how much of what a move adds is the workers' work rather than waiting."""
    sources = [f"127.88.{i >> 8}.{i & 255}" for i in range(2, 400) if i & 255 not in (0, 255)]
    on = {s: slot_of(parse_address(s), SPEC, 2) for s in sources}
    # Clients on slot 0, taken in turn: thousands of connections from one address would leave
    # its ephemeral ports in TIME_WAIT, and the client's bind would search for a free one.
    homes = [s for s in sources if on[s] == 0][:40]
    away = next(s for s in sources if on[s] == 1)
    launches: dict[str, Launch] = {}
    try:
        for package in packages:
            launches[package] = Launch(SESSION_APP, 2, "--session-key", "header:x-session", package=package)
        ids = {
            package: {
                "local": request(launch.port, homes[0], None, "/login")[2],
                "moved": request(launch.port, away, None, "/login")[2],
            }
            for package, launch in launches.items()
        }
        kinds = [(p, kind) for p in packages for kind in ("local", "moved")]
        times: dict[tuple[str, str], list[float]] = {pk: [] for pk in kinds}
        cpu = dict.fromkeys(kinds, 0.0)
        for i in range(requests * 2):
            kind = "local" if i % 2 == 0 else "moved"
            for package in packages if i % 4 < 2 else packages[::-1]:
                launch = launches[package]
                began = workers_cpu(launch.proc.pid)
                seconds, slot, _ = request(launch.port, homes[i // 2 % len(homes)], ids[package][kind])
                cpu[package, kind] += workers_cpu(launch.proc.pid) - began
                assert slot == ("0" if kind == "local" else "1"), (kind, slot)
                times[package, kind].append(seconds)
    finally:
        for launch in launches.values():
            launch.close()
    out: dict[str, dict[str, float]] = {}
    for package in packages:
        local, moved = (statistics.median(times[package, kind]) * 1e6 for kind in ("local", "moved"))
        local_cpu, moved_cpu = (
            cpu[package, kind] / len(times[package, kind]) * 1e6 for kind in ("local", "moved")
        )
        out[package] = {
            "local_p50_us": local,
            "moved_p50_us": moved,
            "added_p50_us": moved - local,
            "local_cpu_us": local_cpu,
            "moved_cpu_us": moved_cpu,
            "added_cpu_us": moved_cpu - local_cpu,
        }
    return out


def wakeup_round_trip(cpus: tuple[int, int], trips: int = 3000) -> float:
    """p50 µs of a byte sent over a unix socketpair to a process on ``cpus[1]``, which sends it
    back, from one on ``cpus[0]``: what waking a process costs, on one CPU or across two."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    child = os.fork()
    if child == 0:
        os.sched_setaffinity(0, {cpus[1]})
        while message := theirs.recv(1):
            theirs.send(message)
        os._exit(0)
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        times = []
        for _ in range(trips):
            began = time.perf_counter_ns()
            ours.send(b"x")
            ours.recv(1)
            times.append(time.perf_counter_ns() - began)
    finally:
        os.sched_setaffinity(0, allowed)
        ours.send(b"")
        os.waitpid(child, 0)
        ours.close()
        theirs.close()
    return round(statistics.median(times) / 1000, 1)


def wakeups() -> dict[str, float]:
    cpus = sorted(os.sched_getaffinity(0))
    out = {"one_cpu": wakeup_round_trip((cpus[-1], cpus[-1]))}
    if len(cpus) > 1:
        out["two_cpus"] = wakeup_round_trip((cpus[0], cpus[1]))
    return out


def _total(figures: list[tuple[float, float]]) -> float:
    """CPU microseconds per request over all windows of one mode (windows are equally long)."""
    return sum(f[0] * f[1] for f in figures) / sum(f[0] for f in figures)


def _ratios(a: list[tuple[float, float]], b: list[tuple[float, float]], field: int) -> list[float]:
    """a / b over paired windows, for one field (0: rate, 1: CPU)."""
    return [x[field] / y[field] for x, y in zip(a, b, strict=True)]


def _median_ratio(a: list[tuple[float, float]], b: list[tuple[float, float]], field: int) -> float:
    return round(statistics.median(_ratios(a, b, field)), 3)


def _median_added(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The median of a's CPU µs per request minus b's, over paired windows."""
    return round(statistics.median(x[1] - y[1] for x, y in zip(a, b, strict=True)), 2)


def head_search(package: str = "") -> str:
    """Which request-head search the launches' workers run: the C one, or the Python one of an
    install made without a compiler (asked of the package they import, from where they start:
    ``package`` as ``Launch`` takes it)."""
    ask = "from ebpf_sticky.sessions import prefilter; print('C' if prefilter.NATIVE else 'Python')"
    env = {**os.environ, "PYTHONPATH": package} if package else None
    return subprocess.run(
        [sys.executable, "-c", ask], capture_output=True, text=True, cwd=BENCH_APP.parent, env=env, check=True
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pin", action="store_true", help="load on CPU 0, a worker on each other CPU")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--windows", type=int, default=15, help="per round")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--packages",
        nargs="+",
        metavar="DIR",
        help="each directory's ebpf_sticky side by side: the move, and the layer's rates against the first",
    )
    args = parser.parse_args()
    if importlib.util.find_spec("engineio") is None:
        # Without it a worker learns Engine.IO ids through an ASGI layer around the app, which
        # is not what a Socket.IO app's workers run.
        raise SystemExit("session-cost.py: needs python-engineio (pip install python-engineio)")
    os.chdir(ROOT)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = cpus[1:] if args.pin else []
    if args.pin and not pinned:
        raise SystemExit("session-cost.py: --pin needs two CPUs")
    write_keyed_paths(len(pinned) or 2)
    loadgen = build_loadgen()
    windows = (args.rounds, args.windows, args.seconds)
    if args.packages:
        packages = tuple(str(Path(package).resolve()) for package in args.packages)
        if len(set(packages)) < len(packages):
            # Launches and results are per directory: a second launch of one would never be closed.
            parser.error("--packages: each directory once (to compare a tree with itself, copy it)")
        if pinned:
            parser.error("--packages: not with --pin (each launch has two workers)")
        layer, rates_steal = stolen_while(lambda: package_rates(loadgen, packages, *windows))
        moves, move_steal = stolen_while(lambda: move_cost(args.requests, packages))
        out: dict[str, object] = {}
        for package, move in moves.items():
            against = {"vs_first": layer[package]} if package in layer else {}
            out[package] = {"head_search": head_search(package), **move, **against}
        if layer:
            out.update(rounds=args.rounds, windows=args.windows, seconds=args.seconds)
            out["steal_percent"] = {"rates": rates_steal, "move": move_steal}
        else:
            out["steal_percent"] = {"move": move_steal}
        print(json.dumps({**out, "wakeup_round_trip_us": wakeups()}, indent=2))
        return 0
    if pinned:
        os.sched_setaffinity(0, cpus[:1])  # the launches' masters and the load generator inherit it
    rounds, rates_steal = stolen_while(lambda: rates(loadgen, *windows, pinned))
    os.sched_setaffinity(0, cpus)
    figures = {mode: [f for one in rounds for f in one[mode]] for mode in MODES}
    result: dict[str, object] = {
        "head_search": head_search(),
        "pinned": bool(pinned),
        "rounds": args.rounds,
        "windows": args.windows,
        "seconds": args.seconds,
        "rate_off_median": round(statistics.median(f[0] for f in figures["off"])),
        "cpu_us_per_request_off_median": round(statistics.median(f[1] for f in figures["off"]), 1),
    }
    for mode, spec in MODES.items():
        if mode == "off":
            continue
        # Ratios to the mode's own baseline ("off", or "polls" for the keyed requests), window by
        # window. Requests per worker CPU second, X / baseline: the rate ratio with other tenants'
        # load removed.
        base = spec.against
        cpu_ratios = _ratios(figures[base], figures[mode], 1)
        result[mode] = {
            "against": base,
            "rate_median": round(statistics.median(f[0] for f in figures[mode])),
            "rate_ratio_median": _median_ratio(figures[mode], figures[base], 0),
            "cpu_us_per_request_median": round(statistics.median(f[1] for f in figures[mode]), 1),
            # What a request of this mode costs the workers beyond one of its baseline.
            "cpu_us_added_median": _median_added(figures[mode], figures[base]),
            "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
            "cpu_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(cpu_ratios, n=4)],
            # All windows together: each window weighed by its requests.
            "cpu_ratio_total": round(_total(figures[base]) / _total(figures[mode]), 3),
            # Each round's median: how far launches alone move the figure.
            "rate_ratio_by_round": [_median_ratio(one[mode], one[base], 0) for one in rounds],
            "cpu_ratio_by_round": [_median_ratio(one[base], one[mode], 1) for one in rounds],
        }
    move, move_steal = stolen_while(lambda: move_cost(args.requests)[""])
    result.update(move)
    result["steal_percent"] = {"rates": rates_steal, "move": move_steal}
    result["wakeup_round_trip_us"] = wakeups()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
