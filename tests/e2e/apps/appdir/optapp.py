"""Shows what a worker's uvicorn options did: importable only with --app-dir appdir."""

import contextlib
import json
import os

WORKER = "EBPF_STICKY_WORKER"


def fd_links() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own fd, closed by now
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return links


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = json.dumps(
        {
            "slot": os.environ["EBPF_STICKY_WORKER"],
            "greeting": os.environ.get("GREETING"),  # from --env-file
            "root_path": scope.get("root_path"),
            # What app code could find of the master's settings: none of its variables, no fd.
            "master_settings_in_env": sorted(
                name
                for name in os.environ
                if name.startswith("EBPF_STICKY_") and name != "EBPF_STICKY_WORKER"
            ),
            "options_fd_open": any("ebpf-sticky-options" in link for link in fd_links()),
        }
    ).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})
