import os
import sys

import ebpf_sticky


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = f"{os.environ['EBPF_STICKY_WORKER']} {os.getpid()} {os.getuid()}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    sys.exit(ebpf_sticky.run(app, bind="127.0.0.1:0", workers=2, hash_key=sys.argv[1]))
