"""Each connection's ``scope["server"]`` and ``scope["client"]`` are what uvicorn gives, now that
the worker reads them from the event loop rather than asking the socket: for a specific address,
a wildcard reached on another one, a dual-stack wildcard reached over IPv4, IPv6, forwarded
headers; under uvloop + httptools and asyncio + h11. And the protocol the worker installs starts
each connection exactly as uvicorn's does."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from support.launcher import KEY, launched
from uvicorn.protocols.utils import get_local_addr, get_remote_addr
from uvicorn.server import ServerState

from ebpf_sticky.supervisor.accepting import READ_SIZE, accepting

STACKS = {
    "uvloop+httptools": ["--loop", "uvloop", "--http", "httptools"],
    "asyncio+h11": ["--loop", "asyncio", "--http", "h11"],
}
BASE = ["scope_app.py", "-w", "1", "--hash-key", KEY, "--no-access-log", "--graceful-timeout", "2"]
# (bind, address the client connects to, the client's source address)
BINDS = {
    "specific": ("127.0.0.1:0", "127.0.0.1", "127.0.0.5"),
    "wildcard": ("0.0.0.0:0", "127.0.0.2", "127.0.0.5"),
    "dual-stack": ("[::]:0", "127.0.0.2", "127.0.0.5"),
    "ipv6": ("[::1]:0", "::1", "::1"),
}


def scope_of(
    host: str, port: int, source: str, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the scope's addresses, what uvicorn makes of the accepted socket's: its getsockname and
    getpeername are the client socket's getpeername and getsockname)."""
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        conn.connect()
        assert conn.sock is not None
        expected = {"server": list(conn.sock.getpeername()[:2]), "client": list(conn.sock.getsockname()[:2])}
        conn.request("GET", "/", headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200, response.status
        got: dict[str, Any] = json.loads(response.read())
        return got, expected
    finally:
        conn.close()


def v4_mapped(address: str) -> str:
    return f"::ffff:{address}"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("bind", BINDS)
def test_scope_addresses_are_uvicorns(stack: str, bind: str) -> None:
    address, host, source = BINDS[bind]
    args = [*BASE, "--bind", address, *STACKS[stack]]
    with launched(args) as instance:
        for _ in range(3):  # several connections: the answers must not be the first one's
            got, expected = scope_of(host, instance.port, source)
            if bind == "dual-stack":  # an IPv6 socket says an IPv4 peer's address as mapped
                expected = {k: [v4_mapped(v[0]), v[1]] for k, v in expected.items()}
            assert got == expected
    if bind in ("wildcard", "dual-stack"):
        assert got["server"][0].endswith("127.0.0.2"), got  # the address reached, never the bind's


@pytest.mark.parametrize("stack", STACKS)
def test_forwarded_client_as_uvicorn_makes_it(stack: str) -> None:
    args = [*BASE, "--bind", "127.0.0.1:0", "--forwarded-allow-ips", "127.0.0.5", *STACKS[stack]]
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    with launched(args) as instance:
        got, expected = scope_of("127.0.0.1", instance.port, "127.0.0.5", forwarded)
        assert got == {"server": expected["server"], "client": ["203.0.113.7", 0]}
        # From a peer not trusted, the headers are not believed: the socket's client stays.
        got, expected = scope_of("127.0.0.1", instance.port, "127.0.0.6", forwarded)
        assert got == expected


@pytest.mark.parametrize("stack", STACKS)
def test_responses_on_one_connection(stack: str) -> None:
    """HEAD (a head and no body), then GETs on the same keep-alive connection, in order."""
    with launched([*BASE, "--bind", "127.0.0.1:0", *STACKS[stack]]) as instance:
        conn = http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10)
        try:
            conn.request("HEAD", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"")
            for _ in range(3):
                conn.request("GET", "/")
                response = conn.getresponse()
                assert response.status == 200
                assert json.loads(response.read())["client"][0] == "127.0.0.1"
        finally:
            conn.close()


@pytest.mark.parametrize("stack", STACKS)
def test_streamed_head_is_sent_before_the_body(stack: str) -> None:
    """A response whose body is a minute away has its head at the client long before."""
    with launched([*BASE, "--bind", "127.0.0.1:0", *STACKS[stack]]) as instance:
        with socket.create_connection(("127.0.0.1", instance.port), timeout=20) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)  # socket.timeout fails the test: the head was held
                assert chunk, head
                head += chunk
        assert head.startswith(b"HTTP/1.1 200 "), head


def _protocol_classes() -> list[Any]:
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return [H11Protocol, HttpToolsProtocol]


def _loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("base", _protocol_classes(), ids=lambda c: c.__name__)
def test_start_is_uvicorns(loop_name: str, base: Any) -> None:
    """On a real accepted connection, the installed protocol holds after ``connection_made`` the
    same attributes as uvicorn's own, with the addresses uvicorn's functions read off the socket;
    under asyncio its reads are smaller."""

    async def started(protocol_class: Any, listener: socket.socket) -> dict[str, Any]:
        config = uvicorn.Config(lambda *_: None, lifespan="off")
        config.load()
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_accepted_socket(
            lambda: protocol_class(config=config, server_state=ServerState(), app_state={}), accepted
        )
        try:
            attributes = {**vars(protocol), "transport.max_size": getattr(transport, "max_size", None)}
            assert protocol.server == get_local_addr(transport)
            assert protocol.client == get_remote_addr(transport) == client.getsockname()[:2]
            assert protocol.loop is loop
            return attributes
        finally:
            transport.close()
            client.close()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        loop = _loops()[loop_name]()
        try:
            theirs = loop.run_until_complete(started(base, listener))
            ours = loop.run_until_complete(started(accepting(base), listener))
        finally:
            loop.close()
    # The same attributes, each of the same type: one that uvicorn's start sets and ours left as
    # __init__ made it (None, mostly) shows.
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in theirs.items()}
    assert ours["scheme"] == theirs["scheme"] == "http"
    if loop_name == "asyncio":  # asyncio's 256 KiB reads are mapped and unmapped, each one
        assert (theirs["transport.max_size"], ours["transport.max_size"]) == (256 * 1024, READ_SIZE)
