"""`ebpf-sticky launch` as ``nobody`` with no capability: --loader auto runs the classic-BPF router.

Workers are a small `-- python` server that answers each connection with its slot, its pid and
what happened when it tried to detach or replace the group's program at start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.launcher import KEY, Instance, launched, wait_for
from support.netlab import v4_sources

from ebpf_sticky.control import request, socket_name
from ebpf_sticky.hashing import HashSpec, parse_address
from ebpf_sticky.hashing import cbpf as hashing_cbpf

SPEC = HashSpec(bytes.fromhex(KEY))
SOURCES = v4_sources(512)
NOBODY = [
    "setpriv",
    "--reuid=nobody",
    "--regid=nogroup",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--",
]
WORKER = (
    "import os, socket\n"
    "s = socket.socket(fileno=3)\n"
    "tried = []\n"
    "for opt, value in ((68, 0), (51, bytes(16)), (52, 0)):  # detach, attach cBPF, attach eBPF\n"
    "    try:\n"
    "        s.setsockopt(socket.SOL_SOCKET, opt, value); tried.append('allowed')\n"
    "    except OSError as exc:\n"
    "        tried.append(str(exc.errno))\n"
    "reply = f\"{os.environ['EBPF_STICKY_WORKER']} {os.getpid()} {','.join(tried)}\".encode()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(reply); c.close()\n"
)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """XDG_RUNTIME_DIR for a master running as nobody: where its control socket goes."""
    directory = Path(tempfile.mkdtemp(prefix="ebpf-sticky-nobody-"))
    os.chown(directory, 65534, 65534)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def predicted(slots: int) -> dict[str, int]:
    return {s: hashing_cbpf.slot_of(parse_address(s), SPEC, slots) for s in SOURCES}


def ask(port: int, sources: list[str] = SOURCES) -> dict[str, tuple[int, int, str]]:
    """One connection per source: (slot, pid, what the worker's detach/replace attempts gave)."""
    answers = {}
    for source in sources:
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as client:
            slot, pid, tried = client.recv(128).decode().split()
            answers[source] = (int(slot), int(pid), tried)
    return answers


def slots_of(answers: dict[str, tuple[int, int, str]]) -> dict[str, int]:
    return {source: slot for source, (slot, _, _) in answers.items()}


def status(instance: Instance, runtime: Path) -> dict[str, Any]:
    return request(runtime / "ebpf-sticky" / socket_name("127.0.0.1", instance.port), {"cmd": "status"})


def as_nobody_cli(args: list[str], runtime: Path) -> str:
    proc = subprocess.run(
        [*NOBODY, sys.executable, "-m", "ebpf_sticky", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def launch_args(workers: int) -> list[str]:
    return ["-w", str(workers), "--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "5"]


def test_auto_runs_cbpf_unprivileged_and_status_route_say_so(runtime_dir: Path) -> None:
    with launched(
        [*launch_args(3), "--", sys.executable, "-c", WORKER],
        prefix=NOBODY,
        extra_env={"XDG_RUNTIME_DIR": str(runtime_dir)},
    ) as instance:
        output = instance.output()
        assert re.search(
            r"router: cbpf \(classic BPF, unprivileged\), chosen by --loader auto: native refused", output
        )
        assert "(cbpf loader, 644 BPF instructions)" in output
        answers = ask(instance.port)
        assert slots_of(answers) == predicted(3)
        assert {tried for _, _, tried in answers.values()} == {"1,1,1"}  # EPERM from the filter
        assert slots_of(ask(instance.port)) == predicted(3)  # still routed after the attempts

        state = status(instance, runtime_dir)
        assert state["loader"] == "cbpf" and state["failures"] is None
        assert [row["routed"] for row in state["slots"]] == [None, None, None]
        text = as_nobody_cli(["status", "--port", str(instance.port)], runtime_dir)
        assert "cbpf loader" in text and "no counters (classic BPF)" in text
        assert [line.split()[-1] for line in text.splitlines()[2:]] == ["-", "-", "-"]

        sample = SOURCES[:40]
        online = as_nobody_cli(["route", "--port", str(instance.port), *sample], runtime_dir).splitlines()
        assert online[0] == "router: cbpf"
        offline = as_nobody_cli(
            ["route", "--loader", "cbpf", "--workers", "3", "--hash-key", KEY, *sample], runtime_dir
        ).splitlines()
        for source, online_line, offline_line in zip(sample, online[1:], offline, strict=True):
            assert online_line.split()[:2] == offline_line.split() == [source, str(answers[source][0])]


def test_kill_9_hup_ttin_ttou_ttin_keep_position_equal_slot(runtime_dir: Path) -> None:
    with launched(
        [*launch_args(3), "--loader", "cbpf", "--", sys.executable, "-c", WORKER],
        prefix=NOBODY,
        extra_env={"XDG_RUNTIME_DIR": str(runtime_dir)},
    ) as instance:
        before = ask(instance.port)
        assert slots_of(before) == predicted(3)

        # kill -9 slot 1's worker: its replacement serves the same socket, nothing moves.
        old = {slot: pid for slot, pid, _ in before.values()}
        os.kill(old[1], signal.SIGKILL)
        wait_for(
            lambda: status(instance, runtime_dir)["slots"][1]["pids"] not in ([], [old[1]]),
            30,
            "slot 1 respawned",
        )
        after_kill = ask(instance.port)
        assert slots_of(after_kill) == predicted(3)
        assert {pid for slot, pid, _ in after_kill.values() if slot == 1}.isdisjoint({old[1]})

        # HUP: a new worker per slot on the same sockets, then the old ones stop.
        instance.signal(signal.SIGHUP)
        wait_for(lambda: "reload complete" in instance.output(), 60, "reload")
        wait_for(
            lambda: all(len(row["pids"]) == 1 for row in status(instance, runtime_dir)["slots"]),
            30,
            "old gone",
        )
        reloaded = ask(instance.port)
        assert slots_of(reloaded) == predicted(3)
        assert {pid for _, pid, _ in reloaded.values()}.isdisjoint({pid for _, pid, _ in after_kill.values()})

        instance.signal(signal.SIGTTIN)
        wait_for(lambda: re.search(r"slot 3: worker \d+ ready", instance.output()), 60, "slot 3 ready")
        grown = slots_of(ask(instance.port))
        assert grown == predicted(4)
        moved = [s for s in SOURCES if grown[s] != before[s][0]]
        assert moved and all(grown[s] == 3 for s in moved)
        print(
            f"cbpf TTIN 3->4 on a running instance: {len(moved)}/{len(SOURCES)} sources moved, all to slot 3"
        )
        assert len(moved) / len(SOURCES) <= 1.05 * 0.25 + 0.05

        instance.signal(signal.SIGTTOU)
        wait_for(lambda: len(status(instance, runtime_dir)["slots"]) == 3, 60, "slot 3 retired")
        assert slots_of(ask(instance.port)) == predicted(3)

        # A slot added after a release joins where the released one was: position = slot still.
        instance.signal(signal.SIGTTIN)
        wait_for(
            lambda: len(re.findall(r"slot 3: worker \d+ ready", instance.output())) == 2, 60, "slot 3 again"
        )
        assert slots_of(ask(instance.port)) == predicted(4)


def test_launch_under_a_seccomp_filter_that_denies_bpf_runs_cbpf() -> None:
    # Root with every capability, but the launching process carries a filter that refuses bpf(2)
    # (what Debian's podman profile does without CAP_SYS_ADMIN): auto must say so and run cbpf.
    tests = Path(__file__).resolve().parents[1]
    launcher = (
        f"import os, sys; sys.path.insert(0, {str(tests)!r}); from support.sandbox import deny_bpf_syscall\n"
        "deny_bpf_syscall()\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'ebpf_sticky', 'launch', *sys.argv[1:]])\n"
    )
    argv = [sys.executable, "-c", launcher, *launch_args(2), "--", sys.executable, "-c", WORKER]
    with launched([], argv=argv) as instance:
        output = instance.output()
        assert "router: cbpf (classic BPF, unprivileged), chosen by --loader auto: native refused" in output
        assert "permission denied" in output
        assert slots_of(ask(instance.port, SOURCES[:100])) == {s: predicted(2)[s] for s in SOURCES[:100]}
