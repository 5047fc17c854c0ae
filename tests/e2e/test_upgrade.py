"""In-place upgrades of the master (SIGUSR2, `ebpf-sticky upgrade`) under load from many sources."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.launcher import KEY, SPEC, Instance, Load, get, launched, predicted, session_get, wait_for
from support.netlab import v4_sources

import ebpf_sticky
from ebpf_sticky.hashing import parse_address
from ebpf_sticky.kernel.loaders import LOADERS

SOURCES = v4_sources(500, start=9000)
BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "10"]
WORKERS = 3


def upgrade_twice_under_load(instance: Instance, loader: str = "native") -> None:
    master = instance.proc.pid
    seen: set[int] = set()
    with Load(instance.port, SOURCES, threads=8) as load:
        load.wait_requests(500, timeout=60)
        for generation in (1, 2):
            old = instance.worker_pids()
            seen |= old
            began = time.monotonic()
            instance.signal(signal.SIGUSR2)
            wait_for(lambda g=generation, o=old: instance.renewed(g, o), 120, f"generation {generation}")
            print(f"generation {generation}: every worker renewed after {time.monotonic() - began:.2f} s")
            load.wait_requests(500, timeout=60)
    final = instance.worker_pids()
    status = instance.status()
    print(f"USR2 x2: {load.requests} requests from {len(load.seen)} sources, {len(load.failures)} failed")
    assert load.failures == []
    assert status["pid"] == master and instance.proc.poll() is None
    # ps and `pgrep -f` still show the command line it was launched with.
    cmdline = Path(f"/proc/{master}/cmdline").read_bytes().split(b"\0")
    launched_as = [sys.executable, "-m", "ebpf_sticky", "launch", *instance.args]
    assert cmdline[cmdline.index(b"--") + 1 : -1] == [os.fsencode(arg) for arg in launched_as]
    assert status["generation"] == 2 and status["version"] == ebpf_sticky_version()
    assert final.isdisjoint(seen) and len(final) == WORKERS
    assert len(load.seen) == len(SOURCES)
    for source, answers in load.seen.items():
        assert {slot for slot, _ in answers} == {
            LOADERS[loader].slot_of(parse_address(source), SPEC, WORKERS)
        }


def ebpf_sticky_version() -> str:
    from importlib.metadata import version

    return version("ebpf-sticky")


@pytest.mark.parametrize("loader", ["native", "cbpf"])
def test_two_usr2_under_load_with_uvicorn_workers(loader: str) -> None:
    args = ["asgi_app.py", "-w", str(WORKERS), *BASE, "--loader", loader, "--metrics", "127.0.0.1:0"]
    with launched(args) as instance:
        upgrade_twice_under_load(instance, loader)
        assert instance.output().count("upgraded in place") == 2
        assert f"({loader} loader," in instance.output().rsplit("upgrading the master", 1)[1]


def test_two_usr2_under_load_with_command_workers() -> None:
    node = shutil.which("node")
    assert node, "node is installed by .ci/run"
    with launched(["-w", str(WORKERS), *BASE, "--", node, "server.js"]) as instance:
        upgrade_twice_under_load(instance)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ebpf_sticky", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def own_install() -> Iterator[Path]:
    """A copy of the installed package that the launched master imports (PYTHONPATH first):
    an install the test can break and repair under a running master. Outside pytest's tmp_path,
    which is root's alone: the workers' default user imports it too."""
    site = Path(tempfile.mkdtemp(prefix="ebpf-sticky-site-"))
    try:
        site.chmod(0o755)
        shutil.copytree(Path(ebpf_sticky.__file__).parent, site / "ebpf_sticky")
        yield site
    finally:
        shutil.rmtree(site)


def test_upgrade_to_a_broken_install_is_refused_and_the_group_serves_on(own_install: Path) -> None:
    broken = own_install / "ebpf_sticky" / "handover.py"
    good = broken.read_text()
    args = ["asgi_app.py", "-w", "2", *BASE]
    with launched(args, extra_env={"PYTHONPATH": str(own_install)}) as instance:
        assert str(own_install) in Path(f"/proc/{instance.proc.pid}/environ").read_text()
        before = instance.slot_pids()
        with Load(instance.port, SOURCES[:100], threads=4) as load:
            load.wait_requests(100)
            broken.write_text(good + "\ndef broken(:\n")
            refused = cli("upgrade", "--port", str(instance.port))
            load.wait_requests(100)
            assert instance.slot_pids() == before  # the same workers: nothing was replaced
            broken.write_text(good)
            repaired = cli("upgrade", "--port", str(instance.port))
            wait_for(lambda: instance.renewed(1, worker_pids_of(before)), 120, "the repaired upgrade")
            load.wait_requests(100)
        print(refused.stderr.strip())
        assert refused.returncode == 2, refused
        assert "upgrade refused: the installed ebpf-sticky cannot start (SyntaxError" in refused.stderr
        assert "handover.py" in refused.stderr
        log_lines = [line for line in instance.output().splitlines() if "upgrade refused" in line]
        assert len(log_lines) == 1 and "this master keeps serving" in log_lines[0]
        assert repaired.returncode == 0 and "generation 1" in repaired.stdout, repaired
        assert load.failures == []
        assert instance.status()["pid"] == instance.proc.pid


def worker_pids_of(slot_pids: dict[int, list[int]]) -> set[int]:
    return {pid for pids in slot_pids.values() for pid in pids}


def test_usr2_while_starting_is_not_fatal() -> None:
    """Before the group is settled the master says so and carries on (USR2 no longer kills it)."""
    instance = Instance(["asgi_app.py", "-w", "2", *BASE])
    try:
        wait_for(lambda: "slots on" in instance.output(), 60, "the group")
        instance.signal(signal.SIGUSR2)
        instance.wait_serving()
        assert instance.status()["generation"] in (0, 1)
    finally:
        instance.close()


@pytest.mark.parametrize("loader", ["native", "cbpf"])
def test_an_upgraded_master_still_adds_and_retires_slots(loader: str) -> None:
    """The adopted routing (which bucket table is live, the program) keeps working: TTIN and TTOU
    after an upgrade route every source where the loader's mirror says."""
    mirror = LOADERS[loader].slot_of
    sources = SOURCES[:120]
    with launched(["asgi_app.py", "-w", "2", *BASE, "--loader", loader]) as instance:
        old = instance.worker_pids()
        instance.signal(signal.SIGUSR2)
        wait_for(lambda: instance.renewed(1, old), 120, "generation 1")
        for sig, slots in ((signal.SIGTTIN, 3), (signal.SIGTTIN, 4), (signal.SIGTTOU, 3)):
            instance.signal(sig)
            wait_for(lambda n=slots: len(instance.slot_pids()) == n and instance.renewed(1, old), 60, "slots")
            got = {source: get(source, instance.port)[0] for source in sources}
            assert got == {source: mirror(parse_address(source), SPEC, slots) for source in sources}


