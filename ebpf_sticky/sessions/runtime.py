"""The session layer in a worker: between the slot's socket and uvicorn's protocol.

Each connection the worker accepts (or receives from another slot) starts with a ``Gate``: it
reads a PROXY protocol header when asked to, then the request head, and decides the owning slot.
Owned here: uvicorn's own protocol is created on the same transport and fed the bytes read so far;
from then on the gate only forwards, until the response is complete. Then it reads the next head
of a keep-alive connection the same way, so a request of another slot's session moves between
requests (a WebSocket upgrade is a request too: it moves before the upgrade). Owned elsewhere: the
connection's fd and the bytes read go to that slot's worker (``handoff``), which serves that one
request without deciding again, so two workers can never pass a connection back and forth.

Nothing is proxied: a connection is always served by exactly one process at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

from ..hashing import HashSpec, cbpf, native, parse_address
from . import handoff
from .http_head import MAX_HEAD, HeadError, RequestHead, parse_request_head
from .keys import MAX_LEARN_BODY, AddressKey, IdKey, KeyKind, KeySpec, TrustedProxies, extract_key, learn_key
from .ownership import SessionTable, hashed_slot, issue_id, issued_slot
from .prefilter import Creators, Markers, head_end
from .proxy_protocol import ProxyProtocolError, parse_proxy_header

log = logging.getLogger("ebpf_sticky.sessions")

Peer = tuple[str, int]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# The source addresses of this many accepted connections make one window of the top-source figure.
SOURCE_WINDOW = 256
MIRRORS = {"native": native.slot_of, "cbpf": cbpf.slot_of}


@dataclass
class Layer:
    """One worker's session state: its slot, key specs, the shared table and the handoff ends."""

    slot: int
    specs: tuple[KeySpec, ...]
    proxy_protocol: bool
    trusted: TrustedProxies  # --forwarded-allow-ips: the only peers whose PROXY header is believed
    table: SessionTable
    senders: list[socket.socket]
    receiver: socket.socket
    spec: HashSpec | None  # the routing key's spec, when address keys are in use
    mirror: Callable[[Any, HashSpec, int], int]
    markers: Markers
    creators: Creators
    make_inner: Callable[[], asyncio.Protocol] | None = None  # uvicorn's protocol, once started
    gates: dict[Peer, Gate] = field(default_factory=dict)
    backlog: dict[int, collections.deque[tuple[int, Peer | None, bytes]]] = field(default_factory=dict)
    sources: collections.Counter[str] = field(default_factory=collections.Counter)
    window: int = 0  # connections counted in ``sources``

    # -- deciding ----------------------------------------------------------------------------

    def owner_of_address(self, host: str) -> int | None:
        if self.spec is None:
            return None
        try:
            address = parse_address(host)
        except ValueError:
            return None
        return self.mirror(address, self.spec, self.table.slots)

    def owner(self, head: RequestHead, peer_host: str, address_owner: int | None) -> int | None:
        """The slot a request belongs to; None: where it landed (no key, or a key no one issued).

        The first spec (in the order given) that finds a key decides, as ``extract_key`` does; it
        is asked one spec at a time because the kind decides how the key maps to a slot.
        """
        for spec in self.specs:
            key = extract_key(head, (spec,), peer_host, self.trusted)
            if isinstance(key, AddressKey):
                return self.mirror(key.address, self.spec, self.table.slots) if self.spec else None
            if isinstance(key, IdKey):
                return self.owner_of_id(spec, key.value, address_owner)
        return address_owner

    def owner_of_id(self, spec: KeySpec, value: str, address_owner: int | None) -> int | None:
        if spec.kind is KeyKind.QUERY:
            # A client-chosen id (no response creates it): its own keyed hash picks the slot,
            # from the first request on, and nothing is stored.
            return hashed_slot(value, self.table.table_key, self.table.slots)
        slot = issued_slot(value, self.table.table_key)
        if slot is None:
            slot = self.table.lookup(value, int(time.monotonic()))
        if slot is None:
            self.table.count(self.slot, "unknown")
            return address_owner
        return slot

    def note_source(self, host: str) -> None:
        self.sources[host] += 1
        self.window += 1
        if self.window >= SOURCE_WINDOW:
            top = sum(count for _, count in self.sources.most_common(3))
            self.table.set_counter(self.slot, "connections", self.window)
            self.table.set_counter(self.slot, "top_source", top)
            self.sources.clear()
            self.window = 0

    # -- moving ------------------------------------------------------------------------------

    def move(self, slot: int, fd: int, client: Peer | None, data: bytes) -> None:
        """Queue the connection (our own dup of its fd, closed here once sent) for ``slot``."""
        queue = self.backlog.setdefault(slot, collections.deque())
        queue.append((fd, client, data))
        self.table.count(self.slot, "moved_out")
        if len(queue) == 1:
            self._flush(slot)

    def _flush(self, slot: int) -> None:
        queue, channel = self.backlog[slot], self.senders[slot]
        loop = asyncio.get_running_loop()
        while queue:
            fd, client, data = queue[0]
            try:
                handoff.send(channel, fd, client, data)
            except BlockingIOError:
                # The slot's queue is full (its worker is being replaced, or slow): wait for room.
                loop.add_writer(channel.fileno(), self._flush, slot)
                return
            except OSError as exc:
                log.warning("slot %d: handing a connection to slot %d failed: %s", self.slot, slot, exc)
            queue.popleft()
            os.close(fd)
        loop.remove_writer(channel.fileno())

    def start_receiving(self) -> None:
        asyncio.get_running_loop().add_reader(self.receiver.fileno(), self._receive)

    def stop_receiving(self) -> None:
        """On stop: what is still queued waits in the kernel for the slot's next worker."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.receiver.fileno())

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):  # a bounded batch: accepts and requests get their turn
            moved = handoff.receive(self.receiver)
            if moved is None:
                return
            self.table.count(self.slot, "moved_in")
            sock = socket.socket(fileno=moved.fd)
            sock.setblocking(False)
            gate = Gate(self, client=moved.client, prefix=moved.data, moved=True)
            loop.create_task(_adopt(loop, gate, sock))


async def _adopt(loop: asyncio.AbstractEventLoop, gate: Gate, sock: socket.socket) -> None:
    try:
        await loop.connect_accepted_socket(lambda: gate, sock)
    except OSError as exc:  # the client went away while the connection was queued
        log.debug("a moved connection was gone: %s", exc)
        sock.close()


class Gate(asyncio.Protocol):
    """A connection's protocol while the layer decides who serves it; then a thin forwarder."""

    def __init__(
        self, layer: Layer, client: Peer | None = None, prefix: bytes = b"", moved: bool = False
    ) -> None:
        self.layer = layer
        self.client = client  # the PROXY header's source, when one was read
        self.buffer = prefix
        self.moved = moved  # served here whatever its key says: it was decided once already
        self.inner: asyncio.Protocol | None = None
        self.busy = False  # a request is in uvicorn's hands: forward everything
        self.proxied = layer.proxy_protocol and not moved
        self.address_owner: int | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: Peer = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        # uvicorn's protocol exists from the start, as without the layer (it counts the connection
        # for graceful shutdown and limits, and costs the same now as later); it sees no byte
        # until the connection is known to be served here. Like uvicorn, no deadline for the
        # first request.
        assert self.layer.make_inner is not None
        self.inner = self.layer.make_inner()
        self.inner.connection_made(self.transport)
        peer = getattr(self.inner, "client", None) or transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else ("", 0)
        if self.proxied and self.peer[0] not in self.layer.trusted:
            # A PROXY header is believed only from --forwarded-allow-ips: anyone else could claim
            # any address. The connection is refused, not served with the wrong address.
            self.transport.abort()
            return
        self.layer.gates[self.peer] = self
        if self.moved:
            self.serve_here()
        elif not self.proxied:
            self.layer.note_source(self.peer[0])  # with PROXY headers, the client they name

    def data_received(self, data: bytes) -> None:
        if self.busy:
            assert self.inner is not None
            self.inner.data_received(data)
            return
        self.buffer += data
        self.decide()

    def decide(self) -> None:
        assert self.transport is not None
        try:
            if self.proxied:
                header = parse_proxy_header(self.buffer)
                if header is None:
                    return
                self.proxied = False
                self.buffer = self.buffer[header.length :]
                if header.source is not None:
                    self.client = header.source
                    self.address_owner = self.layer.owner_of_address(header.source[0])
                self.layer.note_source((self.client or self.peer)[0])
                if not self.layer.specs:
                    self.route(self.address_owner)
                    return
            end = head_end(self.buffer)
            if end < 0 and len(self.buffer) <= MAX_HEAD:
                return
            if end >= 0 and not self.layer.markers.may_carry_key(self.buffer[:end]):
                self.route(self.address_owner)  # no key in it: no parse
                return
            head = parse_request_head(self.buffer)
        except ProxyProtocolError:
            self.transport.abort()
            return
        except HeadError:
            self.serve_here()  # uvicorn answers a malformed request as it would alone
            return
        if head is not None:
            host = (self.client or self.peer)[0]
            self.route(self.layer.owner(head, host, self.address_owner))

    def route(self, owner: int | None) -> None:
        assert self.transport is not None
        layer = self.layer
        if (
            owner is None
            or owner == layer.slot
            or owner >= len(layer.senders)  # a slot added after this worker started
            or owner >= layer.table.slots  # a retired slot: nobody would read its queue
            or len(self.buffer) > handoff.MAX_PREFIX
            or self.transport.get_write_buffer_size()  # our last response is still going out
        ):
            self.serve_here()
            return
        sock = self.transport.get_extra_info("socket")
        fd = os.dup(sock.fileno())
        data, self.buffer = self.buffer, b""
        self.transport.pause_reading()
        layer.move(owner, fd, self.client, data)
        self.transport.close()  # closes our fd only: the connection lives on in the dup

    def serve_here(self) -> None:
        assert self.inner is not None
        self.busy = True
        data, self.buffer = self.buffer, b""
        if data:
            self.inner.data_received(data)

    def request_done(self) -> None:
        """The response went out in full: the next bytes start a request to decide afresh."""
        if self.busy and self.transport is not None and not self.transport.is_closing():
            self.busy = False
            self.moved = False

    # -- the rest is uvicorn's --------------------------------------------------------------------

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.layer.gates.get(self.peer) is self:
            del self.layer.gates[self.peer]
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def head_of(scope: Scope) -> RequestHead:
    """The request head uvicorn parsed, in the key module's terms (for learning from responses)."""
    target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])
    return RequestHead(scope.get("method", "GET"), target, headers, 0)


