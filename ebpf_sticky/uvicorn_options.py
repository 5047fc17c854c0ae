"""uvicorn's own options on `ebpf-sticky launch`: their definitions, validation, and where each goes.

A uvicorn user swaps `uvicorn app:app --workers 4 --ssl-certfile …` for `ebpf-sticky launch app:app
--workers 4 --ssl-certfile …`: every uvicorn option that means something per worker keeps uvicorn's
name, meaning and default (two exceptions: ``ACCESS_LOG``, ``DEFAULT_JITTER_SHARE``). Each goes to one of
three places:

* ``config``: a keyword of each worker's ``uvicorn.Config`` (passed only when given, so the
  installed uvicorn's own default applies otherwise);
* ``worker``: done by our worker around uvicorn (the env file and app dir before the import, the
  request count behind recycling);
* ``master``: done by the master (the listen backlog, the reloader, ``--host``/``--port``).

``LEFT_OUT`` names each uvicorn option deliberately absent, with the reason; a test holds it against
the installed ``uvicorn --help``. Parsing and mapping here are pure; ``check_files`` and
``check_tls`` read the files named, in the master, before any worker starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# uvicorn's defaults where we must know them (the rest are uvicorn's business).
DEFAULT_BACKLOG = 2048
DEFAULT_RELOAD_DELAY = 0.25
# The one default that differs from uvicorn's: its access log (a line per request, written
# synchronously) halved the new-connection rate of 4 workers here (0.40-0.53x); --access-log turns it on.
ACCESS_LOG = False
# Without an explicit --limit-max-requests-jitter, each worker draws up to this share of the limit
# more, so workers that started together do not all ask to be replaced at once.
DEFAULT_JITTER_SHARE = 0.1

LEFT_OUT: dict[str, str] = {
    "--uds": "a unix socket has no client address to route by",
    "--fd": "the master creates every slot's socket and hands it to its worker as fd 3",
    "--timeout-worker-healthcheck": "uvicorn's own process manager pings its workers; the ebpf-sticky "
    "master watches them with waitpid and sd_notify readiness instead",
    "--version": "`ebpf-sticky --version` prints both versions",
}

LOOPS = ("auto", "asyncio", "uvloop", "zuvloop")
HTTPS = ("auto", "h11", "httptools", "zttp")
WSS = ("auto", "none", "websockets", "websockets-sansio", "wsproto")
# The modules each choice imports, to say "not installed" in the master rather than in every worker.
_NEEDS = {
    "uvloop": "uvloop",
    "zuvloop": "zuvloop",
    "httptools": "httptools",
    "zttp": "zttp",
    "websockets": "websockets",
    "websockets-sansio": "websockets",
    "wsproto": "wsproto",
}


@dataclass(frozen=True)
class Option:
    flag: str
    kind: str  # int, float, str, choice, switch (--x/--no-x), bool (takes true/false), list (repeatable)
    where: str  # config, worker or master
    help: str
    choices: tuple[str, ...] = ()
    keyword: str = ""  # the uvicorn.Config keyword, when it differs from the flag's name

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def config_keyword(self) -> str:
        return self.keyword or self.dest


OPTIONS: tuple[Option, ...] = (
    Option("--host", "bind", "master", "uvicorn's spelling: replaces the HOST of --bind"),
    Option("--port", "bind", "master", "uvicorn's spelling: replaces the PORT of --bind"),
    Option("--loop", "choice", "config", "event loop (default auto: uvloop when installed)", LOOPS),
    Option(
        "--http", "choice", "config", "HTTP implementation (default auto: httptools when installed)", HTTPS
    ),
    Option("--http2", "switch", "config", "HTTP/2 (needs --http zttp)"),
    Option("--ws", "choice", "config", "WebSocket implementation (default auto)", WSS),
    Option("--ws-max-size", "int", "config", "WebSocket max message size in bytes (default 16777216)"),
    Option("--ws-max-queue", "int", "config", "WebSocket message queue length (default 32)"),
    Option("--ws-ping-interval", "float", "config", "WebSocket ping interval in seconds (default 20)"),
    Option("--ws-ping-timeout", "float", "config", "WebSocket ping timeout in seconds (default 20)"),
    Option("--ws-per-message-deflate", "bool", "config", "WebSocket per-message-deflate (default true)"),
    Option("--lifespan", "choice", "config", "lifespan events (default auto)", ("auto", "on", "off")),
    Option(
        "--interface",
        "choice",
        "worker",
        "app interface (default auto: ASGI3 or WSGI by inspection)",
        ("auto", "asgi3", "asgi2", "wsgi"),
    ),
    Option("--env-file", "str", "worker", "load this .env file into each worker before the app import"),
    Option("--app-dir", "str", "worker", "look for a module TARGET in this directory (default: cwd)"),
    Option(
        "--log-config", "str", "config", "logging configuration file for the workers (.ini, .json, .yaml)"
    ),
    Option(
        "--access-log",
        "switch",
        "config",
        "uvicorn's access log in each worker (default off here: see README)",
    ),
    Option("--use-colors", "switch", "config", "colorized worker logs (default: when on a terminal)"),
    Option(
        "--proxy-headers",
        "switch",
        "config",
        "trust X-Forwarded-For/Proto from --forwarded-allow-ips (default on)",
    ),
    Option("--server-header", "switch", "config", "send 'server: uvicorn' (default on)"),
    Option("--date-header", "switch", "config", "send a Date header (default on)"),
    Option(
        "--forwarded-allow-ips",
        "str",
        "config",
        "comma-separated addresses trusted with proxy headers "
        "(default $FORWARDED_ALLOW_IPS or 127.0.0.1,::1)",
    ),
    Option("--root-path", "str", "config", "ASGI root_path for an app mounted below a URL path"),
    Option(
        "--limit-concurrency", "int", "config", "per worker: answer 503 beyond this many connections+tasks"
    ),
    Option(
        "--backlog", "int", "master", f"listen() backlog of every slot's socket (default {DEFAULT_BACKLOG})"
    ),
    Option(
        "--limit-max-requests",
        "int",
        "worker",
        "replace a worker after this many requests (the master starts its successor on the slot first)",
    ),
    Option(
        "--limit-max-requests-jitter",
        "int",
        "worker",
        "up to this many more requests per worker, drawn "
        "at random (default: a tenth of --limit-max-requests)",
    ),
    Option(
        "--timeout-keep-alive",
        "int",
        "config",
        "close idle keep-alive connections after this many s (default 5)",
    ),
    Option("--ssl-keyfile", "str", "config", "TLS private key (PEM); each worker terminates TLS"),
    Option("--ssl-certfile", "str", "config", "TLS certificate chain (PEM)"),
    Option("--ssl-keyfile-password", "str", "config", "password of an encrypted --ssl-keyfile"),
    Option(
        "--ssl-version", "int", "config", f"ssl module protocol constant (default {ssl.PROTOCOL_TLS_SERVER})"
    ),
    Option(
        "--ssl-cert-reqs", "int", "config", "client certificates: 0 none, 1 optional, 2 required (default 0)"
    ),
    Option("--ssl-ca-certs", "str", "config", "CA certificates (PEM) to verify client certificates"),
    Option("--ssl-ciphers", "str", "config", "OpenSSL cipher string (default: OpenSSL's)"),
    Option(
        "--header", "list", "config", "default response header NAME:VALUE (repeatable)", keyword="headers"
    ),
    Option("--h11-max-incomplete-event-size", "int", "config", "h11: bytes buffered of an incomplete event"),
    Option("--reset-contextvars", "switch", "config", "run each request in a fresh contextvars.Context"),
    Option(
        "--reload",
        "switch",
        "master",
        "development: replace every worker, slot by slot, when a file changes (watchfiles)",
    ),
    Option("--reload-dir", "list", "master", "directory to watch (repeatable; default: cwd)"),
    Option("--reload-include", "list", "master", "glob of files to watch (repeatable; default *.py)"),
    Option(
        "--reload-exclude",
        "list",
        "master",
        "glob of files to ignore (repeatable; default .*, .py[cod], .sw.*, ~*)",
    ),
    Option("--reload-delay", "float", "master", f"seconds between checks (default {DEFAULT_RELOAD_DELAY})"),
)


@dataclass(frozen=True)
class Reload:
    dirs: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    delay: float = DEFAULT_RELOAD_DELAY


@dataclass(frozen=True)
class WorkerOptions:
    """The validated uvicorn options of one launch."""

    config: dict[str, Any] = field(default_factory=dict)  # uvicorn.Config keywords, given ones only
    env_file: str | None = None
    app_dir: str | None = None
    interface: str = "auto"
    limit_max_requests: int | None = None
    limit_max_requests_jitter: int = 0
    backlog: int = DEFAULT_BACKLOG
    reload: Reload | None = None

    @property
    def python_only(self) -> bool:
        """Options a `-- COMMAND` worker would silently ignore."""
        given = self.config or self.env_file or self.app_dir or self.limit_max_requests
        return bool(given or self.interface != "auto")

    def to_json(self) -> str:
        """What the master hands each worker (in its environment: the key's password stays out of
        the process list)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerOptions:
        data = json.loads(text)
        reload = data.pop("reload")
        if reload is not None:
            lists = {name: tuple(reload.pop(name)) for name in ("dirs", "includes", "excludes")}
            reload = Reload(**lists, delay=reload["delay"])
        return cls(**data, reload=reload)


