"""What a worker that cannot load the app tells the master, so the master shows it once.

Every worker imports the app itself; when the import fails they all fail the same way. Each sends
its error over the notify socket (the one READY=1 goes to, so the kernel stamps the sender's pid)
instead of printing it, and the master prints each distinct error once.
"""

from __future__ import annotations

import json

LOAD_ERROR_PREFIX = b"EBPF_STICKY_LOAD_ERROR="
MAX_REPORT = 65536  # one datagram; a longer traceback keeps its end, where the cause is


def encode_load_error(summary: str, detail: str) -> str:
    """The datagram text, at most ``MAX_REPORT`` bytes (JSON is ASCII here: characters are bytes)."""
    while True:
        text = LOAD_ERROR_PREFIX.decode() + json.dumps({"summary": summary, "detail": detail})
        excess = len(text) - MAX_REPORT
        if excess <= 0:
            return text
        detail = "...\n" + detail[excess + 8 :]


def parse_load_error(data: bytes) -> tuple[str, str] | None:
    """(summary, detail) from a worker's report; None if it is not one."""
    try:
        report = json.loads(data[len(LOAD_ERROR_PREFIX) :])
        return str(report["summary"]), str(report["detail"])
    except (ValueError, KeyError, TypeError):
        return None
