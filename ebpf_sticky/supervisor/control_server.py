"""The master's end of the control socket: answers `status` and `route` from live state."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    from typing import assert_never
else:
    from typing_extensions import assert_never

from .._version import __version__
from ..control import alive, check_dir, control_dir, peer_uid, socket_name
from ..errors import ControlError, StickyError
from ..kernel.router import Router
from ..sessions.master import CONCENTRATION_WARNING, MasterSessions, SessionFigures
from .core import Snapshot
from .requests import MAX_REQUEST, BadRequest, Request, Route, Status, parse_request

log = logging.getLogger("ebpf_sticky")


def answer(
    request: Request,
    router: Router,
    snapshot: Snapshot,
    uptime: float,
    sessions: SessionFigures | None = None,
) -> dict[str, Any]:
    """The reply to one valid request; pure given the router's counters and the session figures."""
    match request:
        case Status():
            counters = router.counters()
            reply: dict[str, Any] = {
                "pid": os.getpid(),
                "bind": str(router.bind.with_port(router.port)),
                "protocol": "udp" if router.udp else "tcp",
                "loader": router.loader,
                "phase": snapshot.phase.value,
                "generation": snapshot.generation,
                "version": __version__,
                "upgrades_refused": snapshot.upgrades_refused,
                "upgrade_refusal": snapshot.upgrade_refusal,
                "uptime": round(uptime, 3),
                "failures": counters.failures,
                "slots": [
                    {"slot": slot, "pids": snapshot.pids(slot), "routed": counters.per_slot[slot]}
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
        case Route():
            rows = []
            for text, address in request.addresses:
                slot = router.slot_of(address, snapshot.slots)
                rows.append({"address": text, "slot": slot, "pids": snapshot.pids(slot)})
            return {"routes": rows, "loader": router.loader}
        case _:
            assert_never(request)


def reply_to(
    line: bytes, router: Router, snapshot: Snapshot, uptime: float, sessions: MasterSessions | None = None
) -> dict[str, Any]:
    try:
        request = parse_request(line)
        figures = (
            sessions.figures(router.slots, router.port)
            if sessions is not None and isinstance(request, Status)
            else None
        )
        return answer(request, router, snapshot, uptime, figures)
    except BadRequest as exc:
        return {"error": f"bad request: {exc}"}
    except (OSError, StickyError) as exc:  # reading the router's counters: never the supervisor's problem
        log.warning("control request failed: %s", exc)
        return {"error": f"request failed: {exc}"}


# A control connection gets this long to send its request and take its answer; it never holds
# the supervisor's loop meanwhile (every read and write is non-blocking).
REQUEST_TIMEOUT = 1.0
# At most this many open at once; a new one evicts the oldest, so clients that connect and stall
# cannot lock the others out (each costs a socket and at most MAX_REQUEST bytes until then).
MAX_CONNECTIONS = 32
# Clients that connect faster than the loop accepts (once a turn) wait here; once it is full a
# client's connect fails at once (EAGAIN on a unix socket), so leave room for a flood's burst.
CONTROL_BACKLOG = 256


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
        check_dir(directory, create=True)
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
            listener.listen(CONTROL_BACKLOG)
        except BaseException:
            listener.close()
            raise
        with cls.adopt(listener, path, router) as server:
            yield server

    @classmethod
    @contextlib.contextmanager
    def adopt(cls, listener: socket.socket, path: Path, router: Router) -> Iterator[ControlServer]:
        """Serve on a listener bound at ``path`` (ours, or the image's before an upgrade); at the
        end close it and remove the path."""
        server: ControlServer | None = None
        try:
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
        self, readable: list[Any], writable: list[Any], snapshot: Snapshot, started: float, now: float
    ) -> None:
        if self.listener in readable:
            try:
                self._accept(now)
            except Exception:  # one client's trouble must never end the supervisor's loop
                log.exception("control connection not accepted")
        for sock, conn in list(self.connections.items()):
            try:
                if sock in readable:
                    self._read(conn, snapshot, now - started)
                elif sock in writable:
                    self._write(conn)
            except Exception:  # likewise
                log.exception("control connection dropped: answering it failed")
                self._close(sock)
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
                self._close(next(iter(self.connections)))  # the oldest (dicts keep their order)
            conn = _Connection(sock, now)
            self.connections[sock] = conn
            try:
                uid = peer_uid(sock)
            except OSError:
                self._close(sock)
                continue
            if uid not in (0, os.geteuid()):
                conn.outbox = json.dumps({"error": "permission denied: not the launching user"}).encode()

    def _read(self, conn: _Connection, snapshot: Snapshot, uptime: float) -> None:
        try:
            chunk = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbox))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        conn.inbox += chunk
        line, newline, _ = conn.inbox.partition(b"\n")
        if chunk and not newline and len(conn.inbox) <= MAX_REQUEST:
            return  # more to come
        if not conn.inbox:
            self._close(conn.sock)  # a liveness probe: connect and close
            return
        conn.outbox = json.dumps(reply_to(line, self.router, snapshot, uptime, self.sessions)).encode()

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
