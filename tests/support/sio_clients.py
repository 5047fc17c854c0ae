"""Swarms of real Socket.IO clients, each from its own source address.

Python clients use python-socketio over an aiohttp session bound to the source. The swarms open a
new connection for every HTTP request (force_close), so each long-polling request is routed afresh,
as behind a proxy or with browsers' connection churn; chat members (``Member``) run as users run
them: python-socketio's defaults, connections kept alive. Node clients use the npm socket.io-client
with an http.Agent (https.Agent for https URLs) bound to the source.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import socketio

SWARM_JS = Path(__file__).parents[1] / "e2e" / "sio_swarm.js"
# Debian's chromium, headless under Playwright, as root and without the network chatter.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@dataclass
class SwarmResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    workers: dict[str, str] = field(default_factory=dict)  # source → worker slot
    hosts: dict[str, str] = field(default_factory=dict)  # source → host (the app's HOSTNAME)


def session_for(
    source: str, tls: ssl.SSLContext | None = None, force_close: bool = True
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=force_close, ssl=tls or True)
    return aiohttp.ClientSession(connector=connector)


async def round_trips(
    client: socketio.AsyncClient, url: str, transports: list[str], rounds: int, timeout: float
) -> list[dict[str, Any]]:
    """Connect ``client``, then ``rounds`` whoami calls: their answers. Raises when a WebSocket
    upgrade was asked for and the session is still polling."""
    # Bounded from outside too: a failed polling connect otherwise disconnects gracefully, which
    # waits out the pending long-poll (pingInterval, 25 s).
    await asyncio.wait_for(client.connect(url, transports=transports, wait_timeout=timeout), timeout)
    answers = [await client.call("whoami", timeout=timeout) for _ in range(rounds)]
    if "websocket" in transports and client.transport() != "websocket":
        raise AssertionError(f"still on {client.transport()} after {rounds} round trips")
    return answers


async def _one(
    url: str,
    source: str,
    transports: list[str],
    rounds: int,
    timeout: float,
    result: SwarmResult,
    tls: ssl.SSLContext | None,
) -> None:
    async with session_for(source, tls) as http:
        client = socketio.AsyncClient(http_session=http, reconnection=False, request_timeout=timeout)
        try:
            answers = await round_trips(client, url, transports, rounds, timeout)
            answered = {(answer["host"], answer["worker"]) for answer in answers}
            if len(answered) != 1:
                raise AssertionError(f"session answered from (host, worker) {sorted(answered)}")
            result.ok += 1
            result.hosts[source], result.workers[source] = answered.pop()
        except Exception as exc:
            result.failed += 1
            result.errors.append(f"{source}: {type(exc).__name__}: {exc}")
        finally:
            # abort: python-engineio's polling client otherwise waits for the pending long-poll
            # (up to pingInterval, 25 s) before its graceful disconnect returns.
            await client.eio.disconnect(abort=True)


def python_swarm(
    url: str,
    sources: list[str],
    transports: list[str],
    rounds: int = 4,
    timeout: float = 15,
    tls: ssl.SSLContext | None = None,
) -> SwarmResult:
    result = SwarmResult()

    async def main() -> None:
        await asyncio.gather(*(_one(url, s, transports, rounds, timeout, result, tls) for s in sources))

    asyncio.run(main())
    return result


def node_swarm(
    url: str,
    sources: list[str],
    transports: list[str],
    rounds: int = 4,
    timeout: float = 15,
    ca_file: str | None = None,
) -> SwarmResult:
    """``ca_file``: a CA Node trusts besides its own (NODE_EXTRA_CA_CERTS), for https URLs."""
    env = {**os.environ, **({"NODE_EXTRA_CA_CERTS": ca_file} if ca_file else {})}
    proc = subprocess.run(
        ["node", str(SWARM_JS), url, ",".join(transports), str(rounds), str(int(timeout * 1000)), *sources],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SWARM_JS.parents[2],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return SwarmResult(data["ok"], data["failed"], data["errors"], data["workers"], data["hosts"])


class Member:
    """A chat client from one source address that records what it hears: python-socketio's
    AsyncClient with its defaults (keep-alive connections, reconnection delays)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.heard: list[dict[str, Any]] = []
        self.heard_at: list[float] = []  # time.monotonic() of each message heard
        self.disconnects = 0

    async def start(
        self, url: str, room: str = "all", reconnection: bool = False, transports: list[str] | None = None
    ) -> str:
        self.http = session_for(self.source, force_close=False)
        self.client = socketio.AsyncClient(http_session=self.http, reconnection=reconnection)
        self.client.on("message", self._heard)
        self.client.on("disconnect", self._disconnected)
        await self.client.connect(url, transports=transports or ["polling", "websocket"], wait_timeout=15)
        await self.client.call("join", {"room": room, "name": self.source}, timeout=15)
        self.home: dict[str, Any] = await self.client.call("whoami", timeout=15)
        return str(self.home["worker"])

    def _heard(self, message: dict[str, Any]) -> None:
        self.heard_at.append(time.monotonic())
        self.heard.append(message)

    def _disconnected(self, *args: Any) -> None:
        self.disconnects += 1

    async def stop(self) -> None:
        await self.client.eio.disconnect(abort=True)
        await self.http.close()


async def wait_async(predicate: Any, timeout: float, what: str) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
