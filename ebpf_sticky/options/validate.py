"""Parsed arguments to validated ``WorkerOptions``: pure (``from_args`` adds the file checks)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from ..errors import ConfigError
from .files import check_files
from .model import Reload, WorkerOptions
from .table import DEFAULT_BACKLOG, DEFAULT_JITTER_SHARE, DEFAULT_RELOAD_DELAY, OPTIONS


def _list(args: argparse.Namespace, dest: str) -> list[str]:
    given: list[str] | None = getattr(args, dest)
    return given if given is not None else list(getattr(args, f"_{dest}_env") or [])


def _positive(name: str, value: float | None, minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum:g}, got {value:g}")


def from_args(args: argparse.Namespace) -> WorkerOptions:
    """The validated options; every file they name is checked too (``check_files``), and the
    password file is read here, by the master."""
    options = parse(args)
    if args.ssl_keyfile_password_file is not None:
        password = read_password(args.ssl_keyfile_password_file)
        options = replace(options, config={**options.config, "ssl_keyfile_password": password})
    check_files(options)
    return options


def read_password(path: str) -> str:
    """The first line of ``path``, without its line ending."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"--ssl-keyfile-password-file {path!r}: {exc.strerror}") from None


def parse(args: argparse.Namespace) -> WorkerOptions:
    """Validate the parsed options: pure, files are not looked at."""
    config: dict[str, Any] = {}
    for option in OPTIONS:
        if option.where != "config":
            continue
        value = _list(args, option.dest) if option.kind == "list" else getattr(args, option.dest)
        if value is None or value == []:
            continue
        config[option.config_keyword] = value
    for name in (
        "ws-max-size",
        "ws-max-queue",
        "limit-concurrency",
        "limit-max-requests",
        "backlog",
        "h11-max-incomplete-event-size",
    ):
        _positive(name, getattr(args, name.replace("-", "_")))
    for name in (
        "ws-ping-interval",
        "ws-ping-timeout",
        "timeout-keep-alive",
        "limit-max-requests-jitter",
        "reload-delay",
    ):
        _positive(name, getattr(args, name.replace("-", "_")), 0)
    if "headers" in config:
        config["headers"] = [_header(text) for text in config["headers"]]
    if config.get("http2") and config.get("http") != "zttp":
        raise ConfigError("--http2 needs --http zttp")
    if args.ssl_keyfile_password_file is not None:
        if "ssl_keyfile_password" in config:
            raise ConfigError("give the key's password once: --ssl-keyfile-password or its file, not both")
        if "ssl_keyfile" not in config:
            raise ConfigError("--ssl-keyfile-password-file takes effect only with --ssl-keyfile")
    if "ssl_keyfile" in config and "ssl_certfile" not in config:
        raise ConfigError("--ssl-keyfile needs --ssl-certfile too (the certificate the key belongs to)")
    ssl_given = [k for k in config if k.startswith("ssl_") and k not in ("ssl_certfile", "ssl_keyfile")]
    if ssl_given and "ssl_certfile" not in config:
        flag = "--" + ssl_given[0].replace("_", "-")
        raise ConfigError(f"{flag} takes effect only with --ssl-certfile (TLS is off without a certificate)")
    limit = args.limit_max_requests
    jitter = args.limit_max_requests_jitter
    if jitter is None:
        jitter = int(limit * DEFAULT_JITTER_SHARE) if limit else 0
    reload = None
    reload_lists = {name: _list(args, name) for name in ("reload_dir", "reload_include", "reload_exclude")}
    if args.reload:
        reload = Reload(
            dirs=tuple(reload_lists["reload_dir"]),
            includes=tuple(reload_lists["reload_include"]),
            excludes=tuple(reload_lists["reload_exclude"]),
            delay=DEFAULT_RELOAD_DELAY if args.reload_delay is None else args.reload_delay,
        )
    elif any(reload_lists.values()) or args.reload_delay is not None:
        raise ConfigError("--reload-dir/--reload-include/--reload-exclude/--reload-delay need --reload")
    return WorkerOptions(
        config=config,
        env_file=args.env_file,
        app_dir=args.app_dir,
        interface=args.interface or "auto",
        limit_max_requests=limit,
        limit_max_requests_jitter=jitter,
        backlog=DEFAULT_BACKLOG if args.backlog is None else args.backlog,
        reload=reload,
    )


def _header(text: str) -> list[str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"--header {text!r}: expected NAME:VALUE, e.g. 'X-Frame-Options: DENY'")
    return [name.strip(), value.strip()]
