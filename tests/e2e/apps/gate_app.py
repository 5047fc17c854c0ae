"""An app whose boot and stop a test steers with files in the directory $GATE, one set per slot:
``hold-N`` makes the import wait while it exists, ``fail-N`` makes the import exit 1 (a boot
failure), ``linger-N`` makes the lifespan shutdown wait while it exists (a long graceful stop)."""

import asyncio
import os
import time
from pathlib import Path

GATE = Path(os.environ["GATE"])
SLOT = os.environ["EBPF_STICKY_WORKER"]

while (GATE / f"hold-{SLOT}").exists():
    time.sleep(0.05)
if (GATE / f"fail-{SLOT}").exists():
    os._exit(1)


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                while (GATE / f"linger-{SLOT}").exists():
                    await asyncio.sleep(0.05)
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = f"{SLOT} {os.getpid()} {os.getuid()}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
