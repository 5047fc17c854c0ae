"""The group in systemd's file-descriptor store: a master killed with -9 and started again goes on
with the same sockets and key; a socket unit's sockets become slots. systemd's side is played by
``support.service_manager`` (the protocol of sd_notify(3) and sd_listen_fds(3))."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.launcher import (
    KEY,
    Waiting,
    get,
    owner_and_others,
    run_bad,
    session_get,
    tagged_processes,
    wait_for,
)
from support.netlab import v4_sources
from support.service_manager import ServiceManager

from ebpf_sticky.control import request
from ebpf_sticky.sessions.ownership import table_size

SOURCES = v4_sources(150, start=30000)
WORKERS = 3
# No --hash-key: a random key, which only the store can carry to the next start.
ARGS = ["asgi_app.py", "-w", str(WORKERS), "--graceful-timeout", "5"]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ServiceManager]:
    manager = ServiceManager(tmp_path)
    try:
        yield manager
    finally:
        manager.close()


NODE = shutil.which("node") or "node"


@pytest.mark.parametrize(
    ("loader", "workers"),
    [("native", ["asgi_app.py"]), ("cbpf", ["asgi_app.py"]), ("native", ["--", NODE, "server.js"])],
    ids=["native-uvicorn", "cbpf-uvicorn", "native-node"],
)
def test_kill_9_then_a_new_start_serves_the_queued_clients_on_their_slots(
    manager: ServiceManager, loader: str, workers: list[str]
) -> None:
    options = ["-w", str(WORKERS), "--graceful-timeout", "5", "--loader", loader]
    args = [*workers[:1], *options] if len(workers) == 1 else [*options, *workers]
    first = manager.start(["--bind", "127.0.0.1:0", *args])
    try:
        port = first.wait_serving()
        stored = {"ebpf-sticky-key", *(f"ebpf-sticky-slot-{i}" for i in range(WORKERS))}
        stored |= {f"ebpf-sticky-map-{role}" for role in ("socks", "table", "live", "counters")}
        if loader == "cbpf":  # no program fd or maps: the program is attached to the sockets
            stored = {name for name in stored if "-map-" not in name}
        wait_for(lambda: set(manager.names()) >= stored, 30, "the store")
        programs = [name for name in manager.names() if name.startswith("ebpf-sticky-prog-")]
        assert len(programs) == (1 if loader == "native" else 0), programs
        before = {source: get(source, port)[0] for source in SOURCES}
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        wait_for(lambda: tagged_processes(first.tag) == [], 30, "the workers to die with their master")
    finally:
        first.close()
    # No master, no worker: only the store holds the sockets. These clients queue.
    waiting = [Waiting(source, port) for source in SOURCES]
    second = manager.start(["--bind", f"127.0.0.1:{port}", *args])
    try:
        assert second.wait_serving() == port
        for client in waiting:
            client.thread.join(90)
        answers = {client.source: client.answer for client in waiting}
        failed = {source: answer for source, answer in answers.items() if isinstance(answer, Exception)}
        moved = [s for s, a in answers.items() if isinstance(a, tuple) and a[0] != before[s]]
        print(f"kill -9: {len(waiting)} clients queued meanwhile, {len(failed)} failed, {len(moved)} moved")
        assert failed == {} and moved == []
        assert {source: get(source, port)[0] for source in SOURCES} == before
        # The same key in the master too: its `route` answers as the kernel routes.
        routes = request(second.control_path(), {"cmd": "route", "addresses": SOURCES})["routes"]
        assert {row["address"]: row["slot"] for row in routes} == before
        assert "handed back 3 slot sockets" in second.output()
        assert second.status()["pid"] == second.proc.pid
    finally:
        second.close()


def socket_unit_socket(reuse_port: bool) -> socket.socket:
    """What a .socket unit with ListenStream=127.0.0.1:0 (and ReusePort=yes) hands in."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def test_a_socket_units_socket_becomes_the_first_slot(manager: ServiceManager) -> None:
    with socket_unit_socket(reuse_port=True) as unit:
        manager.store.append(("web.socket", os.dup(unit.fileno())))
        port = unit.getsockname()[1]
        instance = manager.start([*ARGS, "--bind", "127.0.0.1:0"])
        try:
            assert instance.wait_serving() == port
            assert "a socket unit handed in 1 sockets" in instance.output()
            slots = {get(source, port)[0] for source in SOURCES}
            assert slots == set(range(WORKERS))
        finally:
            instance.close()


