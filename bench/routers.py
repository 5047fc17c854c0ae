"""The routers under test, each in front of the very same worker program.

A router entry is a name and a start function; ``contenders`` picks the ones that apply to a
worker program. ebpf-sticky runs the workers itself (each on its slot's socket, fd 3); nginx and
HAProxy front one worker per port; sticky-session and @socket.io/sticky are Node's cluster masters.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebpf_sticky.kernel import syscalls

from .common import APPS, NATIVE, REPO, Contender, Settings, UvicornConfig, free_port, rss_kib, wait_until


@dataclass(frozen=True)
class Worker:
    """One worker program: a Node.js script or a Python ASGI app under uvicorn."""

    label: str  # how the results name it: "node", "python", "socketio-python (fast)", ...
    script: str  # a file in bench/native (Node.js) or bench/apps (Python)
    uvicorn: UvicornConfig | None = None  # None: a Node.js script
    socketio: bool = False

    @property
    def is_node(self) -> bool:
        return self.uvicorn is None

    @property
    def path(self) -> Path:
        return (NATIVE if self.is_node else APPS) / self.script

    def bin_dir(self, settings: Settings) -> Path:
        return self.uvicorn.venv_bin if self.uvicorn else settings.venv_bin

    def launch_target(self) -> list[str]:
        """What follows the options of `ebpf-sticky launch`."""
        if self.uvicorn is None:
            return ["--", "node", str(self.path), "fd3"]
        return [*self.uvicorn.launch_options, str(self.path)]

    def on_port(self, contender: Contender, settings: Settings, port: int, index: int) -> None:
        if self.uvicorn is None:
            contender.spawn(["node", str(self.path), "port", str(port), str(index)])
            return
        contender.spawn(
            [
                str(self.uvicorn.venv_bin / "uvicorn"),
                f"{Path(self.script).stem}:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
                *self.uvicorn.uvicorn_options(),
            ],
            cwd=APPS,
            env={**os.environ, "WORKER_ID": str(index)},
        )


Start = Callable[[Contender], None]


def ebpf(settings: Settings, worker: Worker, loader: str, detach: bool = False) -> Start:
    def start(c: Contender) -> None:
        bin_dir = worker.bin_dir(settings)
        c.port = free_port()
        # Workers log at warning, like the uvicorns behind nginx and HAProxy: at info, uvicorn
        # logs every WebSocket it accepts.
        argv = [
            str(bin_dir / "ebpf-sticky"),
            "launch",
            "-w",
            str(settings.workers),
            "-b",
            f"127.0.0.1:{c.port}",
        ]
        argv += ["--loader", loader, "--log-level", "warning", "--graceful-timeout", "1"]
        began = time.monotonic()
        c.spawn([*argv, *worker.launch_target()], cwd=APPS)
        status: dict[str, Any] = {}

        def running() -> bool:
            status.update(ebpf_status(bin_dir, c.port))
            return status.get("phase") == "running"

        wait_until(running, 120, "all slots serving", c.alive)
        c.wait_http(c.port)
        c.info.update(
            launch_to_serving_s=round(time.monotonic() - began, 3),
            loader=status["loader"],
            master_rss_kib=rss_kib(c.procs[0].pid),
        )
        if detach:
            # Join the group with a socket of our own (same uid), detach the program group-wide,
            # leave again: the very same sockets and workers, routed by the kernel's 4-tuple hash.
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(("127.0.0.1", c.port))
                sock.listen(1)
                sock.setsockopt(socket.SOL_SOCKET, syscalls.SO_DETACH_REUSEPORT_BPF, 0)

    return start


def ebpf_status(bin_dir: Path, port: int) -> dict[str, Any]:
    """`ebpf-sticky status --json` of the instance on this port; {} while it has no control socket."""
    argv = [str(bin_dir / "ebpf-sticky"), "status", "--port", str(port), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def routed(settings: Settings, worker: Worker, c: Contender) -> list[int] | None:
    """Connections routed to each slot so far, from `status` (None: not ebpf-sticky, or a
    router that does not count them)."""
    if "loader" not in c.info:
        return None
    slots = ebpf_status(worker.bin_dir(settings), c.port).get("slots", [])
    counts = [s.get("routed") for s in slots]
    return counts if counts and all(isinstance(n, int) for n in counts) else None


def node_cluster(settings: Settings, worker: Worker, mode: str) -> Start:
    """sticky-session or @socket.io/sticky: a cluster master that hands connections to workers."""

    def start(c: Contender) -> None:
        c.port = free_port()
        c.spawn(["node", str(worker.path), mode, str(c.port), str(settings.workers)], cwd=REPO)
        c.wait_http(c.port)

    return start


def _backends(c: Contender, settings: Settings, worker: Worker) -> list[int]:
    ports = [free_port() for _ in range(settings.workers)]
    for i, port in enumerate(ports):
        worker.on_port(c, settings, port, i)
    for port in ports:
        c.wait_http(port)
    return ports


def nginx(settings: Settings, worker: Worker) -> Start:
    def start(c: Contender) -> None:
        ports = _backends(c, settings, worker)
        c.port = free_port()
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in ports)
        # WebSocket upgrades pass through (Connection: upgrade); everything else reuses keep-alive
        # connections to the workers (Connection: "").
        (c.tmp / "nginx.conf").write_text(f"""
