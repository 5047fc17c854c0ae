"""Launch `ebpf-sticky` as a user would, and talk to it with real HTTP clients."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import os
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpf_sticky.config import worker_user
from ebpf_sticky.control import control_dir, request, socket_name
from ebpf_sticky.errors import ControlError
from ebpf_sticky.hashing import HashSpec, parse_address, slot_of
from ebpf_sticky.settings import user_exists

from .netlab import v4_sources

KEY = "00112233445566778899aabbccddeeff"
SPEC = HashSpec(bytes.fromhex(KEY))
APPS = Path(__file__).parents[1] / "e2e" / "apps"


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tagged_processes(tag: str) -> list[int]:
    """Pids whose environment carries ``tag``: what a launch left running. (Not an EBPF_STICKY_
    name: the master keeps those from its workers.)"""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if f"STICKY_TEST_TAG={tag}".encode() in environ:
                pids.append(int(entry))
    return pids


async def watch_ready(instance: Instance, mark: int, ready_at: dict[str, float]) -> None:
    """Note (in ``ready_at``, slot → time.monotonic()) when each slot's new worker is ready, until
    cancelled: a task of its own, so slow client calls delay no timestamp."""
    while True:
        for slot in instance.ready_since(mark):
            ready_at.setdefault(slot, time.monotonic())
        await asyncio.sleep(0.02)


def predicted(source: str, slots: int) -> int:
    """The slot the eBPF router sends ``source`` to, with the tests' key and default prefixes."""
    return slot_of(parse_address(source), SPEC, slots)


def owner_and_others(start: int, slot: int, count: int) -> tuple[str, list[str]]:
    """Among 3 slots: a source the kernel sends to ``slot``, and ``count`` it sends elsewhere."""
    sources = v4_sources(400, start=start)
    owner = next(s for s in sources if predicted(s, 3) == slot)
    return owner, [s for s in sources if predicted(s, 3) != slot][:count]


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a master's workers)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _hand_in(fds: list[int]) -> Any:
    """In the child before exec: ``fds`` become 3, 4, ... (through high numbers first, so that
    no fd is overwritten before it is moved)."""

    def move() -> None:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)  # inheritable
            os.close(fd)

    return move


@dataclass
class Instance:
    args: list[str]
    cwd: Path = APPS
    extra_env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. setpriv ... --
    argv: list[str] | None = None  # instead of `python -m ebpf_sticky launch ARGS`
    own_group: bool = False  # a process group of its own, as a shell gives a foreground job
    # (name, fd) handed in as fds 3, 4, ... with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID, as
    # systemd starts a service (sd_listen_fds(3)).
    handed: list[tuple[str, int]] = field(default_factory=list)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ebpf-sticky-", suffix=".log")  # noqa: SIM115
        env = {**os.environ, "STICKY_TEST_TAG": self.tag, "PYTHONUNBUFFERED": "1", **self.extra_env}
        argv = [*self.prefix, *(self.argv or [sys.executable, "-m", "ebpf_sticky", "launch", *self.args])]
        if self.handed:
            env.update(LISTEN_FDS=str(len(self.handed)), LISTEN_FDNAMES=":".join(n for n, _ in self.handed))
            # LISTEN_PID is the pid of the process exec'd: the shell's $$, which it execs into.
            argv = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *argv]
        self.proc = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=self.own_group,
            pass_fds=range(3, 3 + len(self.handed)),
            preexec_fn=_hand_in([fd for _, fd in self.handed]) if self.handed else None,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_serving(self, timeout: float = 60.0) -> int:
        def serving() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"launch exited with {self.proc.returncode}:\n{self.output()}")
            text = self.output()
            match = re.search(r"slots on \S+:(\d+) ", text)
            return int(match.group(1)) if match and "slots serving" in text else None

        self.port = int(wait_for(serving, timeout, "all slots serving"))
        return self.port

    def control_path(self) -> Path:
        host = re.search(r"slots on (\S+):\d+ ", self.output())
        assert host
        return control_dir() / socket_name(host.group(1).strip("[]"), self.port)

    def status(self) -> dict[str, Any]:
        return request(self.control_path(), {"cmd": "status"})

    def slot_pids(self) -> dict[int, list[int]]:
        return {row["slot"]: row["pids"] for row in self.status()["slots"]}

    def worker_pids(self) -> set[int]:
        return {pid for pids in self.slot_pids().values() for pid in pids}

    def renewed(self, generation: int, old: set[int]) -> bool:
        """It runs ``generation`` (in-place upgrades), and every slot has exactly one worker, none
        of ``old``."""
        try:
            status = self.status()
        except ControlError:  # a request the old image had accepted when it exec'd: ask again
            return False
        pids = [row["pids"] for row in status["slots"]]
        settled = status["generation"] == generation and status["phase"] == "running"
        return settled and all(len(p) == 1 for p in pids) and old.isdisjoint(p[0] for p in pids)

    def ready_since(self, mark: int) -> list[str]:
        """The slots whose worker reported ready in the output after offset ``mark``."""
        return [slot for slot, _ in re.findall(r"slot (\d+): worker (\d+) ready", self.output()[mark:])]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def finish(self, timeout: float = 30.0) -> int:
        """Exit status, once the launch has exited by itself."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launch did not exit:\n{self.output()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in tagged_processes(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


@contextlib.contextmanager
def launched(args: list[str], **kwargs: Any) -> Iterator[Instance]:
    instance = Instance(args, **kwargs)
    try:
        instance.wait_serving()
        yield instance
    finally:
        instance.close()


def run_bad(args: list[str], expected: str, code: int = 2, **kwargs: object) -> str:
    """Run a launch that must fail: exactly one error line, containing ``expected``, and ``code``."""
    instance = Instance(args, **kwargs)  # type: ignore[arg-type]
    try:
        status = instance.finish()
        output = instance.output()
        error_lines = [line for line in output.splitlines() if line.startswith("ebpf-sticky: error:")]
        assert len(error_lines) == 1, output
        assert expected in error_lines[0], output
        assert status == code, output
        assert tagged_processes(instance.tag) == []
        return output
    finally:
        instance.close()


def get(
    source: str,
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, int, int]:
    """One request on a new connection from ``source`` (HTTPS with ``tls``): (slot, pid, uid) of
    the worker."""
    conn = (
        http.client.HTTPSConnection(host, port, timeout=timeout, source_address=(source, 0), context=tls)
        if tls is not None
        else http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source, 0))
    )
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.status == 200, response.status
        slot, pid, uid = response.read().split()
        return int(slot), int(pid), int(uid)
    finally:
        conn.close()


def session_get(port: int, source: str, path: str, session: str | None) -> tuple[int, str, str]:
    """(status, slot, pid) of one request on its own connection, optionally in a session;
    the session id a /login answer carries comes back in place of the pid."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"x-session": session} if session else {})
        response = conn.getresponse()
        slot, pid = response.read().decode().split()
        return response.status, slot, response.getheader("x-session") or pid
    finally:
        conn.close()


