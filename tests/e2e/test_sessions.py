"""Sessions stay on their worker whatever address arrives: --session-key and --proxy-protocol.

Real servers (the Socket.IO chat example, uvicorn under our worker), real clients
(python-socketio, http.client, raw sockets for PROXY headers), negative controls beside each.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from support.launcher import KEY, Instance, launched, predicted, wait_for
from support.netlab import in_new_netns, local_ipv6_prefix, v4_sources
from support.roaming import roaming_swarm

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


@pytest.mark.parametrize("keys", [["--session-key", "engineio"], []], ids=["engineio", "control"])
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


# -- PROXY protocol, from raw sockets ---------------------------------------------------------------


def _proxied_get(port: int, source: str, header: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(header + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


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
