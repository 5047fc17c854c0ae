"""Socket.IO end to end: real clients nobody here wrote, long-polling across 4 workers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from support.launcher import KEY, Instance, launched, wait_for, watch_ready
from support.netlab import v4_sources
from support.sio_clients import CHROMIUM, CHROMIUM_ARGS, Member, node_swarm, python_swarm, wait_async

from ebpf_sticky.hashing import HashSpec, parse_address, slot_of

CHAT = Path(__file__).parents[2] / "examples" / "socketio_chat"
SPEC = HashSpec(bytes.fromhex(KEY))
SOURCES = v4_sources(120, start=1000)
TRANSPORTS = {"polling": ["polling"], "upgrade": ["polling", "websocket"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat_args(workers: int = 4) -> list[str]:
    return [str(CHAT / "app.py"), "-w", str(workers), "--bind", "127.0.0.1:0", "--hash-key", KEY,
            "--graceful-timeout", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def chat() -> Iterator[str]:
    with launched(chat_args()) as instance:
        yield f"http://127.0.0.1:{instance.port}"


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize(
    "swarm", [python_swarm, node_swarm], ids=["python-socketio", "node-socket.io-client"]
)
def test_swarm_keeps_every_session(chat: str, swarm: Any, transport: str) -> None:
    result = swarm(chat, SOURCES, TRANSPORTS[transport])
    assert (result.ok, result.failed) == (len(SOURCES), 0), result.errors[:5]
    assert set(result.workers.values()) == {"0", "1", "2", "3"}
    for source, worker in result.workers.items():
        assert int(worker) == slot_of(parse_address(source), SPEC, 4)


def test_negative_control_unsticky_workers_break_sessions(tmp_path: Path) -> None:
    # The same app and the same clients under `uvicorn --workers 4` (one shared socket, no
    # stickiness): long-polling sessions must fail, or the test above could not tell.
    port = free_port()
    uvicorn = [sys.executable, "-m", "uvicorn", "app:app", "--workers", "4", "--port", str(port),
               "--no-access-log"]  # fmt: skip
    log = tmp_path / "uvicorn.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            uvicorn, cwd=CHAT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"

        # uvicorn's master listens before its workers start: a swarm sent then can find one
        # worker serving, keep every session on it, and break none. All four must be up.
        def up() -> bool:
            return log.read_text().count("Application startup complete.") == 4

        wait_for(up, 60, "uvicorn's four workers")
        sources = SOURCES[:60]
        py = python_swarm(url, sources, ["polling"], timeout=3)
        node = node_swarm(url, sources, ["polling"], timeout=3)
        print(f"control sessions failed: python-socketio {py.failed}/60, node {node.failed}/60")
        assert py.failed > 0 and node.failed > 0
    finally:
        # uvicorn would wait out the clients' pending long-polls; its whole group goes at once.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(ping, 30, "redis-server")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def chat_with_redis(redis_url: str) -> Iterator[str]:
    with launched(chat_args(), extra_env={"REDIS_URL": redis_url}) as instance:
        yield f"http://127.0.0.1:{instance.port}"


def test_broadcast_reaches_every_worker_exactly_once(chat_with_redis: str) -> None:
    async def scenario() -> None:
        members = [Member(s) for s in SOURCES[:40]]
        workers = await asyncio.gather(*(m.start(chat_with_redis) for m in members))
        assert set(workers) == {"0", "1", "2", "3"}
        try:
            await members[0].client.call("say", {"room": "all", "text": "hello"}, timeout=15)
            # A second message from a client on another worker: once everyone has it, the first
            # one has had every chance to arrive twice. Each exactly once, in either order: the
            # clients upgrade from polling to WebSocket, and Engine.IO does not order packets
            # across the two transports during the upgrade.
            other = next(m for m, w in zip(members, workers, strict=True) if w != workers[0])
            await other.client.call("say", {"room": "all", "text": "sentinel"}, timeout=15)
            await wait_async(lambda: all(len(m.heard) >= 2 for m in members), 30, "both messages everywhere")
            for member in members:
                assert sorted(m["text"] for m in member.heard) == ["hello", "sentinel"], member.source
        finally:
            await asyncio.gather(*(m.stop() for m in members))

    asyncio.run(scenario())


def test_real_browser_chats_with_a_client_on_another_worker(chat_with_redis: str) -> None:
    from playwright.sync_api import sync_playwright

    browser_slot = str(slot_of(parse_address("127.0.0.1"), SPEC, 4))
    source = next(s for s in SOURCES if str(slot_of(parse_address(s), SPEC, 4)) != browser_slot)
    browser_joined = threading.Event()
    outcome: dict[str, Any] = {}

    async def python_side() -> None:
        member = Member(source)
        try:
            outcome["python_worker"] = await member.start(chat_with_redis, room="lobby")
            await asyncio.to_thread(browser_joined.wait, 60)
            await member.client.call("say", {"room": "lobby", "text": "hello from python"}, timeout=15)
            await wait_async(lambda: any(m["text"] == "hello from the browser" for m in member.heard), 60,
                             "the browser's message")  # fmt: skip
            outcome["heard"] = next(m for m in member.heard if m["text"] == "hello from the browser")
        finally:
            await member.stop()

    # Playwright's sync API owns this thread's event loop; the python client gets a thread of its own.
    thread = threading.Thread(target=lambda: asyncio.run(python_side()))
    thread.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(chat_with_redis + "/")
                page.wait_for_function("document.getElementById('status').textContent.startsWith('joined')")
                assert page.text_content("#status") == f"joined lobby on worker {browser_slot}"
                browser_joined.set()
                heard_python = (
                    "[...document.querySelectorAll('#log li')].some(li => li.textContent.includes('%s'))"
                )
                page.wait_for_function(heard_python % "hello from python")
                page.fill("#text", "hello from the browser")
                page.click("button")
                thread.join(60)
            finally:
                browser.close()
    finally:
        browser_joined.set()
        thread.join(60)
    assert outcome["python_worker"] != browser_slot
    assert outcome["heard"]["worker"] == browser_slot
    assert outcome["heard"]["from"] == "browser"


def test_kill_9_one_worker_mid_run(chat: str) -> None:
    async def scenario() -> None:
        members = [Member(s) for s in SOURCES[:40]]
        workers = dict(
            zip(
                members,
                await asyncio.gather(*(m.start(chat, reconnection=True) for m in members)),
                strict=True,
            )
        )
        try:
            victim_slot = workers[members[0]]
            before = {m: (await m.client.call("whoami", timeout=15))["pid"] for m in members}
            victim_pid = before[members[0]]
            os.kill(victim_pid, signal.SIGKILL)
            victims = [m for m in members if workers[m] == victim_slot]
            others = [m for m in members if workers[m] != victim_slot]

            async def back_on_new_worker(member: Member) -> bool:
                if not member.client.connected:
                    return False
                try:
                    answer = await member.client.call("whoami", timeout=2)
                except socketio.exceptions.SocketIOError:
                    return False
                return bool(answer["pid"] != victim_pid and answer["worker"] == victim_slot)

            end = asyncio.get_running_loop().time() + 60
            pending = list(victims)
            while pending:
                assert asyncio.get_running_loop().time() < end, "victims did not come back"
                pending = [m for m in pending if not await back_on_new_worker(m)]
                await asyncio.sleep(0.1)
            for member in others:
                assert member.disconnects == 0, member.source
                assert (await member.client.call("whoami", timeout=15))["pid"] == before[member]
            assert all(m.disconnects >= 1 for m in victims)
        finally:
            await asyncio.gather(*(m.stop() for m in members))

    asyncio.run(scenario())


# A socket.io client in the page (the page's own script loaded the official browser client): it
# asks which worker holds it on every connect, and forgets on disconnect.
BROWSER_CLIENT = """(transports) => {
  window.clients = window.clients || [];
  const client = { socket: io({ transports, forceNew: true }), pid: null };
  client.socket.on("connect", async () => { client.pid = (await client.socket.emitWithAck("whoami")).pid; });
  client.socket.on("disconnect", () => { client.pid = null; });
  window.clients.push(client);
}"""
BROWSER_STATE = "window.clients.map(c => [c.pid, c.socket.io.engine?.transport?.name ?? null])"


def test_browsers_come_back_promptly_on_hup_and_term() -> None:
    """Headless Chromium, socket.io-client in pages as users load them: long-polling over kept-alive
    connections, and upgraded to WebSocket. On HUP every client is on the slot's new worker promptly;
    TERM exits without waiting out pingInterval. The app registers no stop hook."""
    with launched([*chat_args()[:-1], "30"]) as instance:
        back, term, count = asyncio.run(browsers_through_hup_and_term(instance))
    print(
        f"Socket.IO, {count} Chromium clients (2/3 long-polling, 1/3 upgraded to WebSocket): on HUP all "
        f"back on the slot's new worker {back:.2f} s after it was ready; TERM exit in {term:.2f} s"
    )
    assert term < 10  # far above the figures, far below pingInterval (25 s)
    assert back < 10


async def browsers_through_hup_and_term(instance: Instance) -> tuple[float, float, int]:
    from playwright.async_api import async_playwright

    slot = str(slot_of(parse_address("127.0.0.1"), SPEC, 4))  # every page's source
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = []
            for _ in range(4):  # contexts of their own: a browser keeps 6 connections per host
                page = await (await browser.new_context()).new_page()
                await page.goto(f"http://127.0.0.1:{instance.port}/")
                for transports in (["polling"], ["polling"], ["polling", "websocket"]):
                    await page.evaluate(BROWSER_CLIENT, transports)
                pages.append(page)

            async def states() -> list[tuple[int | None, str | None]]:
                return [tuple(state) for page in pages for state in await page.evaluate(BROWSER_STATE)]

            async def all_on(kinds: set[str], unlike: int | None = None) -> bool:
                now = await states()
                return all(pid not in (None, unlike) for pid, _ in now) and {k for _, k in now} == kinds

            await wait_browsers(lambda: all_on({"polling", "websocket"}), "every client connected")
            (old,) = {pid for pid, _ in await states()}
            mark, ready_at = len(instance.output()), dict[str, float]()
            watcher = asyncio.create_task(watch_ready(instance, mark, ready_at))
            instance.signal(signal.SIGHUP)
            await wait_browsers(lambda: all_on({"polling", "websocket"}, unlike=old), "every client back")
            back = time.monotonic() - ready_at[slot]
            watcher.cancel()
            wait_for(lambda: "reload complete" in instance.output(), 30, "the reload")
            start = time.monotonic()
            instance.signal(signal.SIGTERM)
            assert await asyncio.to_thread(instance.finish) == 0
            return back, time.monotonic() - start, len(await states())
        finally:
            await browser.close()


async def wait_browsers(check: Any, what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_hup_and_term_with_clients_connected_are_prompt() -> None:
    """Each slot's clients (long-polling and WebSocket, python-socketio's defaults: connections kept
    alive) reconnect to the slot's new worker on HUP; TERM exits without waiting out the long-polls
    (pingInterval, 25 s) the workers hold. The app registers no stop hook."""
    members = [Member(s) for s in SOURCES[:40]]
    transports = [TRANSPORTS["polling"] if i % 2 else TRANSPORTS["upgrade"] for i in range(len(members))]

    async def scenario(instance: Instance) -> tuple[dict[str, float], float]:
        url = f"http://127.0.0.1:{instance.port}"
        pairs = zip(members, transports, strict=True)
        slots = await asyncio.gather(*(m.start(url, reconnection=True, transports=t) for m, t in pairs))
        assert set(slots) == {"0", "1", "2", "3"}
        kinds = {m: m.client.transport() for m in members}
        assert set(kinds.values()) == {"polling", "websocket"}
        back = await hup_and_wait_back(instance, members, slots)
        start = time.monotonic()
        instance.signal(signal.SIGTERM)
        assert await asyncio.to_thread(instance.finish) == 0
        slowest = {
            f"slot {s}": max(back[m] for m, t in zip(members, slots, strict=True) if t == s) for s in slots
        }
        for kind in ("polling", "websocket"):
            slowest[kind] = max(back[m] for m in members if kinds[m] == kind)
        return slowest, time.monotonic() - start

    async def run(instance: Instance) -> tuple[dict[str, float], float]:
        try:
            return await scenario(instance)
        finally:
            for member in members:
                if hasattr(member, "client"):
                    await asyncio.wait_for(member.client.shutdown(), 15)
                    await member.http.close()

    # The default graceful timeout (30 s): a stop that waited for the long-polls would show.
    with launched([*chat_args()[:-1], "30"]) as instance:
        slowest, term = asyncio.run(run(instance))
    print(
        f"Socket.IO, {len(members)} python-socketio clients (half long-polling, half WebSocket, "
        f"keep-alive): on HUP the last client back on its slot's new worker, after it was ready: "
        f"{', '.join(f'{k} {v:.2f} s' for k, v in sorted(slowest.items()))}; TERM exit in {term:.2f} s"
    )
    # Bounds far above the figures (see docs/how-to/socketio.md) and far below pingInterval (25 s),
    # which a client kept waiting by a stopping worker would take.
    assert term < 10
    assert max(slowest.values()) < 10


async def hup_and_wait_back(
    instance: Instance, members: list[Member], slots: list[str]
) -> dict[Member, float]:
    """HUP, then wait until every member answers from its slot's new worker; per member, seconds
    from its slot's new worker being ready to the member being back on it."""
    old = {m: (await m.client.call("whoami", timeout=15))["pid"] for m in members}
    mark = len(instance.output())
    instance.signal(signal.SIGHUP)
    ready_at: dict[str, float] = {}  # slot -> when its new worker was ready
    back_at: dict[Member, float] = {}

    async def until_moved(member: Member) -> None:  # one task each: a slow call delays no other
        while True:
            if member.client.connected:
                try:
                    answer = await member.client.call("whoami", timeout=1)
                except socketio.exceptions.SocketIOError:
                    continue
                if answer["pid"] != old[member]:
                    assert answer["worker"] == slots[members.index(member)]  # the same slot, its new worker
                    back_at[member] = time.monotonic()
                    return
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch_ready(instance, mark, ready_at))
    try:
        await asyncio.wait_for(asyncio.gather(*(until_moved(m) for m in members)), 60)
    finally:
        watcher.cancel()
    wait_for(lambda: "reload complete" in instance.output(), 30, "the reload")
    return {m: back_at[m] - ready_at[slot] for m, slot in zip(members, slots, strict=True)}
