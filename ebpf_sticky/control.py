"""Talk to a running instance: `ebpf-sticky status` and `ebpf-sticky route` without flags.

The master listens on a unix socket in a directory only the launching user can enter (mode 0700),
and checks each peer's uid with SO_PEERCRED as well: root and the launching user only. One JSON
request per connection, one JSON answer.

The socket's name carries the network namespace (the inode of /proc/thread-self/ns/net): instances
on the same address and port in different namespaces (containers, the multi-host lab) coexist, and
`status` run inside a namespace finds that namespace's instance. A path rather than an abstract
socket (which would be per-namespace by itself): an abstract name has no permissions, so any user in
the namespace could bind it before the master and answer `status` and `route` in its place; the
0700 directory leaves that to the launching user and root.

Both ends check the directory before trusting it (``check_dir``): a real directory (not a
symlink), owned by the caller (or root), mode 0700. Where it is a fixed name in a shared directory
(``/tmp/ebpf-sticky-<uid>`` without XDG_RUNTIME_DIR), another user could create it first and
answer in the instance's place; the master then refuses to start with one line naming the fix,
and `status`/`route` refuse to talk. The client also checks the answering process's uid with
SO_PEERCRED (``request``): the launching user or root.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

from .errors import ControlError, UpgradeError

_RUN_DIR = Path("/run/ebpf-sticky")


def control_dir() -> Path:
    if os.geteuid() == 0:
        return _RUN_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "ebpf-sticky" if runtime else Path(f"/tmp/ebpf-sticky-{os.geteuid()}")


def check_dir(directory: Path, create: bool = False) -> int:
    """Make sure ``directory`` is a private directory we may trust, and return its owner's uid.
    The master (``create``) makes it if missing and must own it; a client must own it too, except
    root, who trusts a service user's (systemd's RuntimeDirectory=). Raises ControlError."""
    if create:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    euid = os.geteuid()
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return euid  # nothing runs there: find_instance says so
    fix = (
        "remove it (as its owner or root) or point XDG_RUNTIME_DIR at a private directory; another "
        "user may have made it to answer `status` and `route` in the instance's place"
    )
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"the control directory {directory} is not a directory (a symlink?): {fix}")
    if st.st_uid != euid and (create or euid != 0):
        raise ControlError(
            f"the control directory {directory} belongs to uid {st.st_uid}, not to uid {euid}: {fix}"
        )
    if st.st_mode & 0o077:
        if not create:
            raise ControlError(
                f"the control directory {directory} is open to others (mode {st.st_mode & 0o777:o}): {fix}"
            )
        os.chmod(directory, 0o700)
    return st.st_uid


def current_netns() -> int:
    """This thread's network namespace, as the kernel names it (nsfs inode)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def socket_name(host: str, port: int, netns: int | None = None) -> str:
    """The control socket's file name; ``netns`` defaults to the caller's network namespace."""
    return f"net{current_netns() if netns is None else netns}-{host.replace(':', '_')}-{port}.sock"


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def find_instance(directory: Path, port: int | None, netns: int | None = None) -> Path:
    """The control socket of the one running instance in this network namespace, or the one on ``port``."""
    prefix = f"net{current_netns() if netns is None else netns}-"
    check_dir(directory)
    sockets = sorted(directory.glob(f"{prefix}*.sock")) if directory.is_dir() else []
    live = [path for path in sockets if alive(path)]
    if port is not None:
        live = [path for path in live if path.stem.endswith(f"-{port}")]
    if not live:
        where = f" on port {port}" if port is not None else ""
        raise ControlError(
            f"no running ebpf-sticky instance{where} in this network namespace found in {directory}: "
            "start one with `ebpf-sticky launch`, or run this as the user who launched it, in its namespace"
        )
    if len(live) > 1:
        names = ", ".join(path.stem.removeprefix(prefix) for path in live)
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
    owner = check_dir(path.parent)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            server = peer_uid(sock)
            if server not in (owner, 0):
                raise ControlError(
                    f"the process answering at {path} runs as uid {server}, not as the directory's owner "
                    f"({owner}) nor root: not trusting its answer; remove the socket and find who made it"
                )
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


# The master first runs the installed code in a child (for up to a minute), then execs it.
UPGRADE_TIMEOUT = 90.0


def upgrade(path: Path, timeout: float = UPGRADE_TIMEOUT) -> dict[str, Any]:
    """SIGUSR2 to the instance at ``path``, then its status once the new image answers; raises
    UpgradeError with the master's reason if it refused."""
    before = request(path, {"cmd": "status"})
    if "generation" not in before:
        raise UpgradeError(
            f"the master at {path} predates in-place upgrades (SIGUSR2 would stop it): "
            "restart it once, and upgrade in place from then on"
        )
    os.kill(int(before["pid"]), signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        with contextlib.suppress(ControlError):  # the new image may not answer yet
            now = request(path, {"cmd": "status"})
            if now["generation"] > before["generation"]:
                return now
            if now["upgrades_refused"] > before["upgrades_refused"]:
                raise UpgradeError(f"upgrade refused: {now['upgrade_refusal']}")
    raise UpgradeError(
        f"no upgrade within {timeout:g} s: see the master's log (it upgrades a settled group only: "
        "not while starting, reloading or retiring a slot)"
    )
