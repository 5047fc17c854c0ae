"""The master's end of the control socket: answers `status` and `route` from live state."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..control import alive, control_dir, peer_uid, socket_name
from ..errors import ControlError
from ..hashing import parse_address
from ..kernel.router import Router
from .core import Core

log = logging.getLogger("ebpf_sticky")


def answer(message: dict[str, Any], router: Router, sup_core: Core, uptime: float) -> dict[str, Any]:
    """The reply to one request; pure given the router's counters."""
    pids: dict[int, list[int]] = {}
    for worker in sup_core.workers.values():
        pids.setdefault(worker.slot, []).append(worker.pid)
    if message.get("cmd") == "status":
        counters = router.counters()
        return {
            "pid": os.getpid(),
            "bind": str(router.bind.with_port(router.port)),
            "protocol": "udp" if router.udp else "tcp",
            "loader": router.loader,
            "phase": sup_core.phase.value,
            "uptime": round(uptime, 3),
            "failures": counters.failures,
            "slots": [
                {"slot": slot, "pids": sorted(pids.get(slot, [])), "routed": counters.per_slot[slot]}
                for slot in range(router.slots)
            ],
        }
    if message.get("cmd") == "route":
        rows = []
        for text in message.get("addresses", []):
            try:
                slot = router.slot_of(parse_address(str(text)), sup_core.slots)
            except ValueError:
                return {"error": f"{text!r} is not an IP address"}
            rows.append({"address": text, "slot": slot, "pids": sorted(pids.get(slot, []))})
        return {"routes": rows, "loader": router.loader}
    return {"error": f"unknown request {message.get('cmd')!r}"}


class ControlServer:
    def __init__(self, listener: socket.socket, path: Path, router: Router) -> None:
        self.listener = listener
        self.path = path
        self.router = router

    @classmethod
    @contextlib.contextmanager
    def open(cls, router: Router) -> Iterator[ControlServer]:
        directory = control_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        path = directory / socket_name(router.bind.host, router.port)
        if path.exists():
            if alive(path):
                raise ControlError(f"another instance already answers at {path}")
            path.unlink()  # left by a master killed with -9
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(path))
            finally:
                os.umask(old_umask)
            listener.listen(16)
            listener.setblocking(False)
            yield cls(listener, path, router)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def sockets(self) -> list[socket.socket]:
        return [self.listener]

    def serve(self, readable: list[Any], sup_core: Core, started: float) -> None:
        if self.listener not in readable:
            return
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            with conn:
                conn.settimeout(1.0)
                try:
                    if peer_uid(conn) not in (0, os.geteuid()):
                        reply: dict[str, Any] = {"error": "permission denied: not the launching user"}
                    else:
                        data = b""
                        while not data.endswith(b"\n") and (chunk := conn.recv(65536)):
                            data += chunk
                        if not data:
                            continue  # a liveness probe: connect and close
                        reply = answer(json.loads(data), self.router, sup_core, time.monotonic() - started)
                    conn.sendall(json.dumps(reply).encode())
                except (OSError, ValueError) as exc:
                    log.warning("control request failed: %s", exc)
