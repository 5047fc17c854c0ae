"""The group: one SO_REUSEPORT listening socket per slot, the maps, the attached program.

``Router.open`` builds everything or, if any step fails, nothing: every fd and socket made so far is
closed before the error propagates. The router knows nothing of workers or the CLI; the supervisor
asks it to add or retire slots and reads its counters.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from types import TracebackType

from ..config import Bind
from ..errors import AddressInUseError, ConfigError, KernelError
from ..hashing import BUCKETS, MAX_SLOTS, HashSpec, bucket_table, program_constants
from . import syscalls
from .loaders import LOADERS, LoadedProgram
from .program import FAILURE_INDEX, MapFds

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TABLE = struct.Struct(f"={BUCKETS}H")
_TCPI_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: a listener's accept-queue length
DEFAULT_BACKLOG = 1024


@dataclass(frozen=True)
class Counters:
    per_slot: tuple[int, ...]
    failures: int


def _listener(bind: Bind, udp: bool, backlog: int) -> socket.socket:
    sock = socket.socket(bind.family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if bind.dual_stack else 1)
        try:
            sock.bind((bind.host, bind.port))
        except OSError as exc:
            if exc.errno == errno_mod.EADDRINUSE:
                raise AddressInUseError(
                    f"{bind} is in use by a socket that is not ours to join (no SO_REUSEPORT, or "
                    "another user's): stop that server or choose another --bind",
                    exc.errno,
                ) from exc
            if exc.errno == errno_mod.EADDRNOTAVAIL:
                raise ConfigError(f"cannot bind {bind}: no interface has that address") from exc
            if exc.errno == errno_mod.EACCES:
                raise KernelError(
                    f"binding {bind} needs privilege (ports below 1024): run as root or use a higher port",
                    exc.errno,
                ) from exc
            raise
        if not udp:
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class Router:
    """A sticky SO_REUSEPORT group. Use as a context manager, or call ``close``."""

    def __init__(self, bind: Bind, spec: HashSpec, *, udp: bool, loader: str) -> None:
        # Private: use Router.open, which builds the group all-or-nothing.
        self.spec = spec
        self.udp = udp
        self.loader = loader
        self.bind = bind
        self.sockets: list[socket.socket] = []
        self._fds: MapFds | None = None
        self._program: LoadedProgram | None = None
        self._resources = ExitStack()  # the map fds, closed on close()
        # Which of the two tables is live; starting at 1 makes the first publish fill table 0.
        self._live = 1

    @classmethod
    def open(
        cls,
        bind: Bind,
        spec: HashSpec,
        slots: int,
        *,
        udp: bool = False,
        loader: str = "native",
        backlog: int = DEFAULT_BACKLOG,
    ) -> Router:
        if not 1 <= slots <= MAX_SLOTS:
            raise ConfigError(f"workers must be 1..{MAX_SLOTS}, got {slots}")
        if loader not in LOADERS:
            raise ConfigError(f"unknown loader {loader!r}: choose one of {', '.join(LOADERS)}")
        router = cls(bind, spec, udp=udp, loader=loader)
        try:
            router._build(slots, backlog)
        except BaseException:
            router.close()
            raise
        return router

    def _map(self, map_type: int, value_size: int, entries: int, name: str, flags: int = 0) -> int:
        fd = syscalls.map_create(map_type, 4, value_size, entries, name, flags)
        self._resources.callback(os.close, fd)
        return fd

    def _build(self, slots: int, backlog: int) -> None:
        self._fds = MapFds(
            socks=self._map(syscalls.MAP_TYPE_REUSEPORT_SOCKARRAY, 8, MAX_SLOTS, "sticky_socks"),
            table=self._map(syscalls.MAP_TYPE_ARRAY, _TABLE.size, 2, "sticky_table"),
            live=self._map(syscalls.MAP_TYPE_ARRAY, 4, 1, "sticky_live"),
            counters=self._map(syscalls.MAP_TYPE_PERCPU_ARRAY, 8, MAX_SLOTS + 1, "sticky_counts"),
        )
        self._publish_table(slots)
        # Every socket listens and sits in the sockarray before the program is attached, so the
        # program never sees a slot it cannot select. Connections in the microseconds between the
        # first listen and the attach are spread by the kernel's own hash; nothing serves them yet.
        for _ in range(slots):
            self._add_socket(backlog)
        self._program = LOADERS[self.loader](program_constants(self.spec), self._fds)
        syscalls.attach_reuseport(self.sockets[0], self._program.fd)

    def _add_socket(self, backlog: int) -> None:
        assert self._fds is not None
        bind = self.bind
        if self.sockets and bind.port == 0:
            bind = bind.with_port(self.port)
        sock = _listener(bind, self.udp, backlog)
        try:
            slot = len(self.sockets)
            syscalls.map_update(
                self._fds.socks,
                _U32.pack(slot),
                _U64.pack(sock.fileno()),
                f"adding slot {slot}'s socket to the sockarray",
            )
        except BaseException:
            sock.close()
            raise
        self.sockets.append(sock)

    def _publish_table(self, slots: int) -> None:
        """Write the table for ``slots`` into the idle entry, then flip the live word.

        The flip is one map update, so a connection sees either the old table or the new one.
        """
        assert self._fds is not None
        idle = 1 - self._live
        syscalls.map_update(
            self._fds.table, _U32.pack(idle), _TABLE.pack(*bucket_table(slots)), "writing the bucket table"
        )
        syscalls.map_update(self._fds.live, _U32.pack(0), _U32.pack(idle), "switching the bucket table")
        self._live = idle

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    @property
    def slots(self) -> int:
        return len(self.sockets)

    @property
    def insn_count(self) -> int:
        assert self._program is not None
        return self._program.insn_count

    @property
    def program_fd(self) -> int:
        assert self._program is not None
        return self._program.fd

    def add_slot(self, backlog: int = DEFAULT_BACKLOG) -> int:
        """A new listening socket in a new highest slot; it takes exactly its fair share."""
        if self.slots >= MAX_SLOTS:
            raise ConfigError(f"cannot add a slot: {MAX_SLOTS} is the most")
        self._add_socket(backlog)
        self._publish_table(self.slots)
        return self.slots - 1

    def retire_slot(self) -> int:
        """Route the highest slot's buckets away; its socket stays until ``release_slot``.

        Between the two, the socket's queue drains into its worker: nothing queued is reset.
        """
        if self.slots <= 1:
            raise ConfigError("cannot retire the last slot")
        self._publish_table(self.slots - 1)
        return self.slots - 1

    def release_slot(self, slot: int) -> None:
        """Close a retired slot's socket (the highest one)."""
        assert self._fds is not None
        if slot != self.slots - 1:
            raise ValueError("only the highest slot can be released")
        syscalls.map_delete(self._fds.socks, _U32.pack(slot))
        self.sockets.pop().close()

    def pending(self, slot: int) -> int:
        """Connections waiting in the slot's accept queue (TCP); 0 for UDP."""
        if self.udp:
            return 0
        info = self.sockets[slot].getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(_U32.unpack_from(info, _TCPI_UNACKED)[0])

    def counters(self) -> Counters:
        assert self._fds is not None
        per_cpu = struct.Struct(f"={syscalls.possible_cpus()}Q")
        fd = self._fds.counters

        def total(index: int) -> int:
            raw = syscalls.map_lookup(fd, _U32.pack(index), per_cpu.size)
            return sum(per_cpu.unpack(raw)) if raw else 0

        return Counters(tuple(total(i) for i in range(self.slots)), total(FAILURE_INDEX))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        if self._program is not None:
            self._program.close()
            self._program = None
        self._resources.close()
        self._fds = None

    def __enter__(self) -> Router:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