worker_processes {os.cpu_count()};
pid {c.tmp}/nginx.pid;
error_log stderr error;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream workers {{
    hash $remote_addr consistent;
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{c.port} backlog=4096;
    location / {{
      proxy_pass http://workers;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 120s;
    }}
  }}
}}
""")
        c.spawn(["nginx", "-p", str(c.tmp), "-c", str(c.tmp / "nginx.conf"), "-g", "daemon off;"])
        c.wait_http(c.port)

    return start


def haproxy(settings: Settings, worker: Worker) -> Start:
    def start(c: Contender) -> None:
        ports = _backends(c, settings, worker)
        c.port = free_port()
        servers = "\n".join(f"  server w{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
        (c.tmp / "haproxy.cfg").write_text(f"""
global
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
frontend f
  bind 127.0.0.1:{c.port}
  default_backend workers
backend workers
  balance source
  hash-type consistent
  http-reuse always
{servers}
""")
        c.spawn(["haproxy", "-db", "-f", str(c.tmp / "haproxy.cfg")])
        c.wait_http(c.port)

    return start


def bare(settings: Settings) -> Start:
    """The C accept loop: the HTTP load generator's ceiling."""

    def start(c: Contender) -> None:
        c.port = free_port()
        c.spawn([str(settings.tools / "bare"), str(c.port), str(settings.workers)])
        c.wait_http(c.port)

    return start


def has_loader(settings: Settings, loader: str) -> bool:
    match = re.search(r"--loader \{([^}]*)\}", settings.launch_help)
    return bool(match) and loader in match.group(1).split(",")  # type: ignore[union-attr]


def contenders(settings: Settings, worker: Worker, with_bcc: bool = True) -> list[Contender]:
    """Every router that applies to this worker program, ebpf-sticky first."""
    out = [Contender("ebpf-sticky", ebpf(settings, worker, "native"))]
    if with_bcc:
        out.append(Contender("ebpf-sticky-bcc", ebpf(settings, worker, "bcc")))
    if has_loader(settings, "cbpf"):
        out.append(Contender("ebpf-sticky-cbpf", ebpf(settings, worker, "cbpf")))
    else:
        print("ebpf-sticky-cbpf: skipped, `launch --loader` has no cbpf choice on this branch", flush=True)
    if not worker.socketio:
        # Not sticky: the HTTP workloads' ceiling of the kernel's own SO_REUSEPORT spreading.
        out.append(Contender("reuseport", ebpf(settings, worker, "native", detach=True)))
    if worker.is_node:
        out.append(Contender("sticky-session", node_cluster(settings, worker, "sticky")))
    if worker.is_node and worker.socketio:
        out.append(Contender("socket.io-sticky", node_cluster(settings, worker, "socketio-sticky")))
    else:
        out += [
            Contender("nginx-ip-hash", nginx(settings, worker)),
            Contender("haproxy-source", haproxy(settings, worker)),
        ]
    return out
