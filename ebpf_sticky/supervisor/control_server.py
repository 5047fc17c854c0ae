"""The master's end of the control socket: answers `status` and `route` from live state."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control import alive, control_dir, peer_uid, socket_name
from ..errors import ControlError, StickyError
from ..hashing import parse_address
from ..kernel.router import Router
from ..sessions.master import CONCENTRATION_WARNING, MasterSessions, SessionFigures
from .core import Core

log = logging.getLogger("ebpf_sticky")


def answer(
    message: dict[str, Any],
    router: Router,
    sup_core: Core,
    uptime: float,
    sessions: SessionFigures | None = None,
) -> dict[str, Any]:
    """The reply to one request; pure given the router's counters and the session figures."""
    pids: dict[int, list[int]] = {}
    for worker in sup_core.workers.values():
        pids.setdefault(worker.slot, []).append(worker.pid)
    if message.get("cmd") == "status":
        counters = router.counters()
        reply: dict[str, Any] = {
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
        if sessions is not None:
            for slot, figures in enumerate(sessions.per_slot):
                reply["slots"][slot]["sessions"] = figures
            reply["source_concentration"] = sessions.concentration
            if sessions.concentrated:
                reply["warnings"] = [CONCENTRATION_WARNING]
        return reply
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


# A control connection gets this long to send its request and take its answer; it never holds
# the supervisor's loop meanwhile (every read and write is non-blocking).
REQUEST_TIMEOUT = 1.0
MAX_CONNECTIONS = 32
MAX_REQUEST = 65536


@dataclass
class _Connection:
    sock: socket.socket
    opened: float
    inbox: bytes = b""
    outbox: bytes | None = None  # the answer, once the request is complete


class ControlServer:
    def __init__(self, listener: socket.socket, path: Path, router: Router) -> None:
        self.listener = listener
        self.path = path
        self.router = router
        self.connections: dict[socket.socket, _Connection] = {}
        self.sessions: MasterSessions | None = None  # set by the loop when the layer is on

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
        server: ControlServer | None = None
        try:
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(path))
            finally:
                os.umask(old_umask)
            listener.listen(16)
            listener.setblocking(False)
            server = cls(listener, path, router)
            yield server
        finally:
            if server is not None:
                for conn in list(server.connections):
                    server._close(conn)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def readers(self) -> list[socket.socket]:
        return [self.listener, *(s for s, c in self.connections.items() if c.outbox is None)]

    def writers(self) -> list[socket.socket]:
        return [s for s, c in self.connections.items() if c.outbox is not None]

    def serve(
        self, readable: list[Any], writable: list[Any], sup_core: Core, started: float, now: float
    ) -> None:
        if self.listener in readable:
            self._accept(now)
        for sock in [s for s in readable if s in self.connections]:
            self._read(self.connections[sock], sup_core, now - started)
        for sock in [s for s in writable if s in self.connections]:
            self._write(self.connections[sock])
        for sock, conn in list(self.connections.items()):
            if now - conn.opened > REQUEST_TIMEOUT:
                log.warning("control connection dropped: no complete request within %g s", REQUEST_TIMEOUT)
                self._close(sock)

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: the next round may do better
                log.warning("control connection not accepted: %s", exc)
                return
            sock.setblocking(False)
            if len(self.connections) >= MAX_CONNECTIONS:
                sock.close()
                continue
            conn = _Connection(sock, now)
            self.connections[sock] = conn
            try:
                uid = peer_uid(sock)
            except OSError:
                self._close(sock)
                continue
            if uid not in (0, os.geteuid()):
                conn.outbox = json.dumps({"error": "permission denied: not the launching user"}).encode()

    def _read(self, conn: _Connection, sup_core: Core, uptime: float) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        conn.inbox += chunk
        if chunk and not conn.inbox.endswith(b"\n") and len(conn.inbox) < MAX_REQUEST:
            return
        if not conn.inbox:
            self._close(conn.sock)  # a liveness probe: connect and close
            return
        try:
            figures = self.sessions.figures(self.router.slots) if self.sessions is not None else None
            reply = answer(json.loads(conn.inbox), self.router, sup_core, uptime, figures)
        except (OSError, ValueError, StickyError) as exc:  # never the supervisor's problem
            log.warning("control request failed: %s", exc)
            reply = {"error": f"bad request: {exc}"}
        conn.outbox = json.dumps(reply).encode()

    def _write(self, conn: _Connection) -> None:
        assert conn.outbox is not None
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn.sock)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self._close(conn.sock)

    def _close(self, sock: socket.socket) -> None:
        self.connections.pop(sock, None)
        sock.close()
