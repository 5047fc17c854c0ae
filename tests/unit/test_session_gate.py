"""The gate's own decisions, on protocol instances fed bytes without a connection.

Whether it reads a connection's next bytes as a new head: the gate decides a request only once
the server protocol holds nothing of it; what "holds" means is the protocol's own (uvicorn's
httptools scope and body flag, h11's state and buffer), and any other protocol keeps the plain
answer. The states are the parsers' own, reached by feeding them bytes. And its one step for the
common heads agrees with the whole decision. The behaviour over real connections is in
tests/e2e/test_sessions.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import h11
import pytest
import uvicorn
from hypothesis import given
from hypothesis import strategies as st
from support.sio_clients import wait_async
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from ebpf_sticky.hashing import HashSpec, parse_address
from ebpf_sticky.sessions import handoff
from ebpf_sticky.sessions.http_head import parse_request_head
from ebpf_sticky.sessions.keys import KeySpec, parse_key_spec, parse_trusted
from ebpf_sticky.sessions.ownership import SessionTable, issue_id, table_size
from ebpf_sticky.sessions.prefilter import creators
from ebpf_sticky.sessions.runtime import MIRRORS, Layer, gated
from ebpf_sticky.supervisor.accepting import accepting

REQUEST = b"POST /x HTTP/1.1\r\nHost: x\r\nx-session: abc\r\nContent-Length: 3\r\n\r\nabc"


TABLE_KEY = b"k" * 16


def layer_of(specs: tuple[KeySpec, ...], ends: tuple[socket.socket, socket.socket]) -> Layer:
    """Slot 0's layer of two slots."""
    return Layer(
        slot=0,
        specs=specs,
        proxy_protocol=False,
        trusted=parse_trusted("127.0.0.1"),
        table=SessionTable.create(memoryview(mmap.mmap(-1, table_size())), TABLE_KEY, 2),
        senders=list(ends),
        receiver=ends[0],
        family=socket.AF_INET,
        spec=None,
        mirror=MIRRORS["native"],
        creators=creators(specs, False),
    )


@pytest.fixture(scope="module")
def ends() -> Iterator[tuple[socket.socket, socket.socket]]:
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield pair
    for end in pair:
        end.close()


@pytest.fixture(scope="module")
def layer(ends: tuple[socket.socket, socket.socket]) -> Layer:
    return layer_of((parse_key_spec("header:x-session"),), ends)


@given(
    hosts=st.lists(
        st.one_of(st.ip_addresses().map(str), st.sampled_from(["", "x", "::ffff:1.2.3.4"])), max_size=8
    ),
    counts=st.lists(st.integers(1, 8), min_size=1, max_size=4),
)
def test_the_slot_remembered_for_an_address_is_the_mirrors_for_the_live_slots(
    ends: tuple[socket.socket, socket.socket], hosts: list[str], counts: list[int]
) -> None:
    spec = HashSpec(b"s" * 16)
    routed = dataclasses.replace(layer_of((), ends), spec=spec)
    for count in counts:
        routed.table.set_slots(count)
        for host in hosts:
            try:
                expected: int | None = MIRRORS["native"](parse_address(host), spec, count)
            except ValueError:
                expected = None
            assert routed.owner_of_address(host) == expected


def bare(cls: Any, **state: Any) -> Any:
    """An instance of a gated class holding only the attributes its predicate reads."""
    protocol = object.__new__(cls)
    protocol.__dict__.update(state)
    return protocol


def test_httptools_a_scope_begun_or_a_body_still_arriving_is_not_between(layer: Layer) -> None:
    gate = gated(accepting(HttpToolsProtocol), layer)[0]
    scope: dict[str, Any] = {}
    done = SimpleNamespace(scope=scope, more_body=False)
    assert bare(gate, scope=scope, cycle=done).between_requests()
    # on_message_begin of a pipelined request made a scope of its own
    assert not bare(gate, scope={}, cycle=done).between_requests()
    # the response came first: uvicorn leaves more_body set
    early = SimpleNamespace(scope=scope, more_body=True)
    assert not bare(gate, scope=scope, cycle=early).between_requests()


