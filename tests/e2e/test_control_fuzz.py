"""The control socket under hostile input: random bytes, wrong shapes, deep nesting, 1 MiB lines and
stalled clients. Afterwards the master is the same process, serves HTTP, and `status` answers."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

from support.launcher import KEY, Instance, get, launched, predicted
from support.netlab import v4_sources

from ebpf_sticky.control import control_dir, socket_name

BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY]
SHAPES = [
    b"[]",
    b"{}",
    b"null",
    b"5",
    b'"status"',
    b'{"cmd":"route","addresses":5}',
    b'{"cmd":"route","addresses":[5]}',
    b'{"cmd":"route","addresses":{"a":1}}',
    b'{"cmd":"route","addresses":["x"]}',
    b'{"cmd":"route"}',
    b'{"cmd":["status"]}',
    b'{"cmd":"status","addresses":["127.0.0.1"]}',
    b'{"cmd":"route","addresses":["127.0.0.1"' + b',"127.0.0.1"' * 5000 + b"]}",
    b"1" * 20000,
    b'{"cmd":"' + b"\\ud800" * 10 + b'"}',
    b"[" * 65536,
    b"{" * 65536,
    b'{"a":' * 30000,
    b"x" * (1 << 20),
]


def ask(path: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """One request as any client would send it; what came back (b"" if the server hung up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))  # blocking: waits for room in the backlog, as a patient client does
        sock.settimeout(timeout)
        try:
            sock.sendall(data + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered a too-long line early and hung up
            pass
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
        return reply


def fuzz(instance: Instance, path: Path, cases: list[bytes]) -> int:
    """Send every case; each answer must be an error. Returns how many were answered."""
    answered = 0
    for data in cases:
        try:
            reply = ask(path, data)
        except OSError as exc:
            raise AssertionError(f"{exc} on {data[:80]!r}:\n{instance.output()[-2000:]}") from None
        if reply:
            assert "error" in json.loads(reply), (data[:80], reply)
            answered += 1
        assert instance.proc.poll() is None, f"the master died on {data[:80]!r}:\n{instance.output()}"
    return answered


def test_hostile_control_clients_leave_the_master_serving() -> None:
    rng = random.Random(16)
    sources = v4_sources(8, start=41000)
    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        master = instance.proc.pid
        path = control_dir() / socket_name("127.0.0.1", instance.port)
        cases = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))) for _ in range(300)]
        cases += SHAPES
        errors = fuzz(instance, path, cases)  # alone, then among clients that stall
        stalled = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(100)]
        try:
            for i, client in enumerate(stalled):
                client.connect(str(path))
                if i % 2:
                    client.sendall(b'{"cmd": "sta')  # and stop mid-line
            errors += fuzz(instance, path, cases)
        finally:
            for client in stalled:
                client.close()
        assert instance.proc.poll() is None and instance.proc.pid == master, instance.output()
        assert instance.status()["phase"] == "running"
        for source in sources:
            assert get(source, instance.port)[0] == predicted(source, 2)
        cli = subprocess.run(
            [sys.executable, "-m", "ebpf_sticky", "status", "--port", str(instance.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0, cli.stderr
        print(
            f"{2 * len(cases)} hostile requests, half among 100 stalled clients: {errors} answered as errors"
        )
        assert errors >= 2 * (len(cases) - 1)  # only a 1 MiB line may be cut off before its answer
        assert "Traceback" not in instance.output()