def argv(keywords: dict[str, Any]) -> list[str]:
    """``run(app, ssl_certfile=..., access_log=True, header=[...])``: the same options as flags."""
    # uvicorn.run's names: the flag's, with the repeatable ones plural (headers, reload_dirs, ...).
    by_name = {option.dest + ("s" if option.kind == "list" else ""): option for option in OPTIONS}
    flags: list[str] = []
    for name, value in keywords.items():
        option = by_name.get(name)
        if option is None or option.kind == "bind":
            raise ConfigError(
                f"run() got {name}=: not a uvicorn option ebpf-sticky takes (see launch --help)"
            )
        if option.kind == "switch":
            flags.append(option.flag if value else f"--no-{option.flag[2:]}")
        elif option.kind == "list":
            for item in [value] if isinstance(value, str) else value:
                # headers=[("X-A", "1")], as uvicorn.run takes them, or "X-A: 1"
                flags += [option.flag, item if isinstance(item, str) else ":".join(map(str, item))]
        else:
            flags += [option.flag, str(value)]
    return flags


# Parsing -----------------------------------------------------------------------------------------
def whole_number(text: str) -> int:
    """argparse type for integers, with a message that names the value (cli.py uses it too)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "t", "y"):
        return True
    if value in ("0", "false", "no", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _twin_bool(parser: argparse.ArgumentParser, name: str, text: str) -> bool:
    try:
        return _bool(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"EBPF_STICKY_{name.upper().replace('-', '_')}: {exc}")


_METAVARS = {"int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "str": "TEXT"}  # uvicorn's (click's)


def add_arguments(parser: argparse.ArgumentParser, env: Callable[[str], str | None]) -> None:
    """uvicorn's options, each with its EBPF_STICKY_* twin read through ``env``."""
    group = parser.add_argument_group("uvicorn options (per worker; uvicorn's names and meanings)")
    for option in OPTIONS:
        name = option.flag[2:]
        twin = env(name)
        if option.kind == "bind":
            metavar = option.flag[2:].upper()
            group.add_argument(option.flag, action=_BindPart, dest="bind", metavar=metavar, help=option.help)
            if twin is not None:
                namespace = argparse.Namespace(bind=parser.get_default("bind"))
                _BindPart([option.flag], "bind")(parser, namespace, twin, option.flag)
                parser.set_defaults(bind=namespace.bind)
        elif option.kind == "switch":
            group.add_argument(
                option.flag,
                action=argparse.BooleanOptionalAction,
                default=None if twin is None else _twin_bool(parser, name, twin),
                help=option.help,
            )
        elif option.kind == "list":
            # Repeatable; the twin holds one value per line.
            default = None if twin is None else [line for line in twin.splitlines() if line.strip()]
            group.add_argument(option.flag, action="append", default=None, metavar="TEXT", help=option.help)
            parser.set_defaults(**{f"_{option.dest}_env": default})
        else:
            convert: Callable[[str], Any] = {"int": whole_number, "float": _float, "bool": _bool}.get(
                option.kind, str
            )
            group.add_argument(
                option.flag,
                type=convert,
                default=twin,
                choices=option.choices or None,
                metavar=None if option.choices else _METAVARS[option.kind],
                help=option.help,
            )