def wrap_app(app: ASGIApp, layer: Layer) -> ASGIApp:
    """Outermost ASGI layer: the PROXY client in ``scope["client"]`` (before uvicorn's proxy-headers
    middleware judges X-Forwarded-For by it), ids learnt from responses, and each response's end."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        gate = layer.gates.get((str(client[0]), int(client[1]))) if client else None
        if gate is None or scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        if gate.client is not None:
            scope["client"] = gate.client
        try:
            await app(scope, receive, _watching(scope, send, layer, gate))
        finally:
            # After an upgrade the WebSocket protocol owns the transport: the gate hears no
            # connection_lost, so it leaves the registry when the app is done with the socket.
            if scope["type"] == "websocket" and layer.gates.get(gate.peer) is gate:
                del layer.gates[gate.peer]

    return asgi


def _watching(scope: Scope, send: Send, layer: Layer, gate: Gate) -> Send:
    status, learning = 0, scope["type"] == "websocket" and layer.creators.engineio
    headers: tuple[tuple[str, str], ...] = ()

    async def watched(message: Any) -> None:
        nonlocal status, headers, learning
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
            raw = message.get("headers", ())
            learning = layer.creators.may_create(raw, scope.get("query_string", b""))
            if learning:
                headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw)
        elif learning and kind in ("http.response.body", "websocket.send"):
            learning = False
            body = message.get("body") or (message.get("text") or "").encode()
            value = learn_key(layer.specs, head_of(scope), status or 101, headers, body[:MAX_LEARN_BODY])
            if value is not None and issued_slot(value, layer.table.table_key) is None:
                layer.table.learn(value, layer.slot, int(time.monotonic()))
        await send(message)
        if kind == "http.response.body" and not message.get("more_body", False):
            gate.request_done()

    return watched


def issue_engineio_ids(slot: int, table_key: bytes) -> bool:
    """python-engineio's sids name their slot, so any worker routes them without a table.
    False when python-engineio is not installed (ids are then learnt from handshakes)."""
    try:
        from engineio import base_server
    except ImportError:
        return False

    def generate_id(self: object) -> str:
        return issue_id(slot, table_key, secrets.token_bytes(11))

    base_server.BaseServer.generate_id = generate_id
    return True
