"""A cheaper path for each connection a worker accepts: uvicorn's own HTTP protocol, with the
connection's addresses read from what the event loop already knows, and (httptools) a response's
head sent with its body.

uvicorn's ``connection_made`` asks the transport's socket for the local and the peer address
(``get_local_addr``/``get_remote_addr`` in ``uvicorn/protocols/utils.py``). Both event loops have
read them already, when they made the transport (uvloop's ``TCPTransport._call_connection_made``,
asyncio's ``_SelectorTransport.__init__``), and keep them as its ``sockname``/``peername``: under
uvloop, uvicorn's questions cost five more syscalls per connection (the socket object is built
from the fd, with a getsockname, then rebuilt for each question, with another), under asyncio two.
The kept answers cost none and are the same values: the accepted socket's own addresses, so a
wildcard or dual-stack bind still gives the address each client reached.

The protocol's ``__init__`` asks asyncio for the running loop too, which on Python 3.11 costs a
getpid(2) per connection (it checks for a fork); the worker runs one loop for its life. Under
asyncio, each read also maps and unmaps its buffer (see ``READ_SIZE``). And uvicorn writes a
response's head on its own, then its body: two syscalls and two TCP segments (``_HeadWithBody``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

if TYPE_CHECKING:
    from ..sessions.prefilter import HeadWatch

__all__ = ["accepting", "install"]

# asyncio's socket transport reads with recv(max_size), 256 KiB: above glibc's mmap threshold
# (128 KiB), so every read maps a buffer, shrinks it to the bytes received and unmaps it later,
# three syscalls per read. A 64 KiB buffer comes from the heap. (uvloop reads into one buffer of
# its own.)
READ_SIZE = 64 * 1024


def _address(info: object) -> tuple[str, int] | None:
    """(host, port) of a kept sockname/peername, as uvicorn makes it from the socket's; None when
    it is not a plain IP address (a path, or an IPv6 scope id, which Python spells into the host
    and uvloop does not): uvicorn's own reading then."""
    if isinstance(info, tuple) and (len(info) == 2 or (len(info) == 4 and info[3] == 0)):
        return (str(info[0]), int(info[1]))
    return None


class _HeadWithBody:
    """The transport a response cycle writes to: the response head, which uvicorn writes on its
    own at ``http.response.start``, waits for the body's first write so that both leave in one
    writev (one syscall, one TCP segment); or for the end of the loop's turn, so that a streamed
    response still starts at once. A ``watch``, if any, looks at the response head as it passes.
    One per request: after its head, every write is body, whatever its bytes."""

    __slots__ = ("_head", "_loop", "_started", "_transport", "_watch")

    def __init__(
        self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, watch: HeadWatch | None
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._watch = watch
        self._head: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.writelines((head, data))
        elif not self._started and data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._head, self._started = data, True  # "100 Continue" goes at once: the client waits
            self._loop.call_soon(self.flush)
            watch = self._watch
            if watch is not None:
                for mark in watch.marks:
                    if mark in data:
                        watch.seen(data)
                        break
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


def _mirrored() -> tuple[type, ...]:
    """uvicorn's protocols whose ``connection_made`` ``accepting`` repeats line for line."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed
        return (H11Protocol,)
    return (H11Protocol, HttpToolsProtocol)


def accepting(protocol_class: Any) -> Any:
    """``protocol_class`` with the cheaper start, if it is one of uvicorn's whose start this
    repeats; any other (``--http`` naming a class of one's own) is returned as it is."""
    if protocol_class not in _mirrored():
        return protocol_class
    loops: list[asyncio.AbstractEventLoop] = []

    class Accepting(protocol_class):  # type: ignore[misc]
        def __init__(
            self,
            config: Any,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            if _loop is None:
                if not loops or loops[0].is_closed():
                    loops[:] = [asyncio.get_running_loop()]
                _loop = loops[0]
            super().__init__(config, server_state, app_state, _loop)

        def connection_made(self, transport: asyncio.Transport) -> None:
            # uvicorn's connection_made (h11_impl and httptools_impl alike), but the addresses.
            self.connections.add(self)
            self.transport = transport
            self.flow = FlowControl(transport)
            self.server = _address(transport.get_extra_info("sockname")) or get_local_addr(transport)
            self.client = _address(transport.get_extra_info("peername")) or get_remote_addr(transport)
            self.scheme = "https" if is_ssl(transport) else "http"
            if getattr(transport, "max_size", 0) > READ_SIZE:
                transport.max_size = READ_SIZE  # type: ignore[attr-defined]
            if self.logger.level <= TRACE_LOG_LEVEL:
                prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
                self.logger.log(TRACE_LOG_LEVEL, "%sHTTP connection made", prefix)

    Accepting.__name__ = Accepting.__qualname__ = f"Accepting{protocol_class.__name__}"
    return _joined_writes(Accepting) if hasattr(protocol_class, "on_headers_complete") else Accepting


def _joined_writes(protocol_class: Any) -> Any:
    """httptools' protocol, whose response cycles (made in ``on_headers_complete``) write the head
    and the body together (``_HeadWithBody``), and show their heads to ``response_head`` when a
    subclass sets it (the session layer learns ids from them: no ASGI layer, and no Python call
    for a head without the marks)."""

    class Joined(protocol_class):  # type: ignore[misc]
        transport: Any  # set in connection_made (an annotation only, for mypy)
        response_head: HeadWatch | None = None

        def on_headers_complete(self) -> None:
            transport = self.transport
            # What the new cycle is given as its transport.
            self.transport = _HeadWithBody(transport, self.loop, self.response_head)
            try:
                super().on_headers_complete()
            finally:
                self.transport = transport

    Joined.__name__ = Joined.__qualname__ = protocol_class.__name__
    return Joined


def install(config: Any) -> None:
    """Before the server starts: every connection's protocol is the cheaper one."""
    if not config.loaded:
        config.load()
    config.http_protocol_class = accepting(config.http_protocol_class)