class _BindPart(argparse.Action):
    """--host and --port rewrite --bind as they are parsed (with --bind, the last one given wins)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        part = str(values)
        if option_string == "--host":
            namespace.bind = bind_text(namespace.bind, part, None)
        elif not part.isdigit():
            raise argparse.ArgumentError(self, f"expected a port number, got {part!r}")
        else:
            namespace.bind = bind_text(namespace.bind, None, int(part))


def _list(args: argparse.Namespace, dest: str) -> list[str]:
    given: list[str] | None = getattr(args, dest)
    return given if given is not None else list(getattr(args, f"_{dest}_env") or [])


def bind_text(bind: str, host: str | None, port: int | None) -> str:
    """--host/--port replace the matching half of --bind, as uvicorn's pair would."""
    if host is None and port is None:
        return bind
    bind_host, _, bind_port = bind.rpartition(":")
    if host is not None:
        bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{bind_host}:{bind_port if port is None else port}"


def _positive(name: str, value: float | None, minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"--{name} must be >= {minimum:g}, got {value:g}")


def from_args(args: argparse.Namespace) -> WorkerOptions:
    """The validated options; every file they name is checked too (``check_files``)."""
    options = parse(args)
    check_files(options)
    return options


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


# Checks that read files (the master runs them before any worker starts) ---------------------------
def check_files(options: WorkerOptions) -> None:
    for choice in ("loop", "http", "ws"):
        module = _NEEDS.get(options.config.get(choice, "auto"))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--{choice} {options.config[choice]}: {module} is not installed (pip install {module})"
            )
    named = [("--env-file", options.env_file), ("--log-config", options.config.get("log_config"))]
    for flag, path in named:
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path!r}: no such file")
    if options.app_dir is not None and not Path(options.app_dir).is_dir():
        raise ConfigError(f"--app-dir {options.app_dir!r}: no such directory")
    for directory in options.reload.dirs if options.reload else ():
        if not Path(directory).is_dir():
            raise ConfigError(f"--reload-dir {directory!r}: no such directory")
    check_tls(options.config)


