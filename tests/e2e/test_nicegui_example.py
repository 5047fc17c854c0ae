"""The NiceGUI example under ebpf-sticky: its page, its Engine.IO handshake, and pages whose
long-polling socket comes from other addresses than the page load.

NiceGUI refuses a socket whose ``client_id`` the worker does not hold ("Implicit handshake
failed"), so a socket accepted, and clicks counted from the page's pid, show that every request
of the socket reached the worker that rendered the page.
"""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import socketio
from support.launcher import KEY, launched, predicted
from support.netlab import v4_sources
from support.roaming import RoamingConnector

from ebpf_sticky.sessions import learn_key, parse_key_spec, parse_request_head

pytest.importorskip("nicegui")

APP = Path(__file__).parents[2] / "examples" / "nicegui_counter" / "app.py"
SOCKET_PATH = "/_nicegui_ws/socket.io/"
SESSION_KEY = ["--session-key", f"engineio:{SOCKET_PATH}"]
WORKERS = 3
PAGE_SOURCE = "127.0.41.1"
COOKIE_KEY = ["--session-key", "cookie:session"]


def get(port: int, source: str, target: str) -> tuple[int, bytes, http.client.HTTPMessage]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read(), response.headers
    finally:
        conn.close()


def test_page_and_engineio_handshake_under_two_workers() -> None:
    with launched([str(APP), "-w", "2", "--bind", "127.0.0.1:0"]) as instance:
        for source in ("127.0.40.1", "127.0.40.2", "127.0.40.3", "127.0.40.4"):
            status, page, _ = get(instance.port, source, "/")
            assert status == 200
            match = re.search(rb"worker pid (\d+): 0 clicks", page)
            assert match, page[:500]
            # A client's page always comes from its own worker: the state it shows lives there.
            assert match.group(0) in get(instance.port, source, "/")[1]
        target = f"{SOCKET_PATH}?client_id=x&EIO=4&transport=polling"
        status, body, _ = get(instance.port, "127.0.40.1", target)
    assert status == 200 and body.startswith(b'0{"sid":'), body
    head = parse_request_head(f"GET {target} HTTP/1.1\r\n\r\n".encode())
    assert head is not None
    spec = parse_key_spec(f"engineio:{SOCKET_PATH}")
    assert learn_key([spec], head, 200, [], body) == body.split(b'"')[3].decode()


# -- a page whose socket changes address ------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    """What a browser takes from a rendered page to open its socket and click its button."""

    client_id: str
    pid: str
    button: str  # the element id
    listener: str  # the click listener's id
    cookie: str  # "session=..." when NiceGUI's storage set one, else ""


def load_page(port: int, source: str) -> Page:
    status, body, headers = get(port, source, "/")
    assert status == 200, body[:500]
    page = body.decode()
    # The page hands its socket's query to the browser as a Python dict literal, and its
    # elements as JSON in a template string (HTML-escaped; the counter's ids need no unescaping).
    client_id = re.search(r"'client_id': '([-0-9a-f]+)'", page)
    pid = re.search(r"worker pid (\d+): 0 clicks", page)
    elements = re.search(r"parseElements\(String\.raw`(.*?)`\)", page, re.DOTALL)
    assert client_id and pid and elements, page[:500]
    button, listener = next(
        (key, element["events"][0]["listener_id"])
        for key, element in json.loads(elements[1]).items()
        if element["tag"] == "q-btn"
    )
    cookie = (headers["set-cookie"] or "").partition(";")[0]
    return Page(client_id[1], pid[1], button, listener, cookie)


