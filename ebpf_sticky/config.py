"""Validated settings: bind addresses, hash key, prefixes, workers. Pure: no I/O."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field, replace

from .errors import ConfigError
from .hashing import DEFAULT_PREFIX4, DEFAULT_PREFIX6, KEY_BYTES, MAX_SLOTS, HashSpec
from .uvicorn_options import WorkerOptions

DEFAULT_BIND = "127.0.0.1:8000"


@dataclass(frozen=True)
class Bind:
    host: str
    port: int
    family: int
    dual_stack: bool = False  # "[::]": IPv6 socket that also takes IPv4 clients

    def with_port(self, port: int) -> Bind:
        return replace(self, port=port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.family == socket.AF_INET6 else self.host
        return f"{host}:{self.port}"


def parse_bind(text: str, option: str = "--bind") -> Bind:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (all IPv4) or ``[::]:PORT`` (dual-stack)."""
    hint = f"{option} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000, 0.0.0.0:8000 or [::]:8000"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(hint)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} {text!r}: port must be 0..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{option} {text!r}: write an IPv6 address in brackets, e.g. [::1]:{port}")
    host = host or "0.0.0.0"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{hint} (a numeric address: {host!r} is not one)") from None
    if address.version == 4:
        return Bind(str(address), port, socket.AF_INET)
    return Bind(str(address), port, socket.AF_INET6, dual_stack=address.is_unspecified)


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
    pid_file: str | None = None
    log_level: str = "info"
    uvicorn: WorkerOptions = field(default_factory=WorkerOptions)
    metrics: Bind | None = None  # where /metrics is served

    def __post_init__(self) -> None:
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