def check_tls(config: dict[str, Any]) -> None:
    """Build the TLS context each worker will build, once, so a bad file, password, key, cipher or
    constant is one line before any worker starts instead of a crash loop in every slot."""
    certfile = config.get("ssl_certfile")
    if certfile is None:
        return
    keyfile = config.get("ssl_keyfile")
    for flag, path in (
        ("--ssl-certfile", certfile),
        ("--ssl-keyfile", keyfile),
        ("--ssl-ca-certs", config.get("ssl_ca_certs")),
    ):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path!r}: no such file")
    version = config.get("ssl_version", ssl.PROTOCOL_TLS_SERVER)
    try:
        context = ssl.SSLContext(version)
    except ValueError:
        raise ConfigError(
            f"--ssl-version {version}: not a protocol this ssl module has "
            f"(the default {ssl.PROTOCOL_TLS_SERVER} is PROTOCOL_TLS_SERVER)"
        ) from None
    password = config.get("ssl_keyfile_password")
    key = keyfile or certfile
    try:
        cert_text, key_text = Path(certfile).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"--ssl-certfile {certfile!r}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"--ssl-keyfile {key!r}: no PEM private key in it")
    encrypted = b"ENCRYPTED" in key_text
    if encrypted and password is None:
        raise ConfigError(f"--ssl-keyfile {key!r} is encrypted: give its --ssl-keyfile-password")
    try:
        # A password callback, even one returning "", stops OpenSSL from prompting on the terminal.
        context.load_cert_chain(certfile, keyfile, lambda: password or "")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"--ssl-keyfile {key!r} is not the key of --ssl-certfile {certfile!r}"
            ) from None
        if encrypted:
            raise ConfigError(f"--ssl-keyfile-password does not decrypt {key!r}") from None
        raise ConfigError(f"cannot load --ssl-certfile {certfile!r} with its key {key!r}: {exc}") from None
    try:
        context.verify_mode = ssl.VerifyMode(config.get("ssl_cert_reqs", ssl.CERT_NONE))
    except ValueError:
        raise ConfigError(
            f"--ssl-cert-reqs {config['ssl_cert_reqs']}: expected 0 (none), 1 (optional) or 2 (required)"
        ) from None
    if config.get("ssl_ca_certs"):
        try:
            context.load_verify_locations(config["ssl_ca_certs"])
        except ssl.SSLError as exc:
            raise ConfigError(
                f"--ssl-ca-certs {config['ssl_ca_certs']!r}: no PEM certificate in it ({exc.reason})"
            ) from None
    if config.get("ssl_ciphers"):
        try:
            context.set_ciphers(config["ssl_ciphers"])
        except ssl.SSLError:
            raise ConfigError(
                f"--ssl-ciphers {config['ssl_ciphers']!r}: OpenSSL knows no cipher by it"
            ) from None
