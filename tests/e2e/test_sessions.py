"""Sessions stay on their worker whatever address arrives: --session-key and --proxy-protocol.

Real servers (the Socket.IO chat example, uvicorn under our worker), real clients
(python-socketio, http.client, raw sockets for PROXY headers), negative controls beside each.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.launcher import APPS as APPS_DIR
from support.launcher import (
    KEY,
    Instance,
    launched,
    owner_and_others,
    predicted,
    run_bad,
    session_get,
    wait_for,
)
from support.mcp_clients import official_session, raw_session
from support.netlab import in_new_netns, local_ipv6_prefix, v4_sources
from support.proxies import HAPROXY_SOURCE, haproxy_send_proxy, nginx_replicas
from support.roaming import gather_sessions, replica_session, roaming_swarm

pytestmark = pytest.mark.root

CHAT = Path(__file__).parents[2] / "examples" / "socketio_chat" / "app.py"
V6_PREFIX = "fd00:77::/64"


def chat_args(bind: str, *extra: str) -> list[str]:
    return [str(CHAT), "-w", "4", "--bind", bind, "--hash-key", KEY, "--graceful-timeout", "3", *extra]


def roaming_sources(sessions: int, per_session: int) -> list[list[str]]:
    """Each session's addresses, IPv4 and IPv6 alternating, none shared with another session."""
    v4 = iter(v4_sources(sessions * per_session, start=3000))
    return [
        [next(v4) if i % 2 == 0 else f"fd00:77::{s:x}:{i + 1:x}" for i in range(per_session)]
        for s in range(sessions)
    ]


def _roam(extra: list[str], sessions: int) -> dict[str, Any]:
    """In a fresh netns: the chat on dual-stack [::], polling sessions that change address on
    every request; what was kept and what failed."""

    def body() -> dict[str, Any]:
        local_ipv6_prefix(V6_PREFIX, "fd00:77::1")
        with launched(chat_args("[::]:0", *extra)) as instance:
            kept, errors = roaming_swarm(f"http://localhost:{instance.port}", roaming_sources(sessions, 6))
            return {"kept": [sorted(k) for k in kept], "errors": errors}

    result: dict[str, Any] = in_new_netns(body)
    return result


def test_engineio_sessions_survive_every_request_from_another_address() -> None:
    result = _roam(["--session-key", "engineio"], sessions=24)
    assert result["errors"] == []
    assert len(result["kept"]) == 24
    assert all(len(workers) == 1 for workers in result["kept"]), result["kept"]
    assert len({w[0] for w in result["kept"]}) > 1  # sessions are spread over the workers


def test_negative_control_without_session_key_roaming_sessions_break() -> None:
    result = _roam([], sessions=12)
    print(f"control: {len(result['errors'])}/12 sessions failed")
    assert result["errors"], result


# -- keep-alive: one connection, requests of sessions on every slot ------------------------------


