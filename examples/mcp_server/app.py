"""A stateful MCP server over Streamable HTTP (the official ``mcp`` SDK), for session affinity.

    ebpf-sticky launch examples/mcp_server/app.py -w 4 --session-key mcp

The SDK keeps each MCP session in the memory of the process that created it: the initialize
response carries an ``Mcp-Session-Id``, and a later request with that id reaching any other
worker is answered ``404 Session not found``. Address hashing keeps a client whose address is
stable on one worker; ``--session-key mcp`` also keeps one whose address changes (NAT pools,
agent platforms with rotating egress, proxies with pooled connections).

The ``count`` tool makes affinity visible: it counts the calls of its session in this process and
answers with the worker's pid, so a session that stays put sees 1, 2, 3... from one pid:

    from mcp import Client

    async with Client("http://127.0.0.1:8000/mcp", mode="legacy") as client:
        await client.call_tool("count", {})   # structured: {"pid": 4242, "session": "9f..", "count": 1}

Sessions belong to the initialize handshake (protocol versions up to 2025-11-25: ``mode="legacy"``
in SDK 2.x, every SDK 1.x client, most other SDKs). A client speaking the 2026-07-28 protocol sends
stateless requests: nothing to keep, each call counts alone and any worker may answer it.

Served at ``/mcp``. The SDK's DNS-rebinding guard admits Host headers of 127.0.0.1, localhost and
[::1] (any port) only; put another host in ``TransportSecuritySettings`` to serve it elsewhere.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

# The SDK forgets a session after 30 idle minutes; this keeps the most recent counts only.
MAX_SESSIONS = 10_000

server = MCPServer("sticky-counter")
calls: OrderedDict[str, int] = OrderedDict()


@server.tool()
def count(ctx: Context[Any, Any]) -> dict[str, Any]:
    """Count this session's calls; answer with the pid of the worker holding the session."""
    # A stateless (2026-era) request carries no session id: each such call counts alone.
    session = (ctx.headers or {}).get("mcp-session-id") or ""
    calls[session] = calls.pop(session, 0) + 1
    if len(calls) > MAX_SESSIONS:
        calls.popitem(last=False)
    return {"pid": os.getpid(), "session": session, "count": calls[session] if session else 1}


app = server.streamable_http_app()