def test_a_socket_unit_without_reuseport_is_refused_with_the_fix(manager: ServiceManager) -> None:
    with socket_unit_socket(reuse_port=False) as unit:
        manager.store.append(("web.socket", os.dup(unit.fileno())))
        run_bad(
            [*ARGS, "--bind", "127.0.0.1:0"],
            "set ReusePort=yes in the socket unit",
            extra_env={"NOTIFY_SOCKET": manager.path},
            handed=list(manager.store),
        )


def test_ids_learnt_before_a_kill_9_reach_their_slot_after_the_next_start(manager: ServiceManager) -> None:
    """The session table and handoff sockets are stored too: an id the app set before the master
    died is asked for after the next start from addresses the kernel sends to the other slots."""
    args = ["session_app.py", "-w", "3", "--hash-key", KEY, "--session-key", "header:x-session"]
    owner, others = owner_and_others(31000, 1, 12)
    first = manager.start(["--bind", "127.0.0.1:0", *args])
    try:
        port = first.wait_serving()
        stored = {
            "ebpf-sticky-sessions",
            *(f"ebpf-sticky-handoff-{i}-{e}" for i in range(3) for e in ("receive", "send")),
        }
        wait_for(lambda: set(manager.names()) >= stored, 30, "the session table in the store")
        _, slot, session = session_get(port, owner, "/login", None)
        assert slot == "1"
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        wait_for(lambda: tagged_processes(first.tag) == [], 30, "the workers to die with their master")
    finally:
        first.close()
    second = manager.start(["--bind", f"127.0.0.1:{port}", *args])
    try:
        second.wait_serving()
        (pid,) = second.slot_pids()[1]
        answers = [session_get(port, source, "/", session) for source in others]
        print(f"after kill -9 and a new start: {answers}")
        assert answers == [(200, "1", str(pid))] * len(others)
        assert "session table: the group's own" in second.output()
    finally:
        second.close()


def test_a_stored_session_table_this_version_cannot_read_is_replaced(manager: ServiceManager) -> None:
    """A table of another layout in the store (as another version would have left it): the group
    starts anyway, says so in one line, and the store then holds the new table alone."""
    old_table = os.memfd_create("ebpf-sticky-sessions")
    os.ftruncate(old_table, 4096)
    manager.store.append(("ebpf-sticky-sessions", old_table))
    for slot in range(3):
        receive_end, send_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end, sock in (("receive", receive_end), ("send", send_end)):
            manager.store.append((f"ebpf-sticky-handoff-{slot}-{end}", sock.detach()))
    args = ["session_app.py", "-w", "3", "--hash-key", KEY, "--session-key", "header:x-session"]
    owner, others = owner_and_others(32000, 2, 6)
    instance = manager.start(["--bind", "127.0.0.1:0", *args])
    try:
        port = instance.wait_serving()
        assert "the stored session table is not used (it has 4096 bytes" in instance.output()
        _, _, session = session_get(port, owner, "/login", None)
        (pid,) = instance.slot_pids()[2]
        assert [session_get(port, s, "/", session) for s in others] == [(200, "2", str(pid))] * len(others)

        def one_new_table() -> bool:
            tables = manager.fds("ebpf-sticky-sessions")
            return len(tables) == 1 and os.fstat(tables[0]).st_size == table_size()

        wait_for(one_new_table, 30, "the new table alone in the store")
    finally:
        instance.close()