def _handshake(port: int, source: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/socket.io/?EIO=4&transport=polling")
        sid: str = json.loads(conn.getresponse().read()[1:])["sid"]
        return sid
    finally:
        conn.close()


def _keepalive_round(conn: http.client.HTTPConnection, sid: str) -> tuple[int, int, bytes]:
    path = f"/socket.io/?EIO=4&transport=polling&sid={sid}"
    conn.request("POST", path, body=b"40", headers={"Content-Type": "text/plain"})
    posted = conn.getresponse()
    posted.read()
    conn.request("GET", path)
    polled = conn.getresponse()
    return posted.status, polled.status, polled.read()


@pytest.mark.parametrize(
    "keys",
    [["--session-key", "engineio"], ["--session-key", "engineio", "--http", "h11", "--loop", "asyncio"], []],
    ids=["engineio", "engineio-h11-asyncio", "control"],
)
def test_a_keepalive_connection_moves_between_requests(keys: list[str]) -> None:
    with launched(chat_args("127.0.0.1:0", *keys)) as instance:
        sids = [_handshake(instance.port, source) for source in v4_sources(16, start=4000)]
        conn = http.client.HTTPConnection(
            "127.0.0.1", instance.port, timeout=10, source_address=("127.0.40.1", 0)
        )
        outcomes = []
        for sid in sids:
            try:
                outcomes.append(_keepalive_round(conn, sid))
            except (OSError, http.client.HTTPException) as exc:
                outcomes.append((0, 0, repr(exc).encode()))
                conn.close()
        conn.close()
        kept = [o for o in outcomes if o[0] == o[1] == 200 and o[2].startswith(b"40")]
        if keys:
            assert len(kept) == len(sids), outcomes
            moved = [row["sessions"]["moved_out"] for row in instance.status()["slots"]]
            assert sum(moved) > 0
        else:
            assert len(kept) < len(sids), "control: every session kept without --session-key"


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_pipelined_requests_are_answered_in_order(http: str) -> None:
    """Requests sent back to back before any answer are uvicorn's to serve, in order, even when
    the layer takes the connection back between them."""
    with launched(chat_args("127.0.0.1:0", "--session-key", "engineio", "--http", http)) as instance:
        paths = [f"/socket.io/?EIO=4&transport=polling&t={i}" for i in range(3)]
        heads = "".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n" for path in paths)
        with socket.create_connection(("127.0.0.1", instance.port), timeout=10) as sock:
            sock.sendall(heads.encode())
            data = b""
            while data.count(b'0{"sid":') < 3 and (chunk := sock.recv(65536)):  # recv: 10 s deadline
                data += chunk
    assert data.count(b"HTTP/1.1 200") == 3, data
    assert data.count(b'0{"sid":') == 3, data


class _Kept(io.BufferedReader):
    def close(self) -> None:
        """Kept open when http.client has read a response: the next one is read from it."""


class _Answers:
    """The responses on one raw keep-alive connection, read one at a time (http.client's parser
    over a single buffered reader, so that no read-ahead is lost between them)."""

    def __init__(self, sock: socket.socket) -> None:
        self.fp = _Kept(socket.SocketIO(sock, "rb"))

    def makefile(self, mode: str) -> Any:
        return self.fp

    def next(self, method: str = "GET") -> tuple[int, str, str]:
        """(status, x-path, slot) of the next response."""
        response = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        response.begin()
        body = response.read().split()
        return response.status, response.getheader("x-path") or "", body[0].decode() if body else ""


@pytest.fixture(params=["httptools", "h11"])
def keyed(request: pytest.FixtureRequest) -> Any:
    """session_app on 3 slots with header:x-session keys; a session owned by slot 2, and a source
    the kernel sends elsewhere: (instance, session, source, the source's slot)."""
    args = ["session_app.py", "-w", "3", "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--session-key", "header:x-session", "--http", request.param, "--loop", "uvloop"]  # fmt: skip
    owner, others = owner_and_others(6600, 2, 1)
    with launched(args) as instance:
        status, slot, session = session_get(instance.port, owner, "/login", None)
        assert (status, slot) == (200, "2")
        yield instance, session, others[0], str(predicted(others[0], 3))


def test_a_head_begun_before_the_last_response_ended_is_served_whole(keyed: Any) -> None:
    """A pipelined head split across reads: its rest, read once the response before it is complete,
    is not a head of its own (it reads like one here: the header value before it is cut there)."""
    instance, session, source, here = keyed
    with socket.create_connection(
        ("127.0.0.1", instance.port), timeout=10, source_address=(source, 0)
    ) as sock:
        answers = _Answers(sock)
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        assert answers.next() == (200, "/one", here)
        sock.sendall(f"GET /three HTTP/1.1\r\nx-session: {session}\r\n\r\n".encode())
        assert answers.next() == (200, "/two", here)


def test_the_rest_of_a_body_after_an_early_response_is_body(keyed: Any) -> None:
    """The app answers before reading the body (session_app reads none): the body's rest, read
    after the response, is the server's to discard, even when it reads like a request head."""
    instance, session, source, here = keyed
    tail = f"GET /three HTTP/1.1\r\nx-session: {session}\r\n\r\n".encode()
    with socket.create_connection(
        ("127.0.0.1", instance.port), timeout=10, source_address=(source, 0)
    ) as sock:
        answers = _Answers(sock)
        sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n0123" % (4 + len(tail)))
        assert answers.next() == (200, "/early", here)
        sock.sendall(tail)
        sock.sendall(b"GET /four HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers.next() == (200, "/four", here)


@pytest.mark.parametrize("keyed", ["httptools"], indirect=True)
def test_a_head_only_response_goes_out_before_its_connection_moves(keyed: Any) -> None:
    """A HEAD response (a head with no body), and in the same turn of uvloop's loop (its tasks run
    before it polls) the next request, of another slot's session: the head is sent before the
    connection is handed over. (httptools' joined writes hold a head for its body; h11's do not.)"""
    instance, session, source, here = keyed
    with socket.create_connection(
        ("127.0.0.1", instance.port), timeout=10, source_address=(source, 0)
    ) as sock:
        answers = _Answers(sock)
        sock.sendall(f"HEAD /block?{instance.tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_for(lambda: f"blocking {instance.tag}" in instance.output(), 10, "the handler to block")
        sock.sendall(f"GET /three HTTP/1.1\r\nHost: x\r\nx-session: {session}\r\n\r\n".encode())
        assert answers.next("HEAD") == (200, "/block", "")
        assert answers.next() == (200, "/three", "2")


# -- PROXY protocol, from raw sockets ---------------------------------------------------------------


def _proxied_get(port: int, source: str, header: bytes) -> bytes:
    """The whole answer to one GET after ``header``; b"" when the connection was refused (closed
    or reset) without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        data = b""
        try:
            sock.sendall(header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def test_bytes_that_cannot_start_a_request_are_refused_at_once() -> None:
    """A TLS ClientHello to the plain port (no line end in it): uvicorn answers 400 and closes, as
    it does without the layer, instead of the gate holding it for a head that never comes."""
    args = ["session_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--hash-key", KEY, "--session-key", "mcp"]
    with launched(args) as instance:
        with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
            sock.sendall(bytes.fromhex("160301020001000001fc0303") + os.urandom(32))
            answer = b""
            while chunk := sock.recv(65536):  # recv: 5 s deadline
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_proxy_protocol_from_an_allowed_peer_names_the_client() -> None:
    args = [
        "client_app.py", "-w", "4", "--bind", "127.0.0.1:0", "--hash-key", KEY, "--proxy-protocol",
        "--forwarded-allow-ips", "127.0.0.9",
    ]  # fmt: skip
    with launched(args) as instance:
        clients = v4_sources(40, start=5000)
        for client in clients:
            header = f"PROXY TCP4 {client} 127.0.0.1 4242 80\r\n".encode()
            reply = _proxied_get(instance.port, "127.0.0.9", header)
            slot, seen = reply.split(b"\r\n\r\n", 1)[1].split()
            assert seen.decode() == client
            assert int(slot) == predicted(client, 4)
        # The same header from a peer not in --forwarded-allow-ips: refused, never believed.
        forged = _proxied_get(
            instance.port, "127.0.0.10", f"PROXY TCP4 {clients[0]} 127.0.0.1 1 80\r\n".encode()
        )
        assert forged == b""


def wait_slots_serving(instance: Instance) -> None:
    wait_for(lambda: all(row["pids"] for row in instance.status()["slots"]), 30, "every slot serving")


# -- handoffs queued while the owning slot's worker is replaced -------------------------------------


@dataclass
class SessionLoad:
    """Threads sending requests of one session from sources that land on other slots, until
    stopped: every outcome recorded."""

    port: int
    sources: list[str]
    session: str
    answers: list[tuple[int, str, str]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when the request began, what)

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(s,)) for s in self.sources]

    def _run(self, source: str) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.answers.append(session_get(self.port, source, "/", self.session))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append((began, f"{source}: {exc!r}"))

    def served_by(self, pid: str) -> int:
        return sum(1 for answer in self.answers if answer[2] == pid)


@pytest.mark.parametrize("replace", ["KILL", "HUP"])
def test_handoffs_queued_for_a_replaced_worker_are_all_served(replace: str) -> None:
    args = ["session_app.py", "-w", "3", "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--session-key", "header:x-session", "--graceful-timeout", "3"]  # fmt: skip
    owner, others = owner_and_others(6000, 2, 16)
    with launched(args) as instance:
        _, slot, session = session_get(instance.port, owner, "/login", None)
        assert slot == "2"
        (old_pid,) = instance.slot_pids()[2]
        load = SessionLoad(instance.port, others, session)
        for thread in load.threads:
            thread.start()
        try:
            wait_for(lambda: load.served_by(str(old_pid)) >= 20, 30, "requests moved to slot 2")
            replaced_at = time.monotonic()
            if replace == "KILL":
                os.kill(old_pid, signal.SIGKILL)
            else:
                instance.signal(signal.SIGHUP)

            def new_worker_serving() -> bool:
                pids = instance.slot_pids()[2]
                return len(pids) == 1 and pids[0] != old_pid and load.served_by(str(pids[0])) >= 20

            wait_for(new_worker_serving, 60, "slot 2's new worker serving moved requests")
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join()
        print(f"{replace}: {len(load.answers)} moved requests, {len(load.failures)} failed")
        # kill -9 loses what the worker was serving at that moment (as it would without moves):
        # nothing sent to the slot after that, which waited in the slot's queue, is lost.
        assert [what for began, what in load.failures if began > replaced_at or replace == "HUP"] == []
        assert all(status == 200 and slot == "2" for status, slot, _ in load.answers)
        assert instance.status()["slots"][2]["sessions"]["moved_in"] >= 40


@pytest.mark.parametrize("nofile", [400, None], ids=["in-flight-limit", "default-limit"])
def test_moves_the_owner_cannot_take_yet_wait_in_the_mover_and_are_served(nofile: int | None) -> None:
    """The owner stopped (SIGSTOP) while 700 connections are moved to it. The kernel keeps at most
    RLIMIT_NOFILE of the workers' fds in unix sockets' queues (ETOOMANYREFS): beyond that, they
    wait in the workers that moved them, in order, until the owner takes its queue again."""
    args = ["session_app.py", "-w", "3", "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--session-key", "header:x-session"]  # fmt: skip
    owner, others = owner_and_others(6200, 2, 16)
    queued = 700
    prefix = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
    with launched(args, prefix=prefix) as instance:
        _, slot, session = session_get(instance.port, owner, "/login", None)
        assert slot == "2"
        (pid,) = instance.slot_pids()[2]
        request = f"GET / HTTP/1.1\r\nHost: x\r\nx-session: {session}\r\nConnection: close\r\n\r\n"
        clients: list[socket.socket] = []
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(queued):
                sock = socket.create_connection(("127.0.0.1", instance.port), 30, (others[i % 16], 0))
                sock.sendall(request.encode())
                clients.append(sock)
            # Every connection read and handed on by slots 0 and 1: none left in their hands.
            wait_for(
                lambda: sum(instance.status()["slots"][s]["sessions"]["moved_out"] for s in (0, 1)) >= queued,
                60,
                "every connection moved out",
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        answers = []
        for sock in clients:
            with sock:
                response = http.client.HTTPResponse(sock)
                response.begin()
                answers.append((response.status, response.read().decode().split()))
        assert answers == [(200, ["2", str(pid)])] * queued
        assert instance.status()["slots"][2]["sessions"]["moved_in"] >= queued


def test_workers_started_before_a_slot_was_added_hand_connections_to_it() -> None:
    """Slots 0 and 1 exist before TTIN adds slot 2; a session slot 2 creates is asked for from
    addresses of slots 0 and 1, whose workers got their channels before slot 2 existed."""
    args = ["session_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--session-key", "header:x-session"]  # fmt: skip
    owner, others = owner_and_others(14000, 2, 12)
    with launched(args) as instance:
        before = instance.worker_pids()
        instance.signal(signal.SIGTTIN)
        wait_for(lambda: "2" in instance.ready_since(0), 60, "slot 2 ready")
        _, slot, session = session_get(instance.port, owner, "/login", None)
        assert slot == "2"
        (pid,) = instance.slot_pids()[2]
        answers = [session_get(instance.port, source, "/", session) for source in others]
        assert {predicted(s, 3) for s in others} == {0, 1}
        assert set(instance.slot_pids()[0] + instance.slot_pids()[1]) <= before  # still the old workers
        assert answers == [(200, "2", str(pid))] * len(others), answers


# -- across an in-place upgrade of the master (SIGUSR2) ----------------------------------------------

UPGRADE_ARGS = ["session_app.py", "-w", "3", "--bind", "127.0.0.1:0", "--hash-key", KEY,
                "--session-key", "header:x-session", "--graceful-timeout", "2"]  # fmt: skip


def _upgrade(instance: Instance) -> None:
    old = instance.worker_pids()
    instance.signal(signal.SIGUSR2)
    wait_for(lambda: instance.renewed(1, old), 120, "generation 1, every worker new")


def test_ids_learnt_before_an_upgrade_still_reach_their_slot() -> None:
    """The app's own random id, learnt into the table from its response before the upgrade, is
    asked for after it from addresses the kernel sends to the other slots."""
    owner, others = owner_and_others(11000, 1, 12)
    with launched(UPGRADE_ARGS) as instance:
        _, slot, session = session_get(instance.port, owner, "/login", None)
        assert slot == "1"
        _upgrade(instance)
        (pid,) = instance.slot_pids()[1]
        answers = [session_get(instance.port, source, "/", session) for source in others]
        print(f"after USR2: {answers}")
        assert {predicted(s, 3) for s in others} == {0, 2}
        assert answers == [(200, "1", str(pid))] * len(others)


def test_handoffs_queued_across_an_upgrade_are_served_by_the_new_worker() -> None:
    """The owning worker is stopped (SIGSTOP), so moves to it wait in its slot's channel for
    certain; the upgrade then replaces it: the new image's worker must find them there."""
    owner, others = owner_and_others(12000, 2, 8)
    with launched(UPGRADE_ARGS) as instance:
        _, _, session = session_get(instance.port, owner, "/login", None)
        (stopped,) = instance.slot_pids()[2]
        os.kill(stopped, signal.SIGSTOP)
        answers: list[tuple[int, str, str] | BaseException] = []

        def ask(source: str) -> None:
            try:
                answers.append(session_get(instance.port, source, "/", session))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                answers.append(exc)

        threads = [threading.Thread(target=ask, args=(source,)) for source in others]
        try:
            for thread in threads:
                thread.start()

            def queued() -> bool:
                moved: int = sum(row["sessions"]["moved_out"] for row in instance.status()["slots"])
                return moved >= len(others)

            wait_for(queued, 30, "every request moved towards the stopped worker")
            _upgrade(instance)  # the stopped worker ignores TERM: killed after --graceful-timeout
        finally:
            for thread in threads:
                thread.join()
        (pid,) = instance.slot_pids()[2]
        print(f"queued across USR2: {answers}")
        assert answers == [(200, "2", str(pid))] * len(others)


# -- MCP: the official SDK's server and client --------------------------------------------------------

MCP_APP = Path(__file__).parents[2] / "examples" / "mcp_server" / "app.py"


def _kept(answers: list[Any]) -> bool:
    """One session's answers: all from one pid, counting 1, 2, 3..."""
    return (
        all(isinstance(a, dict) for a in answers)
        and [a["count"] for a in answers] == list(range(1, len(answers) + 1))
        and len({a["pid"] for a in answers}) == 1
    )


@pytest.mark.parametrize("keys", [["--session-key", "mcp"], []], ids=["mcp", "control"])
def test_mcp_tool_calls_stay_in_their_session_across_addresses(keys: list[str]) -> None:
    args = [
        str(MCP_APP),
        "-w",
        "4",
        "--bind",
        "127.0.0.1:0",
        "--hash-key",
        KEY,
        "--graceful-timeout",
        "3",
        *keys,
    ]
    sources = v4_sources(8 * 4, start=7000)
    groups = [sources[i : i + 4] for i in range(0, len(sources), 4)]
    with launched(args) as instance:
        url = f"http://127.0.0.1:{instance.port}/mcp"

        async def official() -> list[list[dict[str, Any]] | BaseException]:
            return await asyncio.gather(
                *(official_session(url, group, 6) for group in groups[:4]), return_exceptions=True
            )

        official_results = asyncio.run(official())
        raw_results = [raw_session(instance.port, group, 6) for group in groups[4:]]
        kept = sum(not isinstance(r, BaseException) and _kept(r) for r in official_results)
        kept += sum(_kept(r) for r in raw_results)
        print(f"mcp {keys}: {kept}/8 kept; official {official_results!r:.300}; raw {raw_results!r:.300}")
        if keys:
            assert kept == 8
        else:
            assert kept < 8


# -- behind real proxies: HAProxy with PROXY protocol, nginx replicas with keep-alive pools ---------


@pytest.mark.parametrize("version", [2, 1])
def test_behind_haproxy_every_client_is_routed_and_seen_by_its_own_address(version: int) -> None:
    args = ["client_app.py", "-w", "4", "--bind", "127.0.0.1:0", "--hash-key", KEY, "--proxy-protocol",
            "--forwarded-allow-ips", HAPROXY_SOURCE]  # fmt: skip
    clients = v4_sources(80, start=8000)
    with launched(args) as instance, haproxy_send_proxy(instance.port, version=version) as front:
        slots: dict[str, int] = {}
        for client in clients:
            reply = _proxied_get(front.port, client, b"")
            slot, seen = reply.split(b"\r\n\r\n", 1)[1].split()
            assert seen.decode() == client  # the app sees the client, not HAProxy
            slots[client] = int(slot)
        assert slots == {client: predicted(client, 4) for client in clients}
        assert set(slots.values()) == {0, 1, 2, 3}  # balanced: HAProxy's one address would be one slot


def test_negative_control_a_proxy_not_allowed_is_refused() -> None:
    args = ["client_app.py", "-w", "4", "--bind", "127.0.0.1:0", "--hash-key", KEY, "--proxy-protocol",
            "--forwarded-allow-ips", "127.0.0.1"]  # fmt: skip
    with launched(args) as instance, haproxy_send_proxy(instance.port) as front:
        assert all(_proxied_get(front.port, c, b"") == b"" for c in v4_sources(8, start=8200))


@pytest.mark.parametrize("transports", [["polling"], ["polling", "websocket"]], ids=["polling", "upgrade"])
@pytest.mark.parametrize("keys", [["--session-key", "engineio"], []], ids=["engineio", "control"])
def test_behind_nginx_replicas_with_pooled_connections(keys: list[str], transports: list[str]) -> None:
    with launched(chat_args("127.0.0.1:0", *keys)) as instance, nginx_replicas(instance.port) as fronts:
        ports = [front.port for front in fronts]
        url = f"http://replicas:{ports[0]}"
        sessions = [
            replica_session(url, ports[i % 2 :] + ports[: i % 2], transports, 4, 10) for i in range(24)
        ]
        kept, errors = gather_sessions(sessions)
        whole = [k for k in kept if len(k) == 1]
        print(f"nginx {keys} {transports}: {len(whole)}/24 kept; errors {errors[:3]}")
        if keys:
            assert errors == [] and len(whole) == 24
        else:
            assert len(whole) < 24


# -- status and validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("spread", [False, True], ids=["two-sources", "control-many-sources"])
def test_status_warns_when_a_few_sources_carry_most_connections(spread: bool) -> None:
    """What a pooling proxy in front looks like: many open connections from two addresses."""
    args = ["client_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--hash-key", KEY, "--session-key", "mcp"]
    sources = v4_sources(40, start=9000) if spread else ["127.0.90.1", "127.0.90.2"] * 20
    with launched(args) as instance:
        held = [socket.create_connection(("127.0.0.1", instance.port), 10, (s, 0)) for s in sources]
        try:
            for sock in held:  # each one served: open and in a worker's hands, as a pool's are
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            status = instance.status()
            text = subprocess.run(
                [sys.executable, "-m", "ebpf_sticky", "status", "--port", str(instance.port)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        finally:
            for sock in held:
                sock.close()
        warned = "a few source addresses carry most connections" in text
        assert warned == (not spread), (status, text)
        assert "moved-out" in text


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--session-key", "cookies:x"], "--session-key 'cookies:x'"),
        (["--session-key", "mcp", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"], "TLS"),
    ],
)
def test_bad_session_options_are_one_line(extra: list[str], expected: str, tmp_path: Path) -> None:
    cert = trustme.CA().issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    extra = [str(tmp_path / e) if e.endswith(".pem") else e for e in extra]
    run_bad([str(APPS_DIR / "client_app.py"), "-w", "1", "--bind", "127.0.0.1:0", *extra], expected)


def test_session_key_needs_a_python_target() -> None:
    run_bad(["--session-key", "mcp", "--bind", "127.0.0.1:0", "--", "sleep", "1"], "give a TARGET")


# -- the other key kinds: cookie, query, forwarded -----------------------------------------------------


def _get_with(port: int, source: str, path: str, headers: dict[str, str]) -> tuple[str, str | None]:
    """(slot, set-cookie) of one request on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.read().decode().split()[0], response.getheader("set-cookie")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "keys",
    # httptools' responses are read as they are written, h11's through an ASGI layer.
    [["--session-key", "cookie:sid"], ["--session-key", "cookie:sid", "--http", "h11"], []],
    ids=["cookie", "cookie-h11", "control"],
)
def test_cookie_sessions_stay_with_the_worker_that_set_the_cookie(keys: list[str]) -> None:
    args = ["session_app.py", "-w", "4", "--bind", "127.0.0.1:0", "--hash-key", KEY, *keys]
    sources = v4_sources(200, start=10000)
    with launched(args) as instance:
        kept = 0
        for n in range(12):
            slot, cookie = _get_with(instance.port, sources[n * 10], "/login", {})
            assert cookie is not None
            answers = {
                _get_with(instance.port, s, "/", {"Cookie": cookie.split(";")[0]})[0]
                for s in sources[n * 10 + 1 : n * 10 + 6]
            }
            kept += answers == {slot}
        assert (kept == 12) if keys else (kept < 12)


def test_a_body_that_looks_like_a_response_head_creates_no_session() -> None:
    args = ["session_app.py", "-w", "3", "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--session-key", "header:x-session"]  # fmt: skip
    owner, others = owner_and_others(6400, 2, 12)
    forged = "f" * 32
    with launched(args) as instance:
        conn = http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10, source_address=(owner, 0))
        try:
            conn.request("GET", f"/download?{forged}")
            assert conn.getresponse().read().endswith(f"x-session: {forged}\r\n\r\n".encode())
        finally:
            conn.close()
        answers = {session_get(instance.port, source, "/", forged)[1] for source in others}
        # Served where they landed (slots 0 and 1): the id was never learnt for slot 2.
        assert answers == {"0", "1"}, answers


def test_query_ids_chosen_by_clients_hash_to_one_slot_each() -> None:
    args = [
        "session_app.py",
        "-w",
        "4",
        "--bind",
        "127.0.0.1:0",
        "--hash-key",
        KEY,
        "--session-key",
        "query:session_hash",
    ]
    sources = v4_sources(60, start=11000)
    with launched(args) as instance:
        homes = []
        for n in range(12):
            answers = {
                _get_with(instance.port, s, f"/?session_hash=client-{n}", {})[0]
                for s in sources[n * 5 : n * 5 + 5]
            }
            assert len(answers) == 1, answers
            homes.append(answers.pop())
        assert len(set(homes)) > 1  # different ids, different slots


def test_forwarded_addresses_from_an_allowed_proxy_route_like_direct_clients() -> None:
    args = ["session_app.py", "-w", "4", "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--session-key", "forwarded", "--forwarded-allow-ips", "127.0.0.9"]  # fmt: skip
    clients = v4_sources(40, start=12000)
    with launched(args) as instance:
        for client in clients:
            slot, _ = _get_with(instance.port, "127.0.0.9", "/", {"X-Forwarded-For": client})
            assert int(slot) == predicted(client, 4)
        # From a peer not allowed, the header is the client's word: ignored, the peer's own slot.
        peer = "127.0.0.10"
        assert {int(_get_with(instance.port, peer, "/", {"X-Forwarded-For": c})[0]) for c in clients} == {
            predicted(peer, 4)
        }
