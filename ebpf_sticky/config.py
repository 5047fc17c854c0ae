"""Validated launch settings: hash key, prefixes, workers, and the `Launch` they make up. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .addresses import Bind
from .errors import ConfigError
from .hashing import DEFAULT_PREFIX4, DEFAULT_PREFIX6, KEY_BYTES, MAX_SLOTS, HashSpec
from .options import WorkerOptions

DEFAULT_BIND = "127.0.0.1:8000"


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"--hash-key must be {2 * KEY_BYTES} hex digits (128 bits), e.g. from "
            "`python3 -c 'import os; print(os.urandom(16).hex())'`"
        )
    return key


def hash_spec(key: bytes, prefix4: int = DEFAULT_PREFIX4, prefix6: int = DEFAULT_PREFIX6) -> HashSpec:
    if not 0 <= prefix4 <= 32:
        raise ConfigError(f"--prefix4 must be 0..32, got {prefix4}")
    if not 0 <= prefix6 <= 128:
        raise ConfigError(f"--prefix6 must be 0..128, got {prefix6}")
    return HashSpec(key, prefix4, prefix6)


def check_workers(workers: int, most: int = MAX_SLOTS, loader: str | None = None) -> int:
    """``most`` is what the chosen loader fits (the classic-BPF program has a size limit)."""
    if not 1 <= workers <= most:
        under = f" with --loader {loader}" if most < MAX_SLOTS else ""
        raise ConfigError(f"--workers must be 1..{most}{under}, got {workers}")
    return workers


# A root master never runs app code as uid 0 unless asked (--user root): like nginx, it drops
# workers to an unprivileged user, the first of these that exists. A user of the service's own
# (useradd --system ebpf-sticky) is best: nobody is shared with other daemons, which could signal
# the workers (not trace them: workers are non-dumpable).
DEFAULT_WORKER_USERS = ("ebpf-sticky", "nobody")


def worker_user(user: str | None, master_euid: int, exists: Callable[[str], bool]) -> tuple[str | None, bool]:
    """The user workers run as (None: the master's) and whether it is the default; pure."""
    if user:
        return user, False
    if master_euid != 0:
        return None, False
    for name in DEFAULT_WORKER_USERS:
        if exists(name):
            return name, True
    raise ConfigError(
        "a root master runs workers as an unprivileged user, and neither ebpf-sticky nor nobody exists "
        "here: create one (useradd --system ebpf-sticky), or pass --user (--user root runs the app as root)"
    )


@dataclass(frozen=True)
class Launch:
    """Everything `ebpf-sticky launch` needs, validated."""

    bind: Bind
    workers: int
    spec: HashSpec
    target: str | None = None  # Python app target; None when ``command`` is given
    command: tuple[str, ...] = ()
    factory: bool = False
    udp: bool = False
    loader: str = "auto"
    graceful_timeout: float = 30.0
    uid: int | None = None
    gid: int | None = None
    default_user: bool = False  # uid/gid are the root master's default (DEFAULT_WORKER_USERS)
    pid_file: str | None = None
    log_level: str = "info"
    uvicorn: WorkerOptions = field(default_factory=WorkerOptions)
    metrics: Bind | None = None  # where /metrics is served
    session_keys: tuple[str, ...] = ()  # --session-key, validated by sessions.keys.parse_key_spec
    proxy_protocol: bool = False

    def __post_init__(self) -> None:
        self._check_sessions()
        if (self.target is None) == (not self.command):
            raise ConfigError(
                "launch takes either a TARGET (path/app.py, module:attr) or -- COMMAND: one of them"
            )
        if self.graceful_timeout < 0:
            raise ConfigError(f"--graceful-timeout must be >= 0, got {self.graceful_timeout}")
        if self.udp and self.target is not None:
            raise ConfigError("--udp serves a -- COMMAND only: uvicorn speaks TCP")
        if self.command and self.uvicorn.python_only:
            raise ConfigError(
                "uvicorn's options (TLS, --limit-max-requests, --env-file, ...) apply to a Python TARGET; "
                "a -- COMMAND configures its own server"
            )

    def _check_sessions(self) -> None:
        flag = "--session-key" if self.session_keys else "--proxy-protocol" if self.proxy_protocol else None
        if flag is None:
            return
        if self.command:
            raise ConfigError(f"{flag} works in ebpf-sticky's Python worker: give a TARGET, not -- COMMAND")
        if self.uvicorn.config.get("ssl_certfile"):
            raise ConfigError(
                f"{flag} reads each connection's first bytes, which TLS hides: terminate TLS in front "
                "(or drop --ssl-certfile)"
            )
