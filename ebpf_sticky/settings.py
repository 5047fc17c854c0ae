"""The one way in: `ebpf-sticky launch` and ``ebpf_sticky.run()`` both build their `Launch` here.

The CLI hands over what argparse parsed, ``run()`` its keywords; neither renders the other's
form. Everything is checked here or below (``config``, ``options``, ``targets``), so a bad value
is the same ``ConfigError`` on both paths: the CLI prints it as one line, ``run()`` raises it.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence

from . import config
from .addresses import parse_bind
from .config import Launch
from .errors import ConfigError
from .hashing import DEFAULT_PREFIX4, DEFAULT_PREFIX6
from .kernel.loaders import CHOICES, max_slots
from .options import WorkerOptions

ENV_PREFIX = "EBPF_STICKY_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def env_twin(name: str, default: str | None = None) -> str | None:
    """The EBPF_STICKY_* twin of option ``name`` (``hash-key`` → ``EBPF_STICKY_HASH_KEY``)."""
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def user_ids(user: str | None, group: str | None) -> tuple[int | None, int | None, bool]:
    """(uid, gid, whether they are a root master's default) of ``--user``/``--group`` (names or
    numbers). Empty means unset, so ``-e EBPF_STICKY_USER=`` lifts an image's user (a root master
    then uses its default)."""
    user, default = config.worker_user(user, os.geteuid(), user_exists)
    uid = gid = None
    if user:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise ConfigError(f"--user {user!r}: no such user on this machine") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = (grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))).gr_gid
        except KeyError:
            raise ConfigError(f"--group {group!r}: no such group on this machine") from None
    if (uid, gid) == (os.geteuid(), os.getegid()):
        return None, None, False  # the master's own ids (--user root for a root master): no switch
    return uid, gid, default


def _whole(name: str, value: object) -> int:
    # bool is an int to Python, never a count to a user.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"--{name} must be a whole number, got {value!r}")
    return value


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def launch_settings(
    *,
    target: str | None,
    command: Sequence[str] = (),
    bind: str = config.DEFAULT_BIND,
    workers: int | None = None,
    udp: bool = False,
    loader: str = "auto",
    factory: bool = False,
    graceful_timeout: float = 30.0,
    user: str | None = None,
    group: str | None = None,
    pid_file: str | None = None,
    metrics: str | None = None,
    log_level: str = "info",
    hash_key: str | None = None,
    prefix4: int = DEFAULT_PREFIX4,
    prefix6: int = DEFAULT_PREFIX6,
    uvicorn: WorkerOptions | None = None,
    session_keys: Sequence[str] = (),
    proxy_protocol: bool = False,
) -> Launch:
    """The validated `Launch`; raises ``ConfigError`` naming the option and the fix."""
    from .sessions.keys import parse_key_spec
    from .targets import check_target_exists, parse_target

    uvicorn = uvicorn or WorkerOptions()
    loader = _choice("loader", loader, CHOICES)
    if target is not None and not command:
        check_target_exists(parse_target(target), uvicorn.app_dir)
    if not isinstance(graceful_timeout, (int, float)) or isinstance(graceful_timeout, bool):
        raise ConfigError(f"--graceful-timeout must be a number of seconds, got {graceful_timeout!r}")
    for text in session_keys:
        parse_key_spec(text)  # raises ConfigError naming the forms
    uid, gid, default_user = user_ids(user, group)
    key = config.parse_key(hash_key) if hash_key else os.urandom(16)
    count = default_workers() if workers is None else _whole("workers", workers)
    return config.Launch(
        bind=parse_bind(bind),
        workers=config.check_workers(count, max_slots(loader), loader),
        spec=config.hash_spec(key, _whole("prefix4", prefix4), _whole("prefix6", prefix6)),
        target=target,
        command=tuple(command),
        factory=factory,
        udp=udp,
        loader=loader,
        graceful_timeout=float(graceful_timeout),
        uid=uid,
        gid=gid,
        default_user=default_user,
        pid_file=pid_file,
        log_level=_choice("log-level", log_level, LOG_LEVELS),
        metrics=parse_bind(metrics, "--metrics") if metrics else None,
        uvicorn=uvicorn,
        session_keys=tuple(session_keys),
        proxy_protocol=bool(proxy_protocol),
    )
