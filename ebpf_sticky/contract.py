"""The contract between the master and its workers: what each side may rely on of the other.

Both sides import it and nothing else of each other (as h11's ``_events.py`` is shared by both
ends of a connection). A worker is any process the master execs on a slot:

* **fd 3** is the slot's listening socket, owned by the master for the life of the group
  (systemd's socket-activation convention: ``LISTEN_FDS=1``, ``LISTEN_PID``, ``LISTEN_FDNAMES``).
* **Environment**: ``EBPF_STICKY_WORKER`` is the slot number; ``NOTIFY_SOCKET`` is the master's
  notify socket (a datagram socket; the kernel stamps each sender's pid).
* **Messages** over the notify socket, sd_notify style: ``READY=1`` once serving; ``RECYCLE=1``
  once the worker served its ``--limit-max-requests`` (the master starts its successor first);
  a load-error report (below) before exiting with ``APP_LOAD_ERROR``.
* **Exit statuses**: ``APP_LOAD_ERROR`` (4) when the app cannot be loaded, which is never worth
  retrying; ``EXIT_LOCKDOWN`` (71, EX_OSERR) when the child could not be locked down before exec.
* Our own Python worker also reads its uvicorn options (JSON) from ``OPTIONS_ENV``.
* With ``--session-key`` or ``--proxy-protocol`` only (our Python worker): fd 4 is the session
  table (a memfd the master creates: issued-key ownership, live slot count, per-slot counters),
  fd 5 this slot's handoff receive end, fds 6.. the handoff send ends of slots 0, 1, ... (unix
  datagram socketpairs the master keeps, so a handoff queued for a slot outlives its worker), and
  ``SESSIONS_ENV`` carries the session settings (JSON; the routing key only when an address key
  needs it).
"""

from __future__ import annotations

import json

LISTEN_FD = 3
LISTEN_FDNAME = "ebpf-sticky"
WORKER_ENV = "EBPF_STICKY_WORKER"
# The master hands each worker its uvicorn options here (JSON), not in argv: argv is world-readable
# in /proc and may carry the key's password.
OPTIONS_ENV = "EBPF_STICKY_WORKER_OPTIONS"

# The session layer's fds and settings (see the docstring); absent without its flags.
SESSION_TABLE_FD = 4
HANDOFF_RECV_FD = 5
HANDOFF_SEND_FD0 = 6
SESSIONS_ENV = "EBPF_STICKY_WORKER_SESSIONS"

READY = "READY=1"
# What a worker tells the master once it has served its --limit-max-requests.
RECYCLE = "RECYCLE=1"

# The worker's exit code when it cannot load the app: deterministic, so never worth retrying.
APP_LOAD_ERROR = 4
# A child that could not be locked down exits with this status before exec (EX_OSERR).
EXIT_LOCKDOWN = 71

# Load-error reports. Every worker imports the app itself; when the import fails they all fail
# the same way. Each sends its error over the notify socket instead of printing it, and the
# master prints each distinct error once.
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
