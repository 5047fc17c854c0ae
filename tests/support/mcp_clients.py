"""MCP clients whose requests come from rotating source addresses (an agent platform's egress pool).

``official_session`` is the official SDK's client over an httpx2 client whose transport sends each
request through the next source's connection pool; ``raw_session`` speaks Streamable HTTP with
http.client, one connection per request, each from the next source.
"""

from __future__ import annotations

import http.client
import itertools
import json
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

PROTOCOL = "2025-06-18"


class RotatingTransport(httpx2.AsyncBaseTransport):
    def __init__(self, sources: list[str]) -> None:
        self.transports = [httpx2.AsyncHTTPTransport(local_address=source) for source in sources]
        self.next = itertools.cycle(self.transports)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        return await next(self.next).handle_async_request(request)

    async def aclose(self) -> None:
        for transport in self.transports:
            await transport.aclose()


async def official_session(url: str, sources: list[str], calls: int) -> list[dict[str, Any]]:
    """The structured answers of ``calls`` calls of the example's ``count`` tool in one session."""
    timeout = httpx2.Timeout(30, read=300)
    async with httpx2.AsyncClient(transport=RotatingTransport(sources), timeout=timeout) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode="legacy") as client:
            answers = []
            for _ in range(calls):
                result = await client.call_tool("count", {})
                answers.append(dict(result.structured_content or {}))
            return answers


def _post(
    port: int, source: str, message: dict[str, Any], session: str | None
) -> tuple[int, str | None, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": PROTOCOL}  # fmt: skip
    if session:
        headers["Mcp-Session-Id"] = session
    try:
        conn.request("POST", "/mcp", body=json.dumps(message), headers=headers)
        response = conn.getresponse()
        body = response.read().decode()
        data = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]
        payload = json.loads(data[-1]) if data else (json.loads(body) if body.strip() else None)
        return response.status, response.getheader("mcp-session-id"), payload
    finally:
        conn.close()


def raw_session(port: int, sources: list[str], calls: int) -> list[Any]:
    """Initialize, then ``calls`` tool calls, every request from the next source: each call's
    structured answer, or the HTTP status when it failed."""
    rotation = itertools.cycle(sources)
    hello = {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello}
    status, session, _ = _post(port, next(rotation), init, None)
    assert status == 200 and session, status
    _post(port, next(rotation), {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    answers: list[Any] = []
    for i in range(calls):
        call = {
            "jsonrpc": "2.0",
            "id": i + 1,
            "method": "tools/call",
            "params": {"name": "count", "arguments": {}},
        }
        status, _, payload = _post(port, next(rotation), call, session)
        answers.append(payload["result"]["structuredContent"] if status == 200 and payload else status)
    return answers
