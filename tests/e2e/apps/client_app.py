import os


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    """Which slot answered, and the client address the app was given."""
    if scope["type"] != "http":
        return
    body = f"{os.environ['EBPF_STICKY_WORKER']} {scope['client'][0]}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
