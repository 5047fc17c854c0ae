"""Real proxies in front of a backend port on loopback: HAProxy sending PROXY v2, nginx replicas.

Each context manager writes a config into a private directory, starts the proxy in the
foreground, waits (with a deadline) until its front port is listening, yields where to connect,
and stops the proxy and removes the directory in ``finally``. Readiness is read from
``/proc/net/tcp*`` rather than probed with a connection, because a probe through a TCP proxy
would reach the backend and count as a client there.

Source addresses are distinct loopback addresses (any 127/8 address binds on Linux without
configuration), so a backend can tell a proxy's connections from a direct client's, and a test
can put exactly the proxy in ``--forwarded-allow-ips``.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HAPROXY_SOURCE = "127.0.20.1"
NGINX_SOURCES = ("127.0.10.1", "127.0.10.2")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Front:
    """Where clients connect (``host``:``port``) and the address the proxy connects from."""

    host: str
    port: int
    source: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` right now (the kernel's pick)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def haproxy_send_proxy(
    backend_port: int,
    *,
    backend_host: str = "127.0.0.1",
    servers: int = 2,
    source: str = HAPROXY_SOURCE,
    version: int = 2,
    front_host: str = "127.0.0.1",
    health_checks: bool = False,
) -> Iterator[Front]:
    """HAProxy ``mode tcp``, ``balance roundrobin`` over ``servers`` lines to one backend port,
    each sending a PROXY header (``send-proxy-v2``, or ``send-proxy`` for ``version=1``).

    Several server lines to the same port stand for a balancer with several paths to one
    service: every client lands on the backend from ``source``, whatever its own address.
    ``health_checks`` adds HAProxy's TCP checks every 200 ms, each a connection of its own that
    carries a header too (v2: the LOCAL command, which names no client) and then closes.
    """
    option = "send-proxy-v2" if version == 2 else "send-proxy"
    if health_checks:
        option += " check inter 200ms check-send-proxy"
    backend = _haproxy_address(backend_host, backend_port)
    lines = "\n".join(f"  server s{i} {backend} {option} source {source}" for i in range(servers))
    port = free_port(front_host)
    config = f"""
global
  maxconn 1024
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend front
  bind {_haproxy_address(front_host, port)}
  default_backend app
backend app
  balance roundrobin
{lines}
"""
    with _running("haproxy", config, lambda d: ["haproxy", "-db", "-f", str(d / "haproxy.conf")], [port]):
        yield Front(front_host, port, source)


@contextlib.contextmanager
def nginx_replicas(
    backend_port: int,
    *,
    backend_host: str = "127.0.0.1",
    sources: Sequence[str] = NGINX_SOURCES,
    keepalive: int = 16,
    front_host: str = "127.0.0.1",
) -> Iterator[list[Front]]:
    """One nginx per source address, as replicas of an L7 proxy (an Ingress controller's pods):
    each its own front port, each connecting to the backend from its own ``proxy_bind`` address
    through a pool of ``keepalive`` idle HTTP/1.1 connections, so the requests of many clients
    share a few upstream connections. WebSocket upgrades pass through; X-Forwarded-For is set.
    """
    with contextlib.ExitStack() as stack:
        fronts = []
        for source in sources:
            port = free_port(front_host)
            config = _nginx_config(front_host, port, backend_host, backend_port, source, keepalive)
            stack.enter_context(_running("nginx", config, _nginx_command, [port]))
            fronts.append(Front(front_host, port, source))
        yield fronts


def _nginx_command(directory: Path) -> list[str]:
    # -e: errors to stderr from the start (before the config is read, nginx would open the
    # distro's log file); daemon off keeps the master our child.
    return [
        "nginx",
        "-e",
        "stderr",
        "-p",
        str(directory),
        "-c",
        str(directory / "nginx.conf"),
        "-g",
        "daemon off;",
    ]


def _nginx_config(
    front_host: str, port: int, backend_host: str, backend_port: int, source: str, keepalive: int
) -> str:
    backend = f"[{backend_host}]" if ":" in backend_host else backend_host
    front = f"[{front_host}]" if ":" in front_host else front_host
    # One worker: one keep-alive pool per replica, so reuse is deterministic. proxy_buffering off
    # streams long-polls and server-sent events as ingress-nginx does by default.
    return f"""
worker_processes 1;
pid nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path body;
  proxy_temp_path proxy;
  fastcgi_temp_path fastcgi;
  uwsgi_temp_path uwsgi;
  scgi_temp_path scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream app {{
    server {backend}:{backend_port};
    keepalive {keepalive};
  }}
  server {{
    listen {front}:{port};
    location / {{
      proxy_pass http://app;
      proxy_bind {source};
      proxy_http_version 1.1;
      # "" unless upgrading: no "Connection: close" upstream, so the pool is reused.
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_buffering off;
      proxy_read_timeout 120s;
    }}
  }}
}}
"""


def _haproxy_address(host: str, port: int) -> str:
    return f"ipv6@{host}:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def _running(
    name: str, config: str, command: Callable[[Path], list[str]], ports: Sequence[int]
) -> Iterator[subprocess.Popen[bytes]]:
    directory = Path(tempfile.mkdtemp(prefix=f"ebpf-sticky-{name}-"))
    directory.chmod(0o755)  # nginx's workers run as another user and create their temp dirs here
    log = directory / "stderr.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        (directory / f"{name}.conf").write_text(config)
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                command(directory), cwd=directory, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        _wait_listening(name, proc, ports, log)
        yield proc
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_listening(name: str, proc: subprocess.Popen[bytes], ports: Sequence[int], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not set(ports) <= listening_ports():
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{name} not listening on {list(ports)} after {START_TIMEOUT} s: {log.read_text()[-2000:]}"
            )
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # both: fast shutdown, workers included
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def listening_ports() -> set[int]:
    """TCP ports in LISTEN state on any address, IPv4 or IPv6, in this network namespace."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
