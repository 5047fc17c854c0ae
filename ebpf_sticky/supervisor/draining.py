"""Close a stopping worker's keep-alive connections, so its clients come back through the slot's socket.

A stopping uvicorn worker stops accepting, but a client that keeps its connection alive sends its
next request on that connection, to the stopping worker, which serves it (and holds it, if it is a
long-poll) instead of letting the slot's next worker take it. These functions work on uvicorn's
``server_state.connections`` (its HTTP and WebSocket protocol objects) through the one method every
uvicorn protocol has for this, ``shutdown()``: a request in flight is answered with the connection
closed after it (``Connection: close`` with httptools, uvicorn's default), an idle keep-alive
connection is closed now, a WebSocket is closed with code 1012 (service restart).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def has_no_request_yet(connection: Any) -> bool:
    """An HTTP connection accepted a moment ago whose first request has not arrived (or been
    parsed) yet: uvicorn's ``cycle`` is None until then. WebSocket protocols have no ``cycle``."""
    return getattr(connection, "cycle", False) is None


def close_keep_alive(connections: Iterable[Any], *, just_accepted: bool) -> None:
    """Make every connection close after its current response.

    ``just_accepted=False`` spares connections that have not sent a request yet: uvicorn would
    close them as idle, resetting a request still on its way (a client connects, then writes).
    Call it again with True once they have had a moment to deliver it.
    """
    for connection in list(connections):  # shutdown() may remove it from the set
        if just_accepted or not has_no_request_yet(connection):
            connection.shutdown()
