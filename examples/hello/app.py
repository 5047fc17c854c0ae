"""A demo ASGI app: answers which worker served you, so stickiness is visible with curl.

    ebpf-sticky launch examples/hello/app.py --workers 4
    curl --interface 127.0.0.2 http://127.0.0.1:8000/    # same worker every time
    curl --interface 127.0.0.3 http://127.0.0.1:8000/    # maybe another one, but always that one

or run this file: `python examples/hello/app.py` does the same through ebpf_sticky.run().
"""

import os
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    client = scope["client"][0] if scope.get("client") else "?"
    body = f"client {client} -> worker slot {os.environ['EBPF_STICKY_WORKER']} (pid {os.getpid()})\n"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})


if __name__ == "__main__":
    import ebpf_sticky

    raise SystemExit(ebpf_sticky.run(app, workers=4))
