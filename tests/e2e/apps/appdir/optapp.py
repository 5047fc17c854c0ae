"""Shows what a worker's uvicorn options did: importable only with --app-dir appdir."""

import json
import os


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = json.dumps(
        {
            "slot": os.environ["EBPF_STICKY_WORKER"],
            "greeting": os.environ.get("GREETING"),  # from --env-file
            "root_path": scope.get("root_path"),
            "options_left_in_env": "EBPF_STICKY_WORKER_OPTIONS" in os.environ,
        }
    ).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})
