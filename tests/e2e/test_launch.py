"""`ebpf-sticky launch` with real workers, real clients from many sources, real signals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.launcher import KEY, Load, get, launched, predicted, run_bad, tagged_processes, wait_for
from support.netlab import v4_sources
from support.service_manager import ServiceManager

from ebpf_sticky.activation import KEY_NAME, slot_name
from ebpf_sticky.control import control_dir, socket_name

SOURCES = v4_sources(64)


def assert_sticky(port: int, slots: int, sources: list[str] = SOURCES, rounds: int = 2) -> dict[str, int]:
    pids: dict[str, int] = {}
    for _ in range(rounds):
        for source in sources:
            slot, pid, _ = get(source, port)
            assert slot == predicted(source, slots), source
            assert pids.setdefault(source, pid) == pid, source
    return {source: predicted(source, slots) for source in sources}


BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "10"]


@pytest.mark.parametrize(
    "target",
    [
        ["asgi_app.py"],
        ["wsgi_app.py"],
        ["wsgi_app.py:create_app", "--factory"],
        ["pkg.service:web"],
    ],
    ids=["asgi-path", "wsgi-path", "factory", "module-attr"],
)
def test_python_targets_serve_stickily(target: list[str]) -> None:
    with launched([*target, "-w", "3", *BASE]) as instance:
        assert_sticky(instance.port, 3)


def test_any_command_serves_stickily_on_fd3() -> None:
    node = shutil.which("node")
    assert node, "node is installed by .ci/run"
    with launched(["-w", "3", *BASE, "--", node, "server.js"]) as instance:
        assert_sticky(instance.port, 3)


@pytest.mark.bcc
def test_bcc_loader_launch_routes_like_native() -> None:
    with launched(["asgi_app.py", "-w", "3", *BASE, "--loader", "bcc"]) as instance:
        assert_sticky(instance.port, 3)


def test_status_and_route_of_a_running_instance() -> None:
    from ebpf_sticky.cli import main

    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        assert_sticky(instance.port, 2, SOURCES[:10], rounds=1)
        status = instance.status()
        assert sum(row["routed"] for row in status["slots"]) == 10
        assert status["failures"] == 0
        assert main(["route", "--port", str(instance.port), SOURCES[0]]) == 0


def test_worker_kill_9_loses_no_connection_and_moves_no_client() -> None:
    with launched(["asgi_app.py", "-w", "3", *BASE]) as instance:
        victims = [s for s in SOURCES if predicted(s, 3) == 1]
        others = [s for s in SOURCES if predicted(s, 3) != 1]
        with Load(instance.port, others, threads=2) as load:
            before = {s: get(s, instance.port) for s in victims}
            old_pid = instance.slot_pids()[1][0]
            os.kill(old_pid, signal.SIGKILL)
            # Connect while slot 1 has no worker: the connections wait in its socket's queue.
            after = {s: get(s, instance.port) for s in victims}
            load.wait_requests(50)
        print(f"kill -9: {load.requests} requests, {len(load.failures)} failed")
        assert load.failures == []
        assert all(slot == 1 for slot, _, _ in after.values())
        assert {pid for _, pid, _ in after.values()} != {old_pid}
        assert {pid for _, pid, _ in before.values()} == {old_pid}
        for source, answers in load.seen.items():
            assert {slot for slot, _ in answers} == {predicted(source, 3)}


def test_hup_reload_under_load_fails_no_request() -> None:
    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        old = instance.slot_pids()
        with Load(instance.port, SOURCES, threads=4) as load:
            load.wait_requests(40)
            instance.signal(signal.SIGHUP)
            wait_for(lambda: "reload complete" in instance.output(), 60, "reload")
            wait_for(lambda: all(len(p) == 1 for p in instance.slot_pids().values()), 30, "old workers gone")
            load.wait_requests(40)
        new = instance.slot_pids()
        print(f"HUP: {load.requests} requests, {len(load.failures)} failed")
        assert load.failures == []
        assert all(set(new[slot]).isdisjoint(old[slot]) for slot in old)
        for source, answers in load.seen.items():
            assert {slot for slot, _ in answers} == {predicted(source, 2)}


def test_ttin_then_ttou_under_load() -> None:
    with launched(["asgi_app.py", "-w", "3", *BASE]) as instance:
        with Load(instance.port, SOURCES, threads=4) as load:
            load.wait_requests(40)
            instance.signal(signal.SIGTTIN)
            wait_for(lambda: re.search(r"slot 3: worker \d+ ready", instance.output()), 60, "slot 3 ready")
            load.wait_requests(100)
            grown = dict(load.seen)
            load.seen.clear()
            instance.signal(signal.SIGTTOU)
            wait_for(lambda: len(instance.slot_pids()) == 3, 60, "slot 3 retired")
            load.wait_requests(100)
        print(f"TTIN+TTOU: {load.requests} requests, {len(load.failures)} failed")
        assert load.failures == []
        moved = [s for s in SOURCES if predicted(s, 4) != predicted(s, 3)]
        assert all(predicted(s, 4) == 3 for s in moved)
        assert 0.1 <= len(moved) / len(SOURCES) <= 0.45  # ≈ 1/4 of 64 sources
        for source, answers in grown.items():
            # Each source's answers: its 3-slot home, then (if it moved) slot 3, never elsewhere.
            assert {slot for slot, _ in answers} <= {predicted(source, 3), predicted(source, 4)}
        for source, answers in load.seen.items():
            assert {slot for slot, _ in answers} <= {predicted(source, 3), 3}
            assert answers[-1][0] == predicted(source, 3)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_master_kill_9_takes_the_workers_with_it() -> None:
    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        workers = [pid for pids in instance.slot_pids().values() for pid in pids]
        control = control_dir() / socket_name("127.0.0.1", instance.port)
        instance.proc.kill()
        instance.proc.wait()
        # Dead: gone, or a zombie that init has not reaped yet (slow on a loaded machine).
        wait_for(lambda: not any(alive(pid) for pid in workers), 10.0, "workers to die")
        # A master killed with -9 cannot remove its control socket; the next launch on the port
        # replaces it, and this test removes the one it caused.
        assert control.exists()
        control.unlink()


def test_workers_drop_to_user(world_readable_apps: Path) -> None:
    with launched(["asgi_app.py", "-w", "2", *BASE, "--user", "nobody"], cwd=world_readable_apps) as instance:
        _, _, uid = get(SOURCES[0], instance.port)
        assert uid == 65534


# Bad inputs: a clear line, a non-zero exit, nothing left running. -------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.py"], "target file 'missing.py' does not exist"),
        (["pkg.missing:app"], "target pkg.missing:app: no module named 'pkg.missing'"),
        (["nopkg.service:app"], "target nopkg.service:app: no module named 'nopkg'"),
        (["pkg.service.sub:app"], "no module named 'pkg.service.sub'"),
        (["asgi_app.py", "--bind", "localhost:80x"], "expected HOST:PORT"),
        (["asgi_app.py", "--bind", "::1:8000"], "write an IPv6 address in brackets"),
        (["asgi_app.py", "--workers", "0"], "--workers must be 1..256, got 0"),
        (["asgi_app.py", "--hash-key", "abc"], "--hash-key must be 32 hex digits"),
        (["asgi_app.py", "--user", "no-such-user-xyz"], "--user 'no-such-user-xyz': no such user"),
        (["asgi_app.py", "--prefix4", "33"], "--prefix4 must be 0..32, got 33"),
    ],
    ids=[
        "missing-file",
        "missing-module",
        "missing-package",
        "module-not-a-package",
        "bad-bind",
        "bad-v6-bind",
        "zero-workers",
        "bad-key",
        "unknown-user",
        "bad-prefix",
    ],
)
def test_bad_input_is_one_line_before_any_fork_and_status_2(args: list[str], expected: str) -> None:
    output = run_bad([*args, "-w", "2"] if "--workers" not in args else args, expected, code=2)
    assert output.count("\n") == 1, output  # that line alone: no worker was ever started


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["no_app.py"],
            "no 'app' or 'application' in 'no_app.py'; saw no_app.py:handler, no_app.py:make_server",
        ),
        (["asgi_app.py:nothing"], "has no attribute 'nothing'"),
    ],
    ids=["no-app", "bad-attr"],
)
def test_app_that_cannot_load_exits_4(args: list[str], expected: str) -> None:
    run_bad([*args, "-w", "3", "--bind", "127.0.0.1:0"], expected, code=4)


def test_app_raising_on_import_shows_its_traceback_once() -> None:
    output = run_bad(
        ["broken_app.py", "-w", "4", "--bind", "127.0.0.1:0", "--graceful-timeout", "5"],
        "the app cannot be loaded: slot ",
        code=4,
    )
    assert "importing broken_app.py raised RuntimeError: this app cannot start" in output
    assert output.count("Traceback (most recent call last)") == 1, output
    assert output.count("RuntimeError: this app cannot start") == 2, output  # traceback + error line
    assert "killed by signal 9" not in output  # the other workers were asked with TERM


def test_port_taken_by_a_plain_socket() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        run_bad(
            ["asgi_app.py", "-w", "2", "--bind", f"127.0.0.1:{port}"],
            "in use by a socket that is not ours",
            code=3,
        )


def test_no_privileges_with_loader_native_is_status_3() -> None:
    # --loader native stays strict; the default (auto) would fall back to cbpf (test_cbpf_launch.py).
    run_bad(
        ["asgi_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--loader", "native"],
        "this process lacks CAP_BPF (or CAP_SYS_ADMIN)",
        code=3,
        prefix=["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"],
    )


@pytest.mark.bcc  # hides the installed package
def test_bcc_loader_without_bcc() -> None:
    # Hide bcc's Python package in a private mount namespace: the real import fails, as on a
    # machine without python3-bpfcc.
    hidden = "/usr/lib/python3/dist-packages/bcc"
    run_bad(
        ["asgi_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--loader", "bcc"],
        "apt-get install python3-bpfcc",
        prefix=[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs none {hidden} && exec "$@"',
            "sh",
        ],
    )


def test_python_api_run_from_a_script() -> None:
    import sys

    with launched([], argv=[sys.executable, "run_api.py", KEY]) as instance:
        assert_sticky(instance.port, 2, SOURCES[:20])


def test_term_stops_gracefully_with_status_0_and_cleans_up(tmp_path: Path) -> None:
    pid_file = tmp_path / "master.pid"
    with launched(["asgi_app.py", "-w", "2", *BASE, "--pid-file", str(pid_file)]) as instance:
        assert pid_file.read_text().strip() == str(instance.proc.pid)
        control = list(Path("/run/ebpf-sticky").glob(f"*-{instance.port}.sock"))
        assert len(control) == 1
        instance.signal(signal.SIGTERM)
        assert instance.finish() == 0
        assert not pid_file.exists() and not control[0].exists()
        assert tagged_processes(instance.tag) == []


def test_ready_is_notified_to_systemd(tmp_path: Path) -> None:
    # READY=1 comes among other datagrams (FDSTORE=1 pushes the group first), as systemd allows.
    manager = ServiceManager(tmp_path)
    try:
        with launched(["asgi_app.py", "-w", "2", *BASE], extra_env={"NOTIFY_SOCKET": manager.path}):
            wait_for(lambda: "READY=1" in manager.messages, 60, "READY=1 on the notify socket")
            assert {slot_name(0), slot_name(1), KEY_NAME} <= set(manager.names())
    finally:
        manager.close()


def test_workers_hold_no_bpf_capability() -> None:
    script = (
        "import os, re, socket; s = socket.socket(fileno=3); "
        "caps = int(re.search(r'CapEff:\\s*(\\w+)', open('/proc/self/status').read()).group(1), 16); "
        "bpf = [c for c in (12, 21, 38, 39) if caps >> c & 1]; "
        "c, _ = s.accept(); c.sendall(f'{bpf}'.encode()); c.close()"
    )
    with (
        launched(["-w", "1", *BASE, "--", sys.executable, "-c", script]) as instance,
        socket.create_connection(("127.0.0.1", instance.port)) as client,
    ):
        assert client.recv(64) == b"[]"


def test_udp_command_workers_are_sticky() -> None:
    script = (
        "import os, socket; s = socket.socket(fileno=3)\n"
        "while True:\n"
        "    data, peer = s.recvfrom(64); s.sendto(os.environ['EBPF_STICKY_WORKER'].encode(), peer)\n"
    )
    with launched(["-w", "3", *BASE, "--udp", "--", sys.executable, "-c", script]) as instance:
        for source in SOURCES[:30]:
            for _ in range(2):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.bind((source, 0))
                    client.settimeout(10)
                    client.sendto(b"?", ("127.0.0.1", instance.port))
                    assert int(client.recv(64)) == predicted(source, 3)


def test_command_that_never_starts_stops_the_launch() -> None:
    output = run_bad(
        ["-w", "2", "--bind", "127.0.0.1:0", "--", "sh", "-c", "exit 1"],
        "3 times in a row, and no worker ever became ready: the app cannot start",
        code=4,
    )
    assert "respawning in 0.1 s" in output and "respawning in 0.2 s" in output


def test_doctor_says_launch_will_work() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ebpf_sticky", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout
    assert "ok   sticky group: router native" in proc.stdout
    assert "ok   session-key search: in C" in proc.stdout  # scripts/test builds it
    assert "launch will work" in proc.stdout


def test_doctor_without_privileges_names_the_fix() -> None:
    proc = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            sys.executable,
            "-m",
            "ebpf_sticky",
            "doctor",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Launch still works (the classic-BPF router); the missing capabilities are a warning.
    assert proc.returncode == 0, proc.stdout
    assert "warn privileges" in proc.stdout and "fix: run as root, or grant CAP_BPF" in proc.stdout
    assert "ok   sticky group: router cbpf" in proc.stdout and "native refused" in proc.stdout


def test_status_without_an_instance() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ebpf_sticky", "status", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ebpf-sticky: error: no running ebpf-sticky instance on port 1")


def test_workers_cannot_detach_or_replace_the_program() -> None:
    # Without a filter, SO_DETACH_REUSEPORT_BPF needs no privilege: one worker could unstick all.
    script = (
        "import socket; s = socket.socket(fileno=3); out = []\n"
        "for opt, val in ((68, 0), (51, b'\\0' * 16), (52, 0)):\n"
        "    try:\n"
        "        s.setsockopt(socket.SOL_SOCKET, opt, val); out.append('allowed')\n"
        "    except OSError as exc:\n"
        "        out.append(exc.errno)\n"
        "while True:\n"
        "    c, _ = s.accept(); c.sendall(repr(out).encode()); c.close()\n"
    )
    with launched(["-w", "3", *BASE, "--", sys.executable, "-c", script]) as instance:
        for source in SOURCES[:40]:
            with socket.create_connection(("127.0.0.1", instance.port), source_address=(source, 0)) as client:
                assert client.recv(64) == b"[1, 1, 1]"  # EPERM, three times
            assert instance.slot_pids()  # still answering
        routed = instance.status()["slots"]
        assert sum(row["routed"] for row in routed) == 40  # every connection went through the program