@dataclass
class Load:
    """Client threads requesting from their own sources until stopped; counts every outcome."""

    port: int
    sources: list[str]
    threads: int = 4
    timeout: float = 10.0  # the socket timeout of each request (connect, each read)
    seen: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._run, args=(self.sources[i :: self.threads],))
            for i in range(self.threads)
        ]

    def _run(self, sources: list[str]) -> None:
        while not self._stop.is_set():
            for source in sources:
                if self._stop.is_set():
                    return
                try:
                    slot, pid, _ = get(source, self.port, timeout=self.timeout)
                except Exception as exc:
                    with self._lock:
                        self.failures.append(f"{source}: {exc!r}")
                    continue
                with self._lock:
                    self.requests += 1
                    self.seen.setdefault(source, []).append((slot, pid))

    def __enter__(self) -> Load:
        for thread in self._workers:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join()

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        start = self.requests
        wait_for(lambda: self.requests >= start + count, timeout, f"{count} more requests")


class Waiting:
    """One client that connects now and sends its request, then waits up to a minute for the answer."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
        self.conn.connect()  # the kernel completes the handshake: the connection is in a queue now
        self.conn.request("GET", "/", headers={"Connection": "close"})
        self.answer: tuple[int, int] | Exception | None = None
        self.thread = threading.Thread(target=self._wait)
        self.thread.start()

    def _wait(self) -> None:
        try:
            response = self.conn.getresponse()
            slot, pid, _ = response.read().split()
            self.answer = (int(slot), int(pid))
        except Exception as exc:
            self.answer = exc
        finally:
            self.conn.close()


def default_worker() -> pwd.struct_passwd:
    """The user a root master runs workers as when not told (``config.worker_user``'s rule). Tests
    follow the rule instead of assuming nobody: a machine may have an ebpf-sticky user."""
    name, _ = worker_user(None, 0, user_exists)
    assert name is not None
    return pwd.getpwnam(name)


@contextlib.contextmanager
def worker_readable_dir() -> Iterator[Path]:
    """A directory that root and the default worker user's group read, and no one else: for files
    the workers open (pytest's tmp_path is root's alone). Files put in it should be 0640."""
    directory = Path(tempfile.mkdtemp(prefix="ebpf-sticky-"))
    try:
        os.chown(directory, 0, default_worker().pw_gid)
        directory.chmod(0o750)
        yield directory
    finally:
        shutil.rmtree(directory)
