"""Listening addresses: ``HOST:PORT`` as the options write them, and the validated ``Bind``. Pure.

Its own module because the kernel layer needs ``Bind`` and must not import the launch settings.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace

from .errors import ConfigError


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
