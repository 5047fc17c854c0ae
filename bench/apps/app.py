"""The one Python ASGI worker every router in scripts/bench puts in front of its clients."""

import os
from typing import Any

WORKER = os.environ.get("EBPF_STICKY_WORKER") or os.environ.get("WORKER_ID", "0")
BODY = f"{WORKER}\n".encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})
