import os
import secrets
import time


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    """GET /login opens a session (its id in an x-session response header and a sid cookie);
    every answer names the slot and pid that served it, and the path it answers (x-path)."""
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"x-path", scope["path"].encode())]
    if scope["path"] == "/block":
        # A handler that blocks the worker's loop: what a client sends meanwhile is read after
        # the response is complete, in the same turn of the loop.
        print(f"blocking {scope['query_string'].decode()}", flush=True)
        time.sleep(2)
    if scope["path"] == "/login":
        session = secrets.token_hex(16).encode()
        headers += [(b"x-session", session), (b"set-cookie", b"sid=" + session + b"; Path=/; HttpOnly")]
    body = f"{os.environ['EBPF_STICKY_WORKER']} {os.getpid()}\n".encode()
    if scope["path"] == "/download":
        # A body whose second write looks like a response head creating a session (a file a user
        # uploaded, say): it must not be learnt as one.
        forged = b"HTTP/1.1 200 OK\r\nx-session: " + scope["query_string"] + b"\r\n\r\n"
        headers.append((b"content-length", str(len(body) + len(forged)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": forged})
        return
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
