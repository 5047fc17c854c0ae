"""Events that overlap, live: each once lost a slot for good. Workers are steered through files
(see apps/gate_app.py): a successor that waits at import, fails at import, or lingers in its stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.launcher import KEY, Instance, get, launched, predicted, wait_for
from support.netlab import v4_sources

BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "30"]
SOURCE_0 = next(s for s in v4_sources(64, start=42000) if predicted(s, 2) == 0)


@pytest.fixture
def gated() -> Iterator[tuple[Instance, Path]]:
    # Workers run as an unprivileged user: the gate directory must be theirs to look into (pytest's
    # own tmp_path sits under a directory private to root).
    gate_dir = Path(tempfile.mkdtemp(prefix="ebpf-sticky-gate-"))
    gate_dir.chmod(0o755)
    try:
        with launched(["gate_app.py", "-w", "2", *BASE], extra_env={"GATE": str(gate_dir)}) as instance:
            try:
                yield instance, gate_dir
            finally:
                for gate in gate_dir.iterdir():  # let lingering and held workers go
                    gate.unlink()
    finally:
        shutil.rmtree(gate_dir)


def ready_pid(instance: Instance, slot: int, exclude: set[int]) -> int | None:
    found = re.findall(rf"slot {slot}: worker (\d+) ready", instance.output())
    fresh = [int(pid) for pid in found if int(pid) not in exclude]
    return fresh[-1] if fresh else None


def serves_slot_0(instance: Instance, exclude: set[int]) -> int | None:
    """The pid answering slot 0's client, if it is none of ``exclude``."""
    try:
        slot, pid, _ = get(SOURCE_0, instance.port, timeout=2.0)
    except OSError:
        return None
    return pid if slot == 0 and pid not in exclude else None


def test_a_successor_crashing_while_its_predecessor_stops_is_replaced(gated: tuple[Instance, Path]) -> None:
    instance, gate = gated
    [old] = instance.slot_pids()[0]
    (gate / "linger-0").touch()  # the predecessor's graceful stop lasts until the test ends
    instance.signal(signal.SIGHUP)
    successor = wait_for(lambda: ready_pid(instance, 0, {old}), 30, "slot 0's successor")
    os.kill(successor, signal.SIGKILL)
    third = wait_for(lambda: serves_slot_0(instance, {old, successor}), 30, "a third worker on slot 0")
    assert old in instance.slot_pids()[0]  # still stopping: the two overlapped
    assert third in instance.slot_pids()[0]


def test_hup_during_a_boot_failure_backoff_then_a_failed_successor(gated: tuple[Instance, Path]) -> None:
    instance, gate = gated
    [old] = instance.slot_pids()[0]
    (gate / "fail-0").touch()
    os.kill(old, signal.SIGKILL)
    backoff = "(6 in a row); respawning in 3.2 s"
    wait_for(lambda: backoff in instance.output(), 60, "a long backoff on slot 0")
    instance.signal(signal.SIGHUP)
    wait_for(lambda: "reload aborted" in instance.output(), 30, "the reload's worker to fail")
    text = instance.output()
    waiting = text[text.index(backoff) : text.index("SIGHUP")]
    assert not re.search(r"slot 0: worker \d+ started", waiting), text  # the HUP came during the backoff
    (gate / "fail-0").unlink()
    wait_for(lambda: serves_slot_0(instance, {old}), 40, "slot 0 back after its backoff")


def test_old_worker_killed_during_a_reload_then_a_failed_successor(gated: tuple[Instance, Path]) -> None:
    instance, gate = gated
    [old] = instance.slot_pids()[0]
    (gate / "hold-0").touch()
    instance.signal(signal.SIGHUP)
    wait_for(lambda: len(instance.slot_pids()[0]) == 2, 30, "slot 0's successor booting")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: f"worker {old} killed by signal 9" in instance.output(), 10, "the kill seen")
    (gate / "fail-0").touch()
    (gate / "hold-0").unlink()  # the successor's import goes on, and fails
    wait_for(lambda: "reload aborted" in instance.output(), 30, "the successor to fail")
    (gate / "fail-0").unlink()
    wait_for(lambda: serves_slot_0(instance, {old}), 40, "slot 0 back after its backoff")


def test_ttou_while_the_last_slot_reloads_leaves_reloads_working(gated: tuple[Instance, Path]) -> None:
    instance, gate = gated
    (gate / "hold-1").touch()
    instance.signal(signal.SIGHUP)
    wait_for(lambda: len(instance.slot_pids()[1]) == 2, 60, "slot 1's successor booting")
    instance.signal(signal.SIGTTOU)
    wait_for(lambda: len(instance.slot_pids()) == 1, 30, "slot 1 retired")
    [before] = instance.slot_pids()[0]
    instance.signal(signal.SIGHUP)
    wait_for(lambda: instance.slot_pids()[0] not in ([before], []), 30, "a later HUP renewing slot 0")
    wait_for(lambda: serves_slot_0(instance, {before}), 30, "slot 0's new worker serving")
