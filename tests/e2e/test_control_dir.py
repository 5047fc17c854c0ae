"""Another local user squats the control directory of a user's instance (``/tmp/ebpf-sticky-<uid>``
without XDG_RUNTIME_DIR) and answers `status` in its place: the master refuses to start with one
line, and `status` refuses to believe the squatter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.launcher import run_bad

VICTIM = ["setpriv", "--reuid=www-data", "--regid=www-data", "--clear-groups", "--inh-caps=-all", "--"]
SQUATTER = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", "--"]
SQUATTED = Path("/tmp/ebpf-sticky-33")  # www-data's fallback control directory
FAKE = b'{"pid": 1, "bind": "127.0.0.1:80", "protocol": "tcp", "loader": "native", "phase": "serving", '
FAKE += b'"uptime": 1, "failures": 0, "slots": []}'


@pytest.fixture
def squatted() -> Iterator[Path]:
    """The directory, made by nobody, with a socket of nobody's answering every connection."""
    shutil.rmtree(SQUATTED, ignore_errors=True)
    subprocess.run([*SQUATTER, "mkdir", "-m", "0777", str(SQUATTED)], check=True)
    try:
        yield SQUATTED
    finally:
        shutil.rmtree(SQUATTED, ignore_errors=True)


def fake_server(path: Path) -> subprocess.Popen[bytes]:
    """nobody's server on ``path``: answers every request with a made-up status."""
    script = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); os.umask(0); s.bind(sys.argv[1]); s.listen()\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    try:\n"
        "        c.recv(65536); c.sendall(sys.argv[2].encode())\n"
        "    except OSError:\n"  # a liveness probe: connect and close
        "        pass\n"
        "    c.close()\n"
    )
    return subprocess.Popen(
        [*SQUATTER, sys.executable, "-c", script, str(path), FAKE.decode()], stdout=subprocess.PIPE
    )


def test_a_squatted_directory_stops_the_master_with_one_line(squatted: Path) -> None:
    args = ["-w", "1", "--bind", "127.0.0.1:0", "--loader", "cbpf", "--", "sleep", "600"]
    run_bad(
        args,
        f"the control directory {squatted} belongs to uid 65534, not to uid 33",
        prefix=VICTIM,
        extra_env={"XDG_RUNTIME_DIR": ""},
        cwd=Path("/"),
    )


def victim_status() -> subprocess.CompletedProcess[str]:
    """`ebpf-sticky status` as the victim, whose control directory is the fallback one."""
    return subprocess.run(
        [*VICTIM, "env", "XDG_RUNTIME_DIR=", sys.executable, "-m", "ebpf_sticky", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_status_does_not_believe_a_squatter(squatted: Path) -> None:
    netns = Path("/proc/thread-self/ns/net").stat().st_ino
    with fake_server(squatted / f"net{netns}-127.0.0.1-8000.sock") as server:
        try:
            assert server.stdout is not None and server.stdout.readline() == b"ready\n"
            status = victim_status()
        finally:
            server.kill()
    assert status.returncode == 2, status.stdout + status.stderr
    assert f"the control directory {squatted} belongs to uid 65534, not to uid 33" in status.stderr
    assert "127.0.0.1:80" not in status.stdout


def test_status_checks_who_answers(squatted: Path) -> None:
    """The directory is the victim's own (0700) but the socket in it is served by another user
    (planted before the directory changed hands): SO_PEERCRED gives it away."""
    netns = Path("/proc/thread-self/ns/net").stat().st_ino
    with fake_server(squatted / f"net{netns}-127.0.0.1-8000.sock") as server:
        try:
            assert server.stdout is not None and server.stdout.readline() == b"ready\n"
            os.chown(squatted, 33, 33)
            squatted.chmod(0o700)
            status = victim_status()
        finally:
            server.kill()
    assert status.returncode == 2, status.stdout + status.stderr
    assert (
        "runs as uid 65534, not as the directory's owner (33) nor root: not trusting its answer"
        in status.stderr
    )
    assert "127.0.0.1:80" not in status.stdout
