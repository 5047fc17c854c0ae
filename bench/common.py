"""What every part of the benchmark shares: the run's settings, the processes of one contender
(a router with its workers), readiness waits with deadlines, and CPU accounting."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
NATIVE = PACKAGE / "native"  # the C tools and the Node.js workers
APPS = PACKAGE / "apps"  # the Python workers, imported by uvicorn as top-level modules
RESULTS = PACKAGE / "results"
STOP_TIMEOUT = 15.0  # seconds a contender gets to exit on TERM before it is killed
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # cgroup v1 cpu controller (this VM's layout)
# cgroup v1 cpuacct controller: the CPU time a group's tasks used, exited tasks and kernel work
# done on their behalf (syscalls, softirq run in their context) included.
CPUACCT_CGROUPS = Path("/sys/fs/cgroup/cpuacct")


class CpuGroup:
    """A cpu cgroup of its own for one contender (or the load generator).

    The scheduler shares CPU fairly between tasks, or between groups of tasks: on a machine
    other jobs load, a router of 6 processes (nginx, 4 uvicorns) would otherwise get more
    CPU than one of 4 (ebpf-sticky's workers) at the same moment, whatever the interleaving. In a
    group each, every contender weighs the same against the rest of the machine. Without the
    controller (no cgroup v1 cpu), processes stay where they are and the report says so.
    """

    def __init__(self, name: str) -> None:
        leaf = f"ebpf-sticky-bench-{os.getpid()}-{name}"
        self.path = _make_group(CPU_CGROUPS / leaf)
        self.accounting = _make_group(CPUACCT_CGROUPS / leaf)

    def enter(self) -> None:
        """Move the calling process in (run in the child between fork and exec)."""
        for path in (self.path, self.accounting):
            if path:
                (path / "cgroup.procs").write_text(str(os.getpid()))

    def usage_seconds(self) -> float | None:
        """CPU time used by every task that was ever in the group; None without cpuacct."""
        if not self.accounting:
            return None
        return int((self.accounting / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        for path in (self.path, self.accounting):
            if path:
                wait_until(
                    lambda p=path: not (p / "cgroup.procs").read_text().strip(),  # type: ignore[misc]
                    STOP_TIMEOUT,
                    f"an empty {path}",
                    lambda: True,
                )
                path.rmdir()


def _make_group(path: Path) -> Path | None:
    try:
        path.mkdir()
    except OSError:
        return None
    return path


# Every load generator's source addresses (loadgen.c and sioload.py count up from 127.77.0.2).
CLIENT_NET = "127.77.0.0/16"
_NOTRACK_RULES = (("OUTPUT", "-s"), ("OUTPUT", "-d"), ("PREROUTING", "-s"), ("PREROUTING", "-d"))


@contextlib.contextmanager
def untracked(net: str = CLIENT_NET) -> Iterator[bool]:
    """Exempt the load generators' traffic from connection tracking while the benchmark runs.

    Once anything loads a NAT table (podman's CNI rules do), every loopback connection gets a
    conntrack entry that outlives it by 2 minutes in TIME_WAIT; thousands of connections a second
    fill the table (262144 here) and the kernel then drops new SYNs, for everyone on the machine.
    The rules cover the bench's own client addresses only, and are removed on the way out.
    Yields whether they are in place (False: no iptables; the report says so)."""
    added = []
    try:
        for chain, side in _NOTRACK_RULES:
            rule = [chain, side, net, "-j", "NOTRACK"]
            done = subprocess.run(["iptables", "-t", "raw", "-I", *rule], capture_output=True, check=False)
            if done.returncode == 0:
                added.append(rule)
        yield len(added) == len(_NOTRACK_RULES)
    finally:
        for rule in added:
            subprocess.run(["iptables", "-t", "raw", "-D", *rule], capture_output=True, check=False)


@dataclass(frozen=True)
class UvicornConfig:
    """What the Python workers run on, the same behind every router: the venv they come from
    (ebpf-sticky and uvicorn alike), uvicorn's loop, HTTP and WebSocket implementations."""

    name: str  # "default" or "fast"
    venv_bin: Path
    loop: str
    http: str
    ws: str
    launch_options: tuple[str, ...]  # passed to ebpf-sticky launch

    def uvicorn_options(self) -> list[str]:
        return ["--loop", self.loop, "--http", self.http, "--ws", self.ws]


@dataclass(frozen=True)
class Settings:
    """One benchmark run's settings, passed down explicitly (no module-level state)."""

    workers: int
    tools: Path  # where loadgen and bare were built
    venv_bin: Path
    quick: bool
    uvicorn_configs: tuple[UvicornConfig, ...]  # the Python workloads run once per config
    launch_help: str  # `ebpf-sticky launch --help`: which loaders and options this tree has
    loadgen_python: Path  # runs sioload.py (the fast venv's, with uvloop, when there is one)
    loadgen_group: CpuGroup
    python_only: bool = False  # HTTP workload without its Node.js block
    profile_seconds: float = 0.0  # > 0: py-spy one worker per router after the measured rounds
    profile_dir: Path | None = None  # where flame graphs go (None: not kept)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s or as soon as ``alive`` fails."""
    end = time.monotonic() + timeout
    while not condition():
        if not alive():
            raise RuntimeError(f"exited while waiting for {what}")
        if time.monotonic() > end:
            raise RuntimeError(f"no {what} after {timeout:g} s")
        time.sleep(0.02)


def http_ok(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.1 200")
    return False


def free_port() -> int:
    """A TCP port free on every address, IPv4 and IPv6: Node's cluster masters listen on [::]."""
    with socket.socket(socket.AF_INET6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


T = TypeVar("T")


def _cpu_ticks() -> list[int]:
    """The whole machine's CPU time so far, in clock ticks, by ``/proc/stat``'s first eight
    fields: user, nice, system, idle, iowait, irq, softirq, steal."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def busy_seconds() -> float:
    """The whole machine's non-idle CPU time so far (kernel and softirq work included)."""
    fields = _cpu_ticks()
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def stolen_while(work: Callable[[], T]) -> tuple[T, float]:
    """``work()``'s result, and the per cent of the machine's CPU time stolen while it ran: time a
    vCPU had work and the hypervisor ran another guest instead (a busy host). A halted vCPU's
    wake-up is not in it."""
    before = _cpu_ticks()
    result = work()
    after = _cpu_ticks()
    total = sum(after) - sum(before)
    return result, round(100 * (after[7] - before[7]) / total, 2) if total else 0.0


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Cpu:
    """CPU seconds over one load run, split by who spent them."""

    loadgen: float  # the load generator (our child)
    server: float  # the contender's processes: router and workers
    others: float  # the rest of the machine: other users' jobs, unattributed kernel work


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds ``pid``'s threads have run, from the scheduler's own count in nanoseconds
    (``/proc/PID/task/TID/schedstat``); utime and stime are sampled at the tick, which over a
    one-second window is off by several per cent. 0 for a process that is gone."""
    with contextlib.suppress(OSError):
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9
    return 0.0


def tree_pids(roots: Sequence[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def server_cpu_seconds(contender: Contender) -> Callable[[], float]:
    """A reader of the contender's CPU time so far: its cgroup's cpuacct.usage (nanoseconds; every
    process of the router and its workers, whatever their number or lifetime), else the sum of
    the CPU time of the processes it has now."""
    group = contender.group
    if group and group.accounting:
        return group.usage_seconds  # type: ignore[return-value]
    pids = tree_pids([p.pid for p in contender.procs])
    return lambda: sum(process_cpu_seconds(p) for p in pids)


def run_load(argv: Sequence[str], timeout: float, contender: Contender, group: CpuGroup) -> tuple[bytes, Cpu]:
    """Run one load generator to its end: its stdout and who spent how much CPU meanwhile. The
    server's share is its own cgroup's (or processes'), so other jobs on the machine
    do not count against a contender; CPU per connection is therefore steadier than any rate."""
    server_now = server_cpu_seconds(contender)
    busy, before = busy_seconds(), children_cpu_seconds()
    server_before = server_now()
    out = subprocess.run(
        list(argv), capture_output=True, check=True, timeout=timeout, preexec_fn=group.enter, cwd=REPO
    ).stdout
    server = server_now() - server_before
    loadgen = children_cpu_seconds() - before
    return out, Cpu(loadgen, server, max(busy_seconds() - busy - loadgen - server, 0.0))


@dataclass
class Contender:
    """One router under test with its workers: how to start it, and what it tells once started."""

    name: str
    start: Callable[[Contender], None]
    port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ebpf-sticky-bench-")))
    info: dict[str, Any] = field(default_factory=dict)
    group: CpuGroup | None = None  # made at the first spawn

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{len(self.procs)}.log", "wb")  # noqa: SIM115 - lives with the process
        group = self.group = self.group or CpuGroup(self.name)

        def setup() -> None:
            os.setpgrp()  # stop() signals the whole tree
            group.enter()

        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=setup, **kwargs)
        self.procs.append(proc)
        return proc

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def wait_http(self, port: int, timeout: float = 60.0) -> None:
        wait_until(lambda: http_ok(port), timeout, f"HTTP 200 on port {port}", self.alive)

    def wait_log(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log())
            found.extend([match] if match else [])
            return bool(match)

        wait_until(seen, timeout, f"log line {pattern!r}", self.alive)
        return found[0]

    def log(self, index: int = 0) -> str:
        return (self.tmp / f"{index}.log").read_text(errors="replace")

    def failure(self, error: Exception) -> RuntimeError:
        logs = "\n".join(self.log(i)[-3000:] for i in range(len(self.procs)))
        return RuntimeError(f"{self.name}: {error}\n{logs}")

    def stop(self) -> None:
        # TERM first, so every router cleans up after itself (ebpf-sticky's control socket).
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        if self.group:
            self.group.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def started(contenders: Sequence[Contender], label: str) -> Iterator[None]:
    """Start every contender (its log in the error if it fails), stop them all afterwards."""
    try:
        for contender in contenders:
            print(f"starting {contender.name} ({label})", flush=True)
            try:
                contender.start(contender)
            except RuntimeError as exc:
                raise contender.failure(exc) from exc
        yield
    finally:
        for contender in contenders:
            contender.stop()


def interleaved(contenders: Sequence[Contender], rounds: int) -> Iterator[tuple[int, list[Contender]]]:
    """Each round runs every contender once, starting one further along: load from elsewhere on
    the machine hits every contender alike, and no one always goes first."""
    for round_ in range(rounds):
        shift = round_ % len(contenders)
        yield round_, [*contenders[shift:], *contenders[:shift]]
