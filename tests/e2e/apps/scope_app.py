"""Answers every request with the connection's addresses as its scope gives them; ``/stream``
sends its head, then holds the body for a minute."""

import asyncio
import json


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = json.dumps({"server": scope["server"], "client": scope["client"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers[:1]})
        await asyncio.sleep(60)
    else:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
