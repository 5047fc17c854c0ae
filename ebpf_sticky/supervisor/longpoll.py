"""Release the Engine.IO (Socket.IO) sessions a stopping worker holds, with no help from the app.

Every long-polling Engine.IO client has a GET pending on its worker for up to pingInterval (25 s):
a stop that waits for requests in flight waits that long. Releasing a session answers its pending
GET with a NOOP, so the client sends its next request at once (on a new connection: the worker
closes keep-alive connections first), and forgets the session without an Engine.IO CLOSE, which
would tell python-socketio clients not to reconnect. The next request reaches the slot's socket;
on HUP the slot's new worker answers "unknown session" and the client reconnects there. The
session's ``disconnect`` handlers run, as for any session that ends.

The servers are found by walking the ASGI app: python-engineio's and python-socketio's ``ASGIApp``
keep theirs in ``engineio_server`` (a python-socketio server keeps its Engine.IO server in
``eio``), middleware keeps the app it wraps in ``app``, Starlette/FastAPI mounts in ``routes``.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

# Where ASGI wrappers keep what they wrap: engineio/socketio ASGIApp (engineio_server, the app it
# falls back to), python-socketio's server (eio), middleware and uvicorn's own wrappers (app).
_INNER = ("engineio_server", "eio", "other_asgi_app", "app")
_DEPTH = 16  # a middleware stack deeper than this is not an app anyone wrote


def engineio_servers(app: Any) -> list[Any]:
    """Every python-engineio ``AsyncServer`` reachable from ``app`` (none unless engineio is loaded:
    an app that uses it has imported it by the time it is served)."""
    engineio = sys.modules.get("engineio")
    if engineio is None:
        return []
    found: list[Any] = []
    for item in _reachable(app):
        if isinstance(item, engineio.AsyncServer) and item not in found:
            found.append(item)
    return found


def _reachable(app: Any) -> Iterator[Any]:
    seen: set[int] = set()
    todo = [(app, 0)]
    while todo:
        item, depth = todo.pop()
        if id(item) in seen or depth > _DEPTH:
            continue
        seen.add(id(item))
        yield item
        inner = [getattr(item, name, None) for name in _INNER]
        inner += [getattr(route, "app", None) for route in _routes(item)]
        todo += [(i, depth + 1) for i in inner if i is not None]


def _routes(item: Any) -> list[Any]:
    routes = getattr(item, "routes", None)
    return list(routes) if isinstance(routes, list) else []


def releasers(app: Any, *, first: bool) -> list[Callable[[], Awaitable[None]]]:
    """One stop hook per Engine.IO server in ``app``; the ``first`` ones also stop its background
    task (python-engineio asks for that before a stop; its ``shutdown`` cannot run twice)."""
    return [partial(_release, server, first) for server in engineio_servers(app)]


async def _release(server: Any, first: bool) -> None:
    await release_sessions(server)
    if first:
        await server.shutdown()


async def release_sessions(server: Any) -> None:
    """Answer each session's pending long-poll with a NOOP, then forget the session.

    Every NOOP goes out before any session ends: ending one runs the app's ``disconnect`` handlers,
    which may take a while. Safe to call again: sessions that began meanwhile are released, the
    others are gone already.
    """
    from engineio import packet

    sockets = [socket for socket in server.sockets.values() if not (socket.closed or socket.closing)]
    for socket in sockets:
        await socket.send(packet.Packet(packet.NOOP))
    for socket in sockets:
        await socket.close(wait=False, abort=True)