def test_an_install_that_hashes_session_ids_otherwise_is_refused(own_install: Path) -> None:
    """A version whose table key differs would find none of the learnt ids: the check refuses it
    in one line before the exec, and the group serves on with its table."""
    ownership = own_install / "ebpf_sticky" / "sessions" / "ownership.py"
    good = ownership.read_text()
    args = ["session_app.py", "-w", "2", *BASE, "--session-key", "header:x-session"]
    with launched(args, extra_env={"PYTHONPATH": str(own_install)}) as instance:
        owner = next(s for s in SOURCES if predicted(s, 2) == 0)
        other = next(s for s in SOURCES if predicted(s, 2) == 1)
        _, _, session = session_get(instance.port, owner, "/login", None)
        before = instance.slot_pids()
        ownership.write_text(good.replace('b"ebpf-sticky session table"', 'b"another session table"'))
        refused = cli("upgrade", "--port", str(instance.port))
        assert instance.slot_pids() == before
        ownership.write_text(good)
        repaired = cli("upgrade", "--port", str(instance.port))
        wait_for(lambda: instance.renewed(1, worker_pids_of(before)), 120, "the repaired upgrade")
        print(refused.stderr.strip())
        assert refused.returncode == 2, refused
        assert "the session table cannot be carried over (its ids are hashed under another table key)" in (
            refused.stderr
        )
        log_lines = [line for line in instance.output().splitlines() if "upgrade refused" in line]
        assert len(log_lines) == 1 and "restart the group" in log_lines[0], log_lines
        assert repaired.returncode == 0, repaired
        assert session_get(instance.port, other, "/", session)[:2] == (200, "0")
