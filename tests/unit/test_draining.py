"""Which connections a stopping worker tells to close, and when."""

from __future__ import annotations

from typing import Any

from ebpf_sticky.supervisor.draining import close_keep_alive


class Connection:
    """What uvicorn's protocols offer here: ``shutdown()``, and ``cycle`` on HTTP ones."""

    def __init__(self, connections: set[Any], **cycle: Any) -> None:
        self.__dict__.update(cycle)
        self.connections = connections
        self.told = False
        connections.add(self)

    def shutdown(self) -> None:
        self.told = True
        self.connections.discard(self)  # as a closed connection leaves uvicorn's set


def test_just_accepted_connections_get_their_moment_then_close() -> None:
    connections: set[Any] = set()
    fresh = Connection(connections, cycle=None)
    busy = Connection(connections, cycle=object())
    websocket = Connection(connections)
    close_keep_alive(connections, just_accepted=False)
    assert (fresh.told, busy.told, websocket.told) == (False, True, True)
    assert connections == {fresh}
    close_keep_alive(connections, just_accepted=True)
    assert fresh.told and not connections
