"""sioload: Socket.IO load from many client addresses, speaking raw Engine.IO v4 over asyncio.

    python -m bench.sioload HOST PORT SCENARIO SOURCES CONCURRENCY SECONDS [--payload BYTES]

Scenarios (every connection binds a source address 127.x.y.z first, so a client's connections
share one address and a sticky router keeps them on one worker):
- ``sessions``: each of CONCURRENCY loops opens a new session on new connections: the polling
  handshake, Socket.IO's connect ("40") over polling, the WebSocket upgrade (probe, "5"), then one
  echo over the WebSocket; a session counts once that echo is back. Latency: the whole of it.
- ``websocket``: CONCURRENCY clients connect over WebSocket, then each sends an "echo" event and
  waits for it to come back, again and again. Latency: one round trip.
- ``polling``: the same over long-polling only: each round trip is a POST of the event and a GET
  that returns the echo, on two keep-alive connections from the same address.

Prints one JSON object: completed (sessions or round trips inside the measured window), errors,
elapsed, p50_us, p99_us, the commonest error messages, setup_s. Connection setup for the
websocket and polling scenarios happens before the window opens.

Why not socket.io-client: one Node socket.io-client process tops out near the rates the servers
reach, so it would measure itself. This client does no more than the protocol needs (unmasked-key
WebSocket frames, no JSON parsing on the hot path), and scripts/bench measures its ceiling against
sio_bare.js, the cheapest server that speaks the same protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .stats import percentile

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in the socket module
PATH = "/socket.io/?EIO=4&transport="
MAX_LATENCIES = 1 << 21  # latencies kept for percentiles (later ones are counted, not kept)


class ProtocolError(Exception):
    """The server answered something a working session never answers."""


def source_address(index: int) -> str:
    """The index-th address of 127.77.0.2 onwards, skipping .0 and .255 (as loadgen.c does)."""
    value = 2 + index + 2 * ((index + 1) // 254)  # each 256 values hold 254 usable ones
    if value > 0xFFFF:
        raise ValueError(f"source {index}: past 127.77.255.254")
    return socket.inet_ntoa(struct.pack("!I", (127 << 24) | (77 << 16) | value))


def ws_frame(text: bytes) -> bytes:
    """A masked client text frame. The all-zero mask key leaves the payload as it is: legal (the
    server unmasks whatever the key) and it spares this client a XOR per byte."""
    n = len(text)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\0\0\0\0" + text


def engineio_packets(body: bytes) -> list[bytes]:
    return body.split(b"\x1e")


def open_sid(packet: bytes) -> str:
    if not packet.startswith(b"0{"):
        raise ProtocolError(f"expected an open packet, got {packet[:40]!r}")
    sid: str = json.loads(packet[1:])["sid"]
    return sid


class Connection:
    """One TCP connection from a chosen source address: HTTP/1.1 keep-alive or a WebSocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int, source: str) -> Connection:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, host)

    def close(self) -> None:
        self.writer.close()

    async def _head(self) -> tuple[bytes, dict[bytes, bytes]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return lines[0][9:12], headers

    async def http(self, method: str, query: str, body: bytes = b"") -> bytes:
        extra = f"Content-Type: text/plain;charset=UTF-8\r\nContent-Length: {len(body)}\r\n" if body else ""
        self.writer.write(
            f"{method} {PATH}{query} HTTP/1.1\r\nHost: {self.host}\r\n{extra}\r\n".encode() + body
        )
        status, headers = await self._head()
        if b"content-length" in headers:
            payload = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                chunks.append((await self.reader.readexactly(size + 2))[:-2])
            await self.reader.readuntil(b"\r\n")
            payload = b"".join(chunks)
        else:
            raise ProtocolError(f"{method} {query}: HTTP {status.decode()} without a length")
        if status != b"200":
            raise ProtocolError(f"{method}: HTTP {status.decode()} {payload[:60]!r}")
        return payload

    async def upgrade(self, query: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            f"GET {PATH}{query} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        status, _ = await self._head()
        if status != b"101":
            raise ProtocolError(f"WebSocket upgrade: HTTP {status.decode()}")

    def send(self, text: bytes) -> None:
        self.writer.write(ws_frame(text))

    async def receive(self) -> bytes:
        """The next Engine.IO packet; answers Engine.IO and WebSocket pings on the way."""
        while True:
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ProtocolError("WebSocket closed by the server")
            if opcode == 0x9:
                self.writer.write(bytes([0x8A, 0x80 | length]) + b"\0\0\0\0" + payload)
            elif payload == b"2":
                self.send(b"3")
            elif opcode in (0x1, 0x2):
                return payload

    async def receive_event(self) -> bytes:
        """Skip noops and the like until a Socket.IO event ("42...") arrives."""
        while not (packet := await self.receive()).startswith(b"42"):
            pass
        return packet


class Load:
    """Shared state of one run: where to connect, sources handed out in turn, counters."""

    def __init__(self, host: str, port: int, sources: int, payload: int) -> None:
        self.host, self.port = host, port
        self.sources = [source_address(i) for i in range(sources)]
        self.next_source = 0
        self.event = b'42["echo","' + b"x" * payload + b'"]'
        self.connected = 0  # clients set up and waiting for the window to open
        self.measuring = False
        self.deadline = float("inf")
        self.completed = 0
        self.errors: Counter[str] = Counter()
        self.latencies_us: list[int] = []

    def source(self) -> str:
        source = self.sources[self.next_source]
        self.next_source = (self.next_source + 1) % len(self.sources)
        return source

    def connect(self, source: str) -> Awaitable[Connection]:
        return Connection.open(self.host, self.port, source)

    def record(self, started: float, now: float) -> None:
        if self.measuring and now < self.deadline:
            self.completed += 1
            if len(self.latencies_us) < MAX_LATENCIES:
                self.latencies_us.append(int((now - started) * 1e6))

    def error(self, exc: BaseException) -> None:
        if self.measuring:
            self.errors[f"{type(exc).__name__}: {exc}"[:100]] += 1


async def polling_session(load: Load, source: str) -> tuple[Connection, Connection, str]:
    """Handshake and Socket.IO connect over long-polling: (GET connection, POST connection, sid)."""
    get = await load.connect(source)
    post = None
    try:
        sid = open_sid(await get.http("GET", "polling"))
        post = await load.connect(source)
        if (await post.http("POST", f"polling&sid={sid}", b"40")).lower() != b"ok":
            raise ProtocolError("POST 40 not answered ok")
        if not (await get.http("GET", f"polling&sid={sid}")).startswith(b"40"):
            raise ProtocolError("no connect packet after 40")
        return get, post, sid
    except BaseException:
        get.close()
        if post:
            post.close()
        raise


async def sessions(load: Load) -> None:
    while time.monotonic() < load.deadline:
        started = time.monotonic()
        conns: list[Connection] = []
        try:
            source = load.source()
            get, post, sid = await polling_session(load, source)
            conns += [get, post]
            ws = await load.connect(source)
            conns.append(ws)
            await ws.upgrade(f"websocket&sid={sid}")
            ws.send(b"2probe")
            if await ws.receive() != b"3probe":
                raise ProtocolError("no 3probe")
            ws.send(b"5")
            ws.send(load.event)
            await ws.receive_event()
            load.record(started, time.monotonic())
        except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as exc:
            load.error(exc)
        finally:
            for conn in conns:
                conn.close()


async def websocket_client(load: Load, source: str, ready: asyncio.Event) -> None:
    ws: Connection | None = None
    while time.monotonic() < load.deadline:
        try:
            if ws is None:
                ws = await load.connect(source)
                await ws.upgrade("websocket")
                open_sid(await ws.receive())
                ws.send(b"40")
                if not (await ws.receive()).startswith(b"40"):
                    raise ProtocolError("no connect packet after 40")
                if not ready.is_set():
                    load.connected += 1
                    await ready.wait()
            started = time.monotonic()
            ws.send(load.event)
            await ws.receive_event()
            load.record(started, time.monotonic())
        except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as exc:
            load.error(exc)
            if ws:
                ws.close()
            ws = None
    if ws:
        ws.close()


async def polling_client(load: Load, source: str, ready: asyncio.Event) -> None:
    conns: tuple[Connection, Connection, str] | None = None
    while time.monotonic() < load.deadline:
        try:
            if conns is None:
                conns = await polling_session(load, source)
                if not ready.is_set():
                    load.connected += 1
                    await ready.wait()
            get, post, sid = conns
            started = time.monotonic()
            if (await post.http("POST", f"polling&sid={sid}", load.event)).lower() != b"ok":
                raise ProtocolError("POST not answered ok")
            while True:
                packets = engineio_packets(await get.http("GET", f"polling&sid={sid}"))
                if b"2" in packets:  # Engine.IO ping: answer, keep waiting for the echo
                    await post.http("POST", f"polling&sid={sid}", b"3")
                if any(p.startswith(b"42") for p in packets):
                    break
            load.record(started, time.monotonic())
        except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as exc:
            load.error(exc)
            if conns:
                conns[0].close()
                conns[1].close()
            conns = None
    if conns:
        conns[0].close()
        conns[1].close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    load = Load(args.host, args.port, args.sources, args.payload)
    started = time.monotonic()
    ready = asyncio.Event()
    tasks: list[asyncio.Task[None]]
    if args.scenario == "sessions":
        load.measuring, load.deadline = True, started + args.seconds
        tasks = [asyncio.create_task(sessions(load)) for _ in range(args.concurrency)]
        setup_s = 0.0
    else:
        client: Callable[[Load, str, asyncio.Event], Coroutine[Any, Any, None]] = (
            websocket_client if args.scenario == "websocket" else polling_client
        )
        # Connections are set up before the window; a client that cannot connect within the
        # setup deadline counts as an error.
        load.deadline = started + args.setup_timeout + args.seconds
        tasks = [asyncio.create_task(client(load, load.source(), ready)) for _ in range(args.concurrency)]
        while load.connected < args.concurrency and time.monotonic() < started + args.setup_timeout:
            await asyncio.sleep(0.01)
        setup_s = time.monotonic() - started
        started = time.monotonic()
        load.measuring, load.deadline = True, started + args.seconds
        ready.set()
    await asyncio.wait(tasks, timeout=args.seconds + args.setup_timeout + 30)
    elapsed = min(time.monotonic(), load.deadline) - started
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks, return_exceptions=True)
    load.latencies_us.sort()
    return {
        "completed": load.completed,
        "errors": sum(load.errors.values()),
        "error_kinds": dict(load.errors.most_common(3)),
        "elapsed": round(elapsed, 4),
        "p50_us": percentile(load.latencies_us, 0.5),
        "p99_us": percentile(load.latencies_us, 0.99),
        "setup_s": round(setup_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sioload")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("scenario", choices=["sessions", "websocket", "polling"])
    parser.add_argument("sources", type=int)
    parser.add_argument("concurrency", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--payload", type=int, default=64, help="bytes of text in each echo event")
    parser.add_argument("--setup-timeout", type=float, default=30.0)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