async def click(port: int, page: Page, sources: list[str], clicks: int, timeout: float = 10) -> list[str]:
    """NiceGUI's socket for ``page`` over long-polling, each HTTP request from the next of
    ``sources``: the label each click's ``update`` brought back. Raises when NiceGUI refuses the
    socket (the reason in the message) or an answer does not come."""
    headers = {"Cookie": page.cookie} if page.cookie else {}
    async with aiohttp.ClientSession(connector=RoamingConnector(sources), headers=headers) as http_session:
        client = socketio.AsyncClient(http_session=http_session, reconnection=False, request_timeout=timeout)
        updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        refused: list[str] = []
        client.on("update", updates.put_nowait)
        client.on("connect_error", lambda data: refused.append(str(data)))
        # What nicegui.js sends: the page's query, with ids of the browser tab and the document.
        query = f"client_id={page.client_id}&next_message_id=0&implicit_handshake=true&tab_id=t&document_id=d"
        try:
            refusal = ""
            try:
                connecting = client.connect(
                    f"http://127.0.0.1:{port}/?{query}",
                    transports=["polling"],
                    socketio_path=SOCKET_PATH,
                    wait_timeout=timeout,
                )
                await asyncio.wait_for(connecting, timeout)
            except (socketio.exceptions.ConnectionError, TimeoutError) as error:
                refusal = f"socket not accepted: {error!r} {refused}"
            if refusal:
                # The cancelled request's frames hold aiohttp's connection in a cycle with the
                # error: collected here, while the loop runs, and not in some later test, where
                # its __del__ on a closed loop is an unraisable exception that fails that test.
                gc.collect()
                raise AssertionError(refusal)
            labels: list[str] = []
            for _ in range(clicks):
                event = {"id": int(page.button), "client_id": page.client_id, "listener_id": page.listener}
                await client.emit("event", {**event, "args": []})
                update = await asyncio.wait_for(updates.get(), timeout)
                labels.extend(e["text"] for e in update.values() if isinstance(e, dict) and "text" in e)
            assert client.connected and client.transport() == "polling"
            return labels
        finally:
            await client.eio.disconnect(abort=True)


def sources_around(page_source: str, first_with_page: bool) -> list[str]:
    """A socket's sources: one on the page's worker first (or not), then four on the others."""
    slot = predicted(page_source, WORKERS)
    candidates = v4_sources(200, start=9000)
    same = [s for s in candidates if predicted(s, WORKERS) == slot]
    others = [s for s in candidates if predicted(s, WORKERS) != slot][:4]
    assert {predicted(s, WORKERS) for s in others} == set(range(WORKERS)) - {slot}
    return [same[0], *others] if first_with_page else others


def launch_args(*extra: str) -> list[str]:
    return [str(APP), "-w", str(WORKERS), "--bind", "127.0.0.1:0", "--hash-key", KEY, *extra]


@pytest.mark.parametrize("keys", [SESSION_KEY, []], ids=["engineio", "control"])
def test_a_polling_socket_that_changes_address_keeps_its_page(keys: list[str]) -> None:
    with launched(launch_args(*keys)) as instance:
        page = load_page(instance.port, PAGE_SOURCE)
        sources = sources_around(PAGE_SOURCE, first_with_page=True)
        outcome: list[str] | str
        try:
            outcome = asyncio.run(click(instance.port, page, sources, clicks=3))
        except AssertionError as error:
            outcome = str(error)
        if keys:
            assert outcome == [f"worker pid {page.pid}: {n} clicks" for n in (1, 2, 3)]
            assert sum(row["sessions"]["moved_out"] for row in instance.status()["slots"]) > 0
        else:
            # Every request after the Engine.IO handshake lands on a worker without the session.
            print(f"control: {outcome}")
            assert isinstance(outcome, str) and "socket not accepted" in outcome, outcome


@pytest.mark.parametrize("keys", [[*SESSION_KEY, *COOKIE_KEY], SESSION_KEY], ids=["cookie", "engineio-only"])
def test_a_socket_that_starts_from_another_address(keys: list[str]) -> None:
    # Its first request carries the page's client_id but no sid yet: with the engineio key alone
    # it is served where its own address lands, a worker that never saw the page, and NiceGUI
    # refuses it. The session cookie NiceGUI's storage set with the page names the page's worker.
    env = {"STORAGE_SECRET": "not-a-secret-in-a-test"}
    with launched(launch_args(*keys), extra_env=env) as instance:
        page = load_page(instance.port, PAGE_SOURCE)
        assert page.cookie.startswith("session="), page
        sources = sources_around(PAGE_SOURCE, first_with_page=False)
        if COOKIE_KEY[1] in keys:
            labels = asyncio.run(click(instance.port, page, sources, clicks=2))
            assert labels == [f"worker pid {page.pid}: {n} clicks" for n in (1, 2)]
        else:
            with pytest.raises(AssertionError, match="Implicit handshake failed"):
                asyncio.run(click(instance.port, page, sources, clicks=1))
