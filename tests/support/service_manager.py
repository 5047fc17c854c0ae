"""Plays systemd's part of the service protocol, for tests without systemd as PID 1.

The notify socket (``NOTIFY_SOCKET``): READY=1, and the file-descriptor store as sd_notify(3)
describes it: ``FDSTORE=1`` with ``FDNAME=`` and the fds as SCM_RIGHTS; duplicates (the same open
file) are stored once; an fd that polls POLLHUP or POLLERR is dropped unless ``FDPOLL=0`` (a BPF
map fd always polls POLLERR: seen with systemd 252 as PID 1); ``FDSTOREREMOVE=1`` with ``FDNAME=``
drops them. A start hands the store to the next process as sd_listen_fds(3) does: fds 3, 4, ...,
``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set to the started process's own pid.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import platform
import select
import socket
import threading
from pathlib import Path
from typing import Any

from .launcher import Instance

_MAX_FDS = 64


class ServiceManager:
    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.store: list[tuple[str, int]] = []
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        space = socket.CMSG_SPACE(_MAX_FDS * 4) + socket.CMSG_SPACE(12)
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, space)
            except OSError:
                return  # closed
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            self._handle(data.decode(), list(fds))

    def _handle(self, text: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        with self._lock:
            self.messages.append(text)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    watched = fields.get("FDPOLL") != "0"
                    if any(_same_file(fd, kept) for _, kept in self.store) or (watched and _failed(fd)):
                        os.close(fd)  # stored once; dropped on POLLHUP/POLLERR unless FDPOLL=0
                    else:
                        self.store.append((fields.get("FDNAME", "stored"), fd))
                return
            for fd in fds:
                os.close(fd)  # fds without FDSTORE=1 are not kept
            if fields.get("FDSTOREREMOVE") == "1":
                name = fields.get("FDNAME")
                for fd in [fd for n, fd in self.store if n == name]:
                    os.close(fd)
                self.store = [(n, fd) for n, fd in self.store if n != name]

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.store]

    def fds(self, name: str) -> list[int]:
        with self._lock:
            return [fd for stored, fd in self.store if stored == name]

    def start(self, args: list[str], **kwargs: Any) -> Instance:
        """Start the service with what the store holds, as the next invocation."""
        with self._lock:
            handed = list(self.store)
        env = {"NOTIFY_SOCKET": self.path, **kwargs.pop("extra_env", {})}
        return Instance(args, extra_env=env, handed=handed, **kwargs)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the receiving thread
        self.sock.close()
        for _, fd in self.store:
            os.close(fd)
        self.store.clear()


def _failed(fd: int) -> bool:
    """What systemd watches a stored fd for (unless FDPOLL=0): POLLHUP or POLLERR. An fd that
    cannot be polled at all (EPERM from epoll, a BPF program) is kept."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}[platform.machine()]
_KCMP_FILE = 0


def _same_file(a: int, b: int) -> bool:
    """The same open file (systemd's same_fd(): kcmp(2) KCMP_FILE). Comparing fstat() would not
    do: every BPF map and program fd shows the one anonymous inode."""
    pid = os.getpid()
    result = _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
    if result < 0:
        raise OSError(ctypes.get_errno(), "kcmp")
    return bool(result == 0)
