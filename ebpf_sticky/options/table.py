"""uvicorn's per-worker options as data: flag, kind, where it goes, help. Pure."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

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
NEEDS = {
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
        "uvicorn's access log in each worker (default off here)",
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
    Option(
        "--ssl-keyfile-password",
        "str",
        "config",
        "password of an encrypted --ssl-keyfile (visible in the process list: prefer the file or "
        "EBPF_STICKY_SSL_KEYFILE_PASSWORD)",
    ),
    Option(
        "--ssl-keyfile-password-file",
        "str",
        "master",
        "file whose first line is the password of an encrypted --ssl-keyfile (read by the master)",
    ),
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