@given(cut=st.integers(min_value=0, max_value=len(REQUEST)))
def test_h11_any_part_of_a_request_read_is_not_between(layer: Layer, cut: int) -> None:
    gate = gated(accepting(H11Protocol), layer)[0]
    conn = h11.Connection(h11.SERVER)
    if cut:  # (no bytes at all would tell h11 the peer closed)
        conn.receive_data(REQUEST[:cut])
    for _ in range(4):  # Request, Data, EndOfMessage at most, before it needs more
        if conn.next_event() in (h11.NEED_DATA, h11.PAUSED):
            break
    assert bare(gate, conn=conn).between_requests() is (cut == 0)


def test_any_other_protocol_keeps_the_plain_answer(layer: Layer) -> None:
    """uvicorn's zttp protocol has h11's handle_events but no h11 connection: not h11's test."""
    other = type("ZttpLike", (asyncio.Protocol,), {"handle_events": lambda self, event: None})
    assert bare(gated(other, layer)[0]).between_requests()


class Fed(asyncio.Protocol):
    """A server protocol that keeps what it is fed."""

    cycle = None  # uvicorn's: no request begun

    def data_received(self, data: bytes) -> None:
        self.fed = data


LINE_SPECS = {
    "engineio": (parse_key_spec("engineio"),),
    "query first": (parse_key_spec("query:sid"), parse_key_spec("engineio")),
}
ids = st.one_of(
    st.builds(issue_id, st.sampled_from([0, 1]), st.just(TABLE_KEY), st.binary(min_size=11, max_size=11)),
    st.builds(issue_id, st.just(0), st.just(b"another key....."), st.binary(min_size=11, max_size=11)),
    st.text("AZaz09-_", min_size=1, max_size=24),
)


@given(
    specs=st.sampled_from(sorted(LINE_SPECS)),
    value=ids,
    target=st.sampled_from(
        ["/socket.io/?EIO=4&transport=polling&sid={}", "/socket.io/?sid={}&t=1", "/?x={}"]
    ),
)
def test_a_head_served_at_once_is_one_the_whole_decision_serves_here(
    ends: tuple[socket.socket, socket.socket], specs: str, value: str, target: str
) -> None:
    """For every head in one read, the gate either hands it to the server at once or decides it
    fully (``route``); at once only when the whole decision (``Layer.owner``) would serve it here."""
    layer = layer_of(LINE_SPECS[specs], ends)
    routed: list[int | None] = []
    accepted: Any = gated(Fed, layer)[0]
    gate = type("Watched", (accepted,), {"route": lambda self, owner, data: routed.append(owner)})
    head = f"GET {target.format(value)} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    protocol = bare(gate)
    protocol.data_received(head)
    parsed = parse_request_head(head)
    assert parsed is not None
    owner = layer.owner(parsed, "127.0.0.1", None)
    if routed:
        assert routed == [owner]
    else:
        assert protocol.fed == head
        assert owner in (None, layer.slot)


@pytest.mark.parametrize("base", [HttpToolsProtocol, H11Protocol])
def test_each_moved_connection_is_served_by_a_protocol_made_before_it_came(
    base: type[asyncio.Protocol],
) -> None:
    """With uvicorn's own protocols, as a worker mixes them, and real connections handed over a
    real socketpair: each moved request is served by a protocol made before it arrived (when the
    worker starts receiving, then after the last moved request's app has taken its first step, so
    that the app answers first), and no protocol serves two connections."""
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        events.append("app")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def moves(layer: Layer, sender: socket.socket) -> None:
        config = uvicorn.Config(app, lifespan="off", log_config=None)
        config.load()
        adopted = gated(accepting(base), layer)[1]
        state = ServerState()

        def make() -> Any:
            events.append("made")
            return adopted(config=config, server_state=state, app_state={})

        layer.make_protocol = make
        layer.start_receiving()
        assert events == ["made"]  # before any connection comes
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            for n in range(1, 4):
                with socket.create_connection(listener.getsockname()) as client:
                    client.setblocking(False)
                    accepted, _ = listener.accept()
                    with accepted:
                        handoff.send(sender, accepted.fileno(), None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    response = await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
                    assert response.startswith(b"HTTP/1.1 200")
                    await wait_async(lambda n=n: len(events) == 2 * n + 1, 10, "the next protocol")
                # uvicorn closes its side once the client has
                await wait_async(lambda: not state.connections, 10, "the moved connection closed")
        layer.stop_receiving()
        assert events == ["made", "app"] * 3 + ["made"]

    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.setblocking(False)
        asyncio.run(moves(layer_of((parse_key_spec("header:x-session"),), (receiver, sender)), sender))
