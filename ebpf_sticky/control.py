"""Talk to a running instance: `ebpf-sticky status` and `ebpf-sticky route` without flags.

The master listens on a unix socket in a directory only the launching user can enter (mode 0700),
and checks each peer's uid with SO_PEERCRED as well: root and the launching user only. One JSON
request per connection, one JSON answer.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

from .errors import ControlError

_RUN_DIR = Path("/run/ebpf-sticky")


def control_dir() -> Path:
    if os.geteuid() == 0:
        return _RUN_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "ebpf-sticky" if runtime else Path(f"/tmp/ebpf-sticky-{os.geteuid()}")


def socket_name(host: str, port: int) -> str:
    return f"{host.replace(':', '_')}-{port}.sock"


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def find_instance(directory: Path, port: int | None) -> Path:
    """The control socket of the one running instance, or the one on ``port``."""
    sockets = sorted(directory.glob("*.sock")) if directory.is_dir() else []
    live = [path for path in sockets if alive(path)]
    if port is not None:
        live = [path for path in live if path.stem.endswith(f"-{port}")]
    if not live:
        where = f" on port {port}" if port is not None else ""
        raise ControlError(
            f"no running ebpf-sticky instance{where} found in {directory}: start one with "
            "`ebpf-sticky launch`, or run this as the user who launched it"
        )
    if len(live) > 1:
        names = ", ".join(path.stem for path in live)
        raise ControlError(f"several instances are running ({names}): choose one with --port")
    return live[0]


def alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def request(path: Path, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise ControlError(f"talking to the instance at {path} failed: {exc}") from exc
    answer: dict[str, Any] = json.loads(data)
    if "error" in answer:
        raise ControlError(str(answer["error"]))
    return answer
