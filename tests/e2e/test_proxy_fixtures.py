"""The proxy fixtures themselves, against a plain Python backend: what really arrives behind them.

HAProxy must put a PROXY header naming the client before its bytes; the nginx replicas must reach
the backend from their own source addresses over a few reused keep-alive connections (the
situation that defeats address hashing), pass WebSocket upgrades, and report the client in
X-Forwarded-For.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from support.launcher import wait_for
from support.proxies import HAPROXY_SOURCE, NGINX_SOURCES, Front, haproxy_send_proxy, nginx_replicas

from ebpf_sticky.hashing import parse_address
from ebpf_sticky.sessions.http_head import header, is_upgrade, parse_request_head
from ebpf_sticky.sessions.proxy_protocol import ProxyHeader, parse_proxy_header

CLIENTS = [f"127.0.30.{i}" for i in range(1, 6)]
TIMEOUT = 10.0
T = TypeVar("T")


@dataclass
class Seen:
    """What the backend saw: one entry per connection, one per request."""

    connections: list[tuple[str, ProxyHeader | None]] = field(default_factory=list)
    requests: list[dict[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def read_until(conn: socket.socket, buffer: bytes, parse: Callable[[bytes], T | None]) -> tuple[T, bytes]:
    """Read until ``parse(buffer)`` gives a value; that value and the whole buffer."""
    while (value := parse(buffer)) is None:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed before a complete header")
        buffer += chunk
    return value, buffer


class Backend(socketserver.ThreadingTCPServer):
    """HTTP/1.1 with keep-alive, optionally behind a PROXY header; answers who it saw as JSON.

    An upgrade request is answered 101 and then echoed byte for byte.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy_protocol: bool) -> None:
        self.proxy_protocol = proxy_protocol
        self.seen = Seen()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(socketserver.BaseRequestHandler):
    server: Backend

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(TIMEOUT)
        peer = str(parse_address(self.client_address[0]))
        buffer, proxy = b"", None
        with self.server.seen.lock:
            index = len(self.server.seen.connections)
        try:
            if self.server.proxy_protocol:
                proxy, buffer = read_until(conn, buffer, parse_proxy_header)
                buffer = buffer[proxy.length :]
            with self.server.seen.lock:
                self.server.seen.connections.append((peer, proxy))
            # Until the peer closes (or idles past TIMEOUT): keep-alive, as nginx's pool expects.
            while True:
                buffer = self._serve_one(conn, buffer, peer, index)
        except (ConnectionError, TimeoutError):
            pass

    def _serve_one(self, conn: socket.socket, buffer: bytes, peer: str, index: int) -> bytes:
        head, buffer = read_until(conn, buffer, parse_request_head)
        buffer = buffer[head.length :]
        answer = {
            "peer": peer,
            "connection": index,
            "xff": header(head, "x-forwarded-for"),
            "target": head.target,
        }
        with self.server.seen.lock:
            self.server.seen.requests.append(answer)
        if is_upgrade(head):
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            )
            conn.sendall(buffer)
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
            raise ConnectionError("upgraded connection closed")
        body = json.dumps(answer).encode()
        # As uvicorn does: a request asking to close gets its answer, then the connection ends.
        close = (header(head, "connection") or "").lower() == "close"
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), b"Connection: close\r\n" if close else b"", body)
        )
        if close:
            raise ConnectionError("closed on request")
        return buffer


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    server = Backend(proxy_protocol=getattr(request, "param", False))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)


def http_get(front: Front, source: str, target: str = "/") -> dict[str, object]:
    """One request on a fresh connection from ``source``, as a browser behind its own address."""
    with socket.create_connection((front.host, front.port), TIMEOUT, source_address=(source, 0)) as conn:
        conn.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {front.host}:{front.port}\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    status, _, body = response.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), response[:200]
    answer: dict[str, object] = json.loads(body)
    return answer


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("backend", [True], indirect=True)
def test_haproxy_sends_the_client_in_a_proxy_header(backend: Backend, version: int) -> None:
    with haproxy_send_proxy(backend.port, version=version) as front:
        clients = []
        for source in CLIENTS:
            with socket.create_connection(
                (front.host, front.port), TIMEOUT, source_address=(source, 0)
            ) as conn:
                clients.append((source, conn.getsockname()[1]))
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = conn.recv(65536)
                assert reply.startswith(b"HTTP/1.1 200"), reply
    seen = backend.seen.connections
    assert [peer for peer, _ in seen] == [HAPROXY_SOURCE] * len(CLIENTS)
    assert [(h.source if h else None) for _, h in seen] == clients
    assert {(h.destination if h else None) for _, h in seen} == {("127.0.0.1", front.port)}


@pytest.mark.parametrize("backend", [True], indirect=True)
def test_haproxy_health_checks_send_a_local_header(backend: Backend) -> None:
    def checked() -> bool:
        with backend.seen.lock:
            return any(proxy is not None and proxy.source is None for _, proxy in backend.seen.connections)

    with haproxy_send_proxy(backend.port, health_checks=True):
        wait_for(checked, TIMEOUT, "a health check with a LOCAL header")
    local = [proxy for _, proxy in backend.seen.connections if proxy is not None and proxy.source is None]
    assert all(proxy.destination is None for proxy in local)


def test_nginx_replicas_share_keepalive_connections_from_their_own_addresses(backend: Backend) -> None:
    with nginx_replicas(backend.port) as fronts:
        answers = [
            (fronts[i % 2], source, http_get(fronts[i % 2], source)) for i in range(4) for source in CLIENTS
        ]
    for front, source, answer in answers:
        assert answer["peer"] == front.source
        assert answer["xff"] == source
    # Twenty client connections, one request each, arrived over one upstream connection per replica:
    # one session's requests come from both replicas' addresses, over connections shared with others.
    connections = {(answer["peer"], answer["connection"]) for _, _, answer in answers}
    assert {peer for peer, _ in connections} == set(NGINX_SOURCES)
    assert len(connections) == len(NGINX_SOURCES)
    assert all(proxy is None for _, proxy in backend.seen.connections)


def test_nginx_passes_websocket_upgrades(backend: Backend) -> None:
    with (
        nginx_replicas(backend.port) as fronts,
        socket.create_connection(
            (fronts[1].host, fronts[1].port), TIMEOUT, source_address=(CLIENTS[0], 0)
        ) as conn,
    ):
        conn.sendall(
            b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        _, buffer = read_until(conn, b"", lambda b: b"\r\n\r\n" in b or None)
        assert buffer.startswith(b"HTTP/1.1 101"), buffer
        conn.sendall(b"echo me")
        read_until(conn, buffer.partition(b"\r\n\r\n")[2], lambda b: b"echo me" in b or None)
    upgrade = backend.seen.requests[-1]
    assert upgrade["peer"] == fronts[1].source and upgrade["xff"] == CLIENTS[0]
