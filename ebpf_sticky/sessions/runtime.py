"""The session layer in a worker: between the slot's socket and uvicorn's protocol.

Each connection the worker accepts (or receives from another slot) is uvicorn's protocol with a
``Gate`` in front: it reads a PROXY protocol header when asked to, then the request head, and
decides the owning slot. Owned here: uvicorn is fed the bytes read so far, and everything else
goes straight to it until the response is complete. Then the gate reads the next head of a
keep-alive connection the same way, so a request of another slot's session moves between
requests (a WebSocket upgrade is a request too: it moves before the upgrade). Owned elsewhere: the
connection's fd and the bytes read go to that slot's worker (``handoff``), which serves that one
request without deciding again, so two workers can never pass a connection back and forth.

Nothing is proxied: a connection is always served by exactly one process at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..hashing import HashSpec, cbpf, native, parse_address
from . import handoff
from .http_head import HeadError, RequestHead, parse_request_head, parse_response_head
from .keys import (
    MAX_LEARN_BODY,
    AddressKey,
    IdKey,
    KeyKind,
    KeySpec,
    TrustedProxies,
    extract_key,
    field_reader,
    learn_key,
    reads_fields,
)
from .ownership import ID_CHARS, SessionTable, checked_slot, hashed_slot, issue_id, issued_slot
from .prefilter import Creators, HeadWatch, head_end, key_reader
from .proxy_protocol import ProxyProtocolError, parse_proxy_header

log = logging.getLogger("ebpf_sticky.sessions")

Peer = tuple[str, int]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
MIRRORS = {"native": native.slot_of, "cbpf": cbpf.slot_of}
# Seconds before a handoff refused for too many fds in flight (ETOOMANYREFS) is tried again.
RETRY_IN_FLIGHT = 0.01
# Addresses a worker remembers the answer for, per question: which slot a client's address hashes
# to, and whether a peer may send a PROXY header (each asked once per connection). A client opens
# many connections, a balancer has a few addresses, and each answer costs microseconds in Python.
ADDRESS_MEMO = 4096


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
    family: socket.AddressFamily  # the slot socket's: every connection handed over is of it
    spec: HashSpec | None  # the routing key's spec, when address keys are in use
    mirror: Callable[[Any, HashSpec, int], int]
    creators: Creators
    make_protocol: Callable[[], AdoptedGate] | None = None  # for handed-over connections, once installed
    spare: AdoptedGate | None = None  # the next handed-over connection's, made ahead (``prepare``)
    backlog: dict[int, collections.deque[tuple[int, Peer | None, bytes]]] = field(default_factory=dict)
    received: bytearray = field(default_factory=handoff.receive_buffer)
    # Moved connections from their datagram to their ``connection_made``: the client a PROXY
    # header named (if any) and the bytes read of them, kept here, not on the protocol instance.
    arriving: dict[AdoptedGate, tuple[Peer | None, bytes]] = field(default_factory=dict)
    # Derived from the specs once, for every request head: what it says of its key before any
    # parse (``key_reader``), the first spec's key read from a head's fields without a parse when
    # sure (``field_reader``), and whether finding one reads its fields (else its request line is
    # all that is parsed).
    read_key: Callable[[bytes, int, int], object] = field(init=False)
    read_field: Callable[[bytes], str | None] = field(init=False)
    reads_fields: bool = field(init=False)
    _address_slot: Callable[[str, int], int | None] = field(init=False, repr=False)
    # Whether ``trusted`` holds a peer, remembered (``ADDRESS_MEMO``).
    trusts: Callable[[str], bool] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.read_key = key_reader(self.specs)
        self.read_field = field_reader(self.specs)
        self.reads_fields = reads_fields(self.specs)
        self._address_slot = functools.lru_cache(maxsize=ADDRESS_MEMO)(self._hashed_address_slot)
        self.trusts = functools.lru_cache(maxsize=ADDRESS_MEMO)(self.trusted.__contains__)

    @property
    def issuing_slot(self) -> int:
        """This slot when a key read from a request line is one of our ids (Engine.IO's sid), else
        -1: a slot no id names, so that the gate's check of such keys never holds."""
        return self.slot if self.specs and self.specs[0].kind is KeyKind.ENGINEIO else -1

    # -- deciding ----------------------------------------------------------------------------

    def owner_of_address(self, host: str) -> int | None:
        """The slot the kernel's program picks for a client at ``host`` (None: no routing key, or
        not an address)."""
        if self.spec is None:
            return None
        return self._address_slot(host, self.table.slots)

    def _hashed_address_slot(self, host: str, slots: int) -> int | None:
        assert self.spec is not None
        try:
            address = parse_address(host)
        except ValueError:
            return None
        return self.mirror(address, self.spec, slots)

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

    def learn_from_head(self, head: bytes) -> None:
        """A response head the worker's server writes (httptools) with a creator's marks in it
        (``creators.in_head``): the id it creates, if any."""
        try:
            status, fields = parse_response_head(head)
        except HeadError:
            return
        self.remember(learn_key(self.specs, None, status, fields, b""))

    def remember(self, value: str | None) -> None:
        """An id a response of this worker created is this slot's (ids we issue name it already)."""
        if value is not None and issued_slot(value, self.table.table_key) is None:
            self.table.learn(value, self.slot, int(time.monotonic()))

    # -- moving ------------------------------------------------------------------------------

    def move(self, slot: int, fd: int, client: Peer | None, data: bytes) -> bool:
        """Hand the connection on ``fd`` (the caller's, which it closes if this is True) to
        ``slot``: at once, the datagram holding its own reference to the connection; or, while that
        slot cannot take it, a dup of it waits here, in order, until it can. False: not taken (the
        send failed, or this worker has no fd to spare to make it wait), the caller serves it."""
        queue = self.backlog.setdefault(slot, collections.deque())
        try:
            if queue or not self._send(slot, fd, client, data):
                queue.append((os.dup(fd), client, data))
        except OSError as exc:  # EMFILE from dup, or the send failed for good
            log.warning("slot %d: handing a connection to slot %d failed: %s", self.slot, slot, exc)
            return False
        self.table.count(self.slot, "moved_out")
        return True

    def _send(self, slot: int, fd: int, client: Peer | None, data: bytes) -> bool:
        """True when sent; False when the slot cannot take the connection yet (a retry of the
        queue is set up); OSError when it failed for good."""
        loop = asyncio.get_running_loop()
        try:
            handoff.send(self.senders[slot], fd, client, data)
        except BlockingIOError:
            # The slot's queue is full (its worker is being replaced, or slow): wait for room.
            loop.add_writer(self.senders[slot].fileno(), self._flush, slot)
            return False
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                raise
            # More fds of this user in flight in unix sockets' queues than our RLIMIT_NOFILE
            # (the kernel's limit; a stopped or replaced worker's queue holds them): the socket
            # stays writable, so try again in a moment instead.
            loop.call_later(RETRY_IN_FLIGHT, self._flush, slot)
            return False
        return True

    def _flush(self, slot: int) -> None:
        asyncio.get_running_loop().remove_writer(self.senders[slot].fileno())
        queue = self.backlog[slot]
        while queue:
            fd, client, data = queue[0]
            try:
                if not self._send(slot, fd, client, data):
                    return
            except OSError as exc:  # the client goes, as if its worker had died
                log.warning("slot %d: handing a connection to slot %d failed: %s", self.slot, slot, exc)
            queue.popleft()
            os.close(fd)

    def start_receiving(self) -> None:
        self.prepare()
        asyncio.get_running_loop().add_reader(self.receiver.fileno(), self._receive)

    def prepare(self) -> None:
        """The protocol of the next connection handed over, made while no request waits for it:
        making one (uvicorn's parser, what it reads of its config) on a moved request's path cost
        it about 12 µs of its latency."""
        if self.spare is None and self.make_protocol is not None:
            self.spare = self.make_protocol()

    def stop_receiving(self) -> None:
        """On stop: what is still queued waits in the kernel for the slot's next worker."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.receiver.fileno())

    def _receive(self) -> None:
        # One connection per call: the socket stays readable while more are queued, so each
        # waits one turn of the loop behind the last (accepts and requests get their turns), and
        # the last costs no empty read before it is served.
        moved = handoff.receive(self.receiver, self.received)
        if moved is None:
            return
        assert self.make_protocol is not None
        self.table.count(self.slot, "moved_in")
        # Family named, not detected (two getsockopt calls); the loop makes it non-blocking.
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, moved.fd)
        protocol, self.spare = self.spare or self.make_protocol(), None
        self.arriving[protocol] = (moved.client, moved.data)
        adopting = asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock)
        self._adopt(adopting, protocol, sock)

    def _adopt(
        self, adopting: Coroutine[Any, Any, object], protocol: AdoptedGate, sock: socket.socket
    ) -> None:
        """Drives ``connect_accepted_socket`` as a task would, without one: its first step (the
        transport made, ``connection_made`` called soon) runs now, not a turn of the loop later,
        and the rest when the future it awaits is done. A moved request is served that much
        sooner."""
        try:
            awaited = adopting.send(None)
        except StopIteration:
            return
        except (OSError, asyncio.CancelledError) as exc:  # the client went away while queued
            log.debug("a moved connection was gone: %s", exc)
            self.arriving.pop(protocol, None)
            sock.close()
            return
        awaited.add_done_callback(lambda _: self._adopt(adopting, protocol, sock))


class Gate(asyncio.Protocol):
    """Mixed in before uvicorn's HTTP protocol class (``gated``): each request head on the
    connection is seen here first, and reaches uvicorn only once it is known to be served here.

    While uvicorn serves a request (its ``cycle``, made as soon as it has the head), every byte goes
    straight to it; once the response is complete, and uvicorn holds nothing of another request
    (``between_requests``: a client that pipelines has its requests served where they are read),
    the next bytes start a head to decide afresh. Being uvicorn's protocol itself (not a wrapper in
    front of it), the layer adds no object to a connection and, on one served where it landed, one
    call per read that stores nothing: a connection's state lives in uvicorn's attributes and in
    class-level defaults, written only off the common path (attributes added to each uvicorn
    protocol instance made every connection measurably slower).
    """

    layer: Layer  # on the mixed class
    proxied: bool  # on the mixed class: a PROXY header comes first; per connection once read
    # On the mixed class, looked up without a frame of their own: the server protocol's
    # ``data_received`` (what the gate hands bytes to), ``layer.read_key``, the table key our ids
    # are checked under, and ``layer.issuing_slot``.
    feed: Callable[[bytes], None]
    read_key: Callable[[bytes, int, int], object]
    table_key: bytes
    issuing_slot: int
    # uvicorn's own attributes, used here: the connection, the scope's client, the request served.
    transport: asyncio.Transport
    client: Peer | None
    cycle: Any
    # Per connection, written only off the common path.
    held = b""  # the bytes of a head not decided yet
    # uvicorn's cycle when it was handed bytes it made no cycle of (a malformed head, which it
    # answers): until it starts another, bytes go straight through. By default no cycle at all:
    # nothing handed.
    handed: Any = NotImplemented
    proxy_client: Peer | None = None
    address_owner: int | None = None

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is not None:
            if cycle is self.handed or not cycle.response_complete or not self.between_requests():
                self.feed(data)  # a request in uvicorn's hands
                return
        elif self.handed is None:
            self.feed(data)  # handed to uvicorn before it had a cycle of it
            return
        if not self.held and not self.proxied and self.address_owner is None:
            # The common case in one step: a whole head in one read, routed by the connection's
            # own address, that carries no key, or an id this slot issued (every poll of a
            # session that began here), goes to uvicorn at once, which makes its cycle of it:
            # what ``decide_head`` and ``route`` would decide, without their frames (each one
            # costs a serving worker about a microsecond). This runs for every request. Any
            # other is decided from this read alone: nothing is written on the connection (an
            # attribute added to uvicorn's protocol instance costs each request that has it
            # several microseconds in a serving worker).
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                key = self.read_key(data, 0, end)
                if not key or (
                    isinstance(key, str)
                    and len(key) == ID_CHARS
                    and checked_slot(key, self.table_key) == self.issuing_slot
                ):
                    self.feed(data)
                else:
                    self.decide_head(data, key)
                return
        self.held += data
        self.decide()

    def decide(self) -> None:
        """What ``held`` says once it holds a whole head (after a PROXY header, if one comes)."""
        if self.proxied:
            try:
                header = parse_proxy_header(self.held)
            except ProxyProtocolError:
                self.transport.abort()
                return
            if header is None:
                return
            self.proxied = False
            rest = self.release()[header.length :]
            layer = self.layer
            if header.source is not None:
                # The scope's client from now on: uvicorn's proxy-headers middleware judges
                # X-Forwarded-For by it, and its access log names it.
                self.client = self.proxy_client = header.source
                owner = layer.owner_of_address(header.source[0])
                if owner != layer.slot:
                    # Only a connection that belongs elsewhere keeps its owner: one on its
                    # client's own slot takes the common path, like a direct client's.
                    self.address_owner = owner
            if not layer.specs:
                self.route(self.address_owner, rest)
            elif rest:
                self.data_received(rest)  # the client's own first bytes, as if just read
            return
        try:
            end = head_end(self.held)
            if end < 0:
                # Bytes that cannot start a request (TLS, noise) are uvicorn's to refuse now (the
                # parse raises HeadError for them), not held until MAX_HEAD arrives.
                parse_request_head(self.held)
                return
        except HeadError:
            self.serve_here(self.release())  # uvicorn answers a malformed request as it would alone
            return
        key = self.read_key(self.held, 0, end)
        if key:
            self.decide_head(self.release(), key)
        else:
            self.route(self.address_owner, self.release())  # no key in it: no parse

    def decide_head(self, data: bytes, key: object) -> None:
        """``data`` starts with a whole head that may carry a key (``read_key`` said ``key`` of
        it): served by its owner."""
        layer = self.layer
        value = key if isinstance(key, str) else layer.read_field(data)
        if value is not None:  # the parse would find it: the first spec's, which decides
            self.route(layer.owner_of_id(layer.specs[0], value, self.address_owner), data)
            return
        try:
            head = parse_request_head(data, layer.reads_fields)
        except HeadError:
            self.serve_here(data)  # uvicorn answers a malformed request as it would alone
            return
        if head is None:  # blank lines before the request line ended the search early
            self.held = data
            return
        self.route(layer.owner(head, self.client[0] if self.client else "", self.address_owner), data)

    def release(self) -> bytes:
        data, self.held = self.held, b""
        return data

    def route(self, owner: int | None, data: bytes) -> None:
        layer = self.layer
        cycle = self.cycle
        if cycle is not None and cycle.transport is not self.transport:
            # httptools' joined writes (``accepting._HeadWithBody``) hold a response head for its
            # body until the loop's turn ends; a HEAD response has none: its head goes now, so that
            # the write buffer below tells whether the last response is out.
            cycle.transport.flush()
        if (
            owner is None
            or owner == layer.slot
            or owner >= len(layer.senders)  # a slot added after this worker started
            or owner >= layer.table.slots  # a retired slot: nobody would read its queue
            or len(data) > handoff.MAX_PREFIX
            or self.transport.get_write_buffer_size()  # our last response is still going out
        ):
            self.serve_here(data)
            return
        fd = self.transport.get_extra_info("socket").fileno()
        if not layer.move(owner, fd, self.proxy_client, data):
            self.serve_here(data)
            return
        # Closes our fd only, and stops reading it in the same turn of the loop: the connection
        # lives on in the datagram (or the queued dup).
        self.transport.close()

    def serve_here(self, data: bytes) -> None:
        cycle = self.cycle
        if data:
            self.feed(data)
        if self.cycle is cycle:
            self.handed = cycle  # uvicorn made no cycle of them

    def between_requests(self) -> bool:
        """Once a response is complete: whether the server has nothing of the connection's next
        request yet, so that its next bytes start a head. Which server protocol is mixed in decides
        (``gated``); any other (zttp, a class of one's own): assumed."""
        return True


def _httptools_between_requests(self: Any) -> bool:
    # A pipelined head that httptools has begun to parse has a scope of its own (uvicorn makes one
    # in on_message_begin); a body still arriving after an early response leaves ``more_body`` set
    # (uvicorn clears it only while the response is incomplete): the request after such a body is
    # served here, whatever its key.
    cycle = self.cycle
    return self.scope is cycle.scope and not cycle.more_body


def _h11_between_requests(self: Any) -> bool:
    # h11 starts the next cycle once both sides are done; bytes it holds are a head begun.
    conn = self.conn
    return conn.their_state is h11.IDLE and not conn.trailing_data[0]


class ProxiedGate(Gate):
    """The gate when every connection starts with a PROXY header."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # uvicorn's: sets the scope's client (the peer)
        if not self.client or not self.layer.trusts(self.client[0]):
            # A PROXY header is believed only from --forwarded-allow-ips: anyone else could claim
            # any address. The connection is refused, not served with the wrong address.
            self.transport.abort()


class AdoptedGate(Gate):
    """The gate of a connection handed over by another slot: its first request was decided there
    and is served here, whatever its key says; later ones on it are decided afresh."""

    proxied = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn's protocol sets the scope's client; like uvicorn, no deadline for the first request.
        super().connection_made(transport)
        client, data = self.layer.arriving.pop(self)
        if client is not None:
            self.client = self.proxy_client = client
        self.serve_here(data)
        # After the app's first step (a task uvicorn has just scheduled, which may answer at once).
        asyncio.get_running_loop().call_soon(self.layer.prepare)


def gated(
    base: type[asyncio.Protocol], layer: Layer
) -> tuple[Callable[..., Gate], Callable[..., AdoptedGate]]:
    """uvicorn's HTTP protocol class (httptools' or h11's) with the gate in front of it: for the
    connections this worker accepts, and for those other slots hand it."""
    attributes: dict[str, Any] = {
        "layer": layer,
        "feed": base.data_received,
        "read_key": staticmethod(layer.read_key),
        "table_key": layer.table.table_key,
        "issuing_slot": layer.issuing_slot,
    }
    if hasattr(base, "on_headers_complete"):  # httptools' parser callbacks (as in ``accepting``)
        attributes["between_requests"] = _httptools_between_requests
    elif issubclass(base, H11Protocol):
        attributes["between_requests"] = _h11_between_requests
    if layer.creators.any and not layer.creators.engineio and hasattr(base, "response_head"):
        # Else ``learning_app`` learns.
        attributes["response_head"] = HeadWatch(layer.creators.in_head, layer.learn_from_head)
    accepted = type(
        f"Gated{base.__name__}",
        (ProxiedGate if layer.proxy_protocol else Gate, base),
        {**attributes, "proxied": layer.proxy_protocol},
    )
    adopted = type(f"Adopted{base.__name__}", (AdoptedGate, base), attributes)
    return cast(Callable[..., Gate], accepted), cast(Callable[..., AdoptedGate], adopted)


def head_of(scope: Scope) -> RequestHead:
    """The request head uvicorn parsed, in the key module's terms (for learning from responses)."""
    target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])
    return RequestHead(scope.get("method", "GET"), target, headers, 0)


def learning_app(app: ASGIApp, layer: Layer) -> ASGIApp:
    """Outermost ASGI layer, only when responses may create keys: ids learnt from them."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        await app(scope, receive, _watching(scope, send, layer))

    return asgi


def _watching(scope: Scope, send: Send, layer: Layer) -> Send:
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
            body = body[:MAX_LEARN_BODY]
            layer.remember(learn_key(layer.specs, head_of(scope), status or 101, headers, body))
        await send(message)

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
