"""The NiceGUI example under ebpf-sticky: its page, and the Engine.IO handshake its page opens."""

from __future__ import annotations

import http.client
import re
from pathlib import Path

import pytest
from support.launcher import launched

from ebpf_sticky.sessions import learn_key, parse_key_spec, parse_request_head

pytest.importorskip("nicegui")

APP = Path(__file__).parents[2] / "examples" / "nicegui_counter" / "app.py"
SOCKET_PATH = "/_nicegui_ws/socket.io/"


def get(port: int, source: str, target: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_page_and_engineio_handshake_under_two_workers() -> None:
    with launched([str(APP), "-w", "2", "--bind", "127.0.0.1:0"]) as instance:
        for source in ("127.0.40.1", "127.0.40.2", "127.0.40.3", "127.0.40.4"):
            status, page = get(instance.port, source, "/")
            assert status == 200
            match = re.search(rb"worker pid (\d+): 0 clicks", page)
            assert match, page[:500]
            # A client's page always comes from its own worker: the state it shows lives there.
            assert match.group(0) in get(instance.port, source, "/")[1]
        target = f"{SOCKET_PATH}?client_id=x&EIO=4&transport=polling"
        status, body = get(instance.port, "127.0.40.1", target)
    assert status == 200 and body.startswith(b'0{"sid":'), body
    head = parse_request_head(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert head is not None
    spec = parse_key_spec(f"engineio:{SOCKET_PATH}")
    assert learn_key([spec], head, 200, [], body) == body.split(b'"')[3].decode()
