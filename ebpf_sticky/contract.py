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
* Our own Python worker starts as ``python -c WORKER_BOOT`` (non-dumpable first), and reads its
  uvicorn options (JSON) once from ``OPTIONS_FD`` and closes it.
* **What a worker may not do** to fd 3 (the seccomp filter, ``kernel/seccomp.py``): take it out of
  the group (``shutdown``, ``connect``), nor, for our Python worker, duplicate it.
* **What a worker never gets**: the master's ``EBPF_STICKY_*`` variables (its settings, among them
  the hash key and the TLS key's password); workers get the rest of the master's environment.
* With ``--session-key`` or ``--proxy-protocol`` only (our Python worker): fd 5 is the session
  table (a memfd the master creates: issued-key ownership, live slot count, per-slot counters),
  fd 6 this slot's handoff receive end, fds 7.. the handoff send ends of slots 0, 1, ... (unix
  datagram socketpairs the master keeps, so a handoff queued for a slot outlives its worker); the
  session settings travel in the options channel beside the uvicorn options (the routing key only
  when an address key needs it).
"""

from __future__ import annotations

import json

LISTEN_FD = 3
LISTEN_FDNAME = "ebpf-sticky"
WORKER_ENV = "EBPF_STICKY_WORKER"
# The master hands our Python worker its uvicorn options (JSON, which may hold the TLS key's
# password) in a memfd on this fd; the worker reads it once and closes it. Not argv, which every
# local user reads in /proc; not the environment, which /proc/PID/environ keeps as it was at exec
# even after the worker pops the variable.
OPTIONS_FD = 4
OPTIONS_FDNAME = "ebpf-sticky-options"
# Every variable of the master's with this prefix is its own setting, kept from workers.
MASTER_ENV_PREFIX = "EBPF_STICKY_"

# Our Python worker's entry point, run as ``python -c WORKER_BOOT TARGET ...``. After exec a process
# is dumpable again, and until it says otherwise any process of its uid (every other daemon of
# --user nobody) may ptrace it or take its fds with pidfd_getfd, fd 3 included: so the first thing
# it does, before importing the package (half a second on a loaded machine), is
# prctl(PR_SET_DUMPABLE, 0). It fails closed.
WORKER_MODULE = "ebpf_sticky.supervisor.worker"
WORKER_BOOT = (
    "import ctypes\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0):\n"  # PR_SET_DUMPABLE
    "    raise SystemExit('ebpf-sticky worker: prctl(PR_SET_DUMPABLE, 0) failed: not starting')\n"
    "import runpy\n"
    f"runpy.run_module({WORKER_MODULE!r}, run_name='__main__', alter_sys=True)\n"
)

# The session layer's fds (see the docstring); absent without its flags.
SESSION_TABLE_FD = 5
HANDOFF_RECV_FD = 6
HANDOFF_SEND_FD0 = 7


def encode_channel(options: str, sessions: str | None) -> bytes:
    """What the master writes on ``OPTIONS_FD``: the uvicorn options and, with the session layer
    on, its settings (both JSON texts)."""
    return json.dumps({"uvicorn": options, "sessions": sessions}).encode()


def decode_channel(data: bytes) -> tuple[str, str | None]:
    """(uvicorn options, session settings or None) from what ``encode_channel`` wrote."""
    document = json.loads(data)
    sessions = document["sessions"]
    return str(document["uvicorn"]), None if sessions is None else str(sessions)


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
