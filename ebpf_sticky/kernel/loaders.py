"""The ways to route a group's clients to its slots, and the one place where one is chosen.

* ``native``: eBPF bytecode from ``program.py``, loaded with bpf(2). No compiler, no headers; needs
  CAP_BPF and CAP_NET_ADMIN (or root).
* ``bcc``: the same program compiled from ``bpf/select.c`` at run time with bcc (python3-bpfcc).
* ``cbpf``: classic BPF from ``cbpf.py``, attached with SO_ATTACH_REUSEPORT_CBPF: no capability and
  no bpf(2) at all; no counters, at most ``MAX_CBPF_SLOTS`` slots.
* ``auto`` (the default): the first of ``AUTO_ORDER`` the kernel allows; ``Router.open`` applies
  that policy over ``LOADERS``.

Each loader gives the router a ``Routing`` (what to do when a socket joins, when the slot count
changes, when a socket leaves) and a Python mirror (``slot_of``) that predicts its choice.
"""

from __future__ import annotations

import importlib
import os
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import hashing
from ..errors import LoaderUnavailableError, PrivilegeError, UnsupportedKernelError, VerifierError
from ..hashing import BUCKETS, MAX_SLOTS, Address, HashSpec, ProgramConstants, bucket_table
from ..hashing import cbpf as hashing_cbpf
from . import casm, cbpf, program, syscalls
from .asm import encode
from .program import FAILURE_INDEX

PROGRAM_NAME = "sticky_select"
# Debian installs bcc's Python module for its own interpreter only; a venv or pyenv Python on the
# same machine can still use it, since the module is pure Python over libbcc.
_DISTRO_PYTHON_PATHS = ("/usr/lib/python3/dist-packages",)
BCC_FIX = (
    "install bcc and kernel headers (Debian/Ubuntu: apt-get install python3-bpfcc "
    "linux-headers-$(uname -r)), or use the default --loader auto"
)


@dataclass
class LoadedProgram:
    fd: int
    insn_count: int
    keepalive: Any = field(default=None, repr=False)  # bcc's BPF object owns its fd
    # Attached for migration too: the kernel moves a closing listener's handshakes and queued
    # connections to the group's other sockets instead of resetting them.
    migrates: bool = False

    def close(self) -> None:
        if self.keepalive is not None:
            self.keepalive.cleanup()
            self.keepalive = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def load_native(consts: ProgramConstants, fds: program.MapFds) -> LoadedProgram:
    insns = program.build(consts, fds)
    code = encode(insns)
    kind = syscalls.PROG_TYPE_SK_REUSEPORT
    try:
        fd = syscalls.prog_load(kind, code, PROGRAM_NAME, syscalls.ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE)
    except VerifierError:  # a kernel before 5.14 knows no migration: select only
        return LoadedProgram(
            syscalls.prog_load(kind, code, PROGRAM_NAME, syscalls.ATTACH_SK_REUSEPORT_SELECT), len(insns)
        )
    return LoadedProgram(fd, len(insns), migrates=True)


def import_bcc() -> Any:
    try:
        return importlib.import_module("bcc")
    except ImportError:
        pass
    for path in _DISTRO_PYTHON_PATHS:
        if (Path(path) / "bcc").is_dir() and path not in sys.path:
            sys.path.append(path)
    try:
        return importlib.import_module("bcc")
    except ImportError as exc:
        raise LoaderUnavailableError(f"--loader bcc: cannot import bcc ({exc}): {BCC_FIX}") from exc


def c_source() -> str:
    return (Path(__file__).parent / "select.c").read_text()


def bcc_cflags(consts: ProgramConstants, fds: program.MapFds) -> list[str]:
    defines = {
        "SOCKS_FD": fds.socks,
        "TABLE_FD": fds.table,
        "LIVE_FD": fds.live,
        "COUNTERS_FD": fds.counters,
        "V0": consts.v_init[0],
        "V1": consts.v_init[1],
        "V2": consts.v_init[2],
        "V3": consts.v_init[3],
        "MASK4": consts.mask4,
        "MASK6_0": consts.mask6[0],
        "MASK6_1": consts.mask6[1],
        "BUCKETS": BUCKETS,
        "MAX_SLOTS": MAX_SLOTS,
    }
    return [f"-D{name}={value:#x}ULL" for name, value in defines.items()]


def load_bcc(consts: ProgramConstants, fds: program.MapFds) -> LoadedProgram:
    bcc = import_bcc()
    if os.geteuid() != 0:
        raise PrivilegeError(f"--loader bcc needs root: {syscalls.PRIVILEGE_FIX}")
    try:
        bpf = bcc.BPF(text=c_source().encode(), cflags=bcc_cflags(consts, fds))
    except Exception as exc:
        # bcc raises plain Exception for a failed compile, most often missing kernel headers.
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LoaderUnavailableError(
            f"--loader bcc: compiling bpf/select.c failed ({first}): {BCC_FIX}"
        ) from exc
    try:
        fn = bpf.load_func(b"select_slot", syscalls.PROG_TYPE_SK_REUSEPORT)
    except Exception as exc:
        bpf.cleanup()
        raise VerifierError(f"--loader bcc: the kernel rejected the program ({exc})", str(exc)) from exc
    return LoadedProgram(fn.fd, len(bpf.dump_func(b"select_slot")) // 8, keepalive=bpf)


_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
SO_COOKIE = 57  # the socket cookie, which a sockarray entry reads back as
_TABLE = struct.Struct(f"={BUCKETS}H")


@dataclass(frozen=True)
class Counters:
    """Selections per slot and failures, from the eBPF program's per-CPU map; None under cbpf,
    which has no map to count in."""

    per_slot: tuple[int | None, ...]
    failures: int | None


@dataclass(frozen=True)
class Carried:
    """What a routing hands across exec besides the sockets: the kernel objects by fd, and what
    cannot be read back from them."""

    insn_count: int
    program: int | None = None  # the eBPF program (native, bcc)
    maps: tuple[int, int, int, int] | None = None  # socks, table, live, counters
    live_table: int | None = 0  # which of the two bucket tables the live word names; None: read it


class Routing(Protocol):
    """What a loader does for the router; the router owns the sockets and their order."""

    @property
    def insn_count(self) -> int: ...

    def join(self, sock: socket.socket, slot: int) -> None:
        """``sock`` listens (TCP) or is bound (UDP) as the new highest slot."""

    def route(self, sockets: Sequence[socket.socket], slots: int) -> None:
        """From now on send every client to one of slots 0..slots-1 (the first call attaches)."""

    def leave(self, slot: int) -> None:
        """The highest slot's socket is about to close."""

    def holds(self, slot: int, sock: socket.socket) -> bool | None:
        """Whether the program still finds ``sock`` as ``slot``; None where it selects by position."""

    def reattach(self, sockets: Sequence[socket.socket], slots: int) -> None:
        """Attach the program again (after the master rejoined sockets to the group)."""

    def counters(self, slots: int) -> Counters: ...

    @property
    def migrates(self) -> bool:
        """Whether the kernel moves a closing socket's handshakes to the others (else they reset)."""

    def carried(self) -> Carried:
        """What a new image of this process needs to go on routing (see ``Router.adopt``)."""

    def close(self) -> None: ...


class MapRouting:
    """The eBPF program over maps (``program.py``): a sockarray, two bucket tables, a live word.

    A table change writes the idle table whole, then flips the live word: one map update, so a
    connection sees the old table or the new one, never half of each.
    """

    def __init__(
        self,
        spec: HashSpec,
        load: Callable[[ProgramConstants, program.MapFds], LoadedProgram],
        carried: Carried | None = None,
    ) -> None:
        self._load = load
        self._consts = hashing.program_constants(spec)
        self._resources = ExitStack()  # the map fds, closed on close()
        self._program: LoadedProgram | None = None
        # Which of the two tables is live; starting at 1 makes the first publish fill table 0.
        self._live = 1
        if carried is not None:
            self._adopt(carried)
            return
        try:
            self.fds = program.MapFds(
                socks=self._map(syscalls.MAP_TYPE_REUSEPORT_SOCKARRAY, 8, MAX_SLOTS, "sticky_socks"),
                table=self._map(syscalls.MAP_TYPE_ARRAY, _TABLE.size, 2, "sticky_table"),
                live=self._map(syscalls.MAP_TYPE_ARRAY, 4, 1, "sticky_live"),
                counters=self._map(syscalls.MAP_TYPE_PERCPU_ARRAY, 8, MAX_SLOTS + 1, "sticky_counts"),
            )
        except BaseException:
            self._resources.close()
            raise

    def _adopt(self, carried: Carried) -> None:
        """Take over the maps and the attached program of a master this process was before exec:
        nothing is created, so the group's program never changes and no capability is needed."""
        if carried.maps is None or carried.program is None:
            raise ValueError("an eBPF router needs its maps and program fds carried over")
        for fd in carried.maps:
            self._resources.callback(os.close, fd)
        self.fds = program.MapFds(*carried.maps)
        self._program = LoadedProgram(carried.program, carried.insn_count)
        live = carried.live_table
        if live is None:  # handed back by systemd: the live word itself says
            live = _U32.unpack(syscalls.map_lookup(self.fds.live, _U32.pack(0), 4) or _U32.pack(0))[0]
        self._live = live

    def carried(self) -> Carried:
        return Carried(self.insn_count, self.program_fd, astuple(self.fds), self._live)

    def _map(self, map_type: int, value_size: int, entries: int, name: str) -> int:
        fd = syscalls.map_create(map_type, 4, value_size, entries, name)
        self._resources.callback(os.close, fd)
        return fd

    @property
    def insn_count(self) -> int:
        return self._program.insn_count if self._program is not None else 0

    @property
    def migrates(self) -> bool:
        return self._program is not None and self._program.migrates

    @property
    def program_fd(self) -> int:
        assert self._program is not None
        return self._program.fd

    def join(self, sock: socket.socket, slot: int) -> None:
        syscalls.map_update(
            self.fds.socks,
            _U32.pack(slot),
            _U64.pack(sock.fileno()),
            f"adding slot {slot}'s socket to the sockarray",
        )

    def route(self, sockets: Sequence[socket.socket], slots: int) -> None:
        idle = 1 - self._live
        syscalls.map_update(
            self.fds.table, _U32.pack(idle), _TABLE.pack(*bucket_table(slots)), "writing the bucket table"
        )
        syscalls.map_update(self.fds.live, _U32.pack(0), _U32.pack(idle), "switching the bucket table")
        self._live = idle
        if self._program is None:
            # Every socket listens and sits in the sockarray before the program is attached, so
            # the program never sees a slot it cannot select.
            self._program = self._load(self._consts, self.fds)
            syscalls.attach_reuseport(sockets[0], self._program.fd)

    def leave(self, slot: int) -> None:
        syscalls.map_delete(self.fds.socks, _U32.pack(slot))

    def holds(self, slot: int, sock: socket.socket) -> bool:
        # A sockarray entry reads back as the socket's cookie; leaving the group empties it.
        entry = syscalls.map_lookup(self.fds.socks, _U32.pack(slot), _U64.size)
        return entry is not None and entry == sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, _U64.size)

    def reattach(self, sockets: Sequence[socket.socket], slots: int) -> None:
        syscalls.attach_reuseport(sockets[0], self.program_fd)

    def counters(self, slots: int) -> Counters:
        per_cpu = struct.Struct(f"={syscalls.possible_cpus()}Q")

        def total(index: int) -> int:
            raw = syscalls.map_lookup(self.fds.counters, _U32.pack(index), per_cpu.size)
            return sum(per_cpu.unpack(raw)) if raw else 0

        return Counters(tuple(total(i) for i in range(slots)), total(FAILURE_INDEX))

    def close(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None
        self._resources.close()


class CbpfRouting:
    """The classic program (``cbpf.py``): the table is compiled in, so a change is a new program.

    It returns a position in the kernel's list of the group's sockets, not a map key: the router
    keeps position = slot (see ``Router``); joining and leaving need nothing from here.
    """

    def __init__(self, spec: HashSpec, carried: Carried | None = None) -> None:
        self._consts = hashing_cbpf.program_constants(spec)
        # An adopted group keeps the program attached to it: nothing to redo until the next route.
        self.insn_count = carried.insn_count if carried is not None else 0
        self.migrates = False  # classic BPF has no migrate attach type

    def carried(self) -> Carried:
        return Carried(self.insn_count)

    def join(self, sock: socket.socket, slot: int) -> None:
        pass

    def route(self, sockets: Sequence[socket.socket], slots: int) -> None:
        insns = cbpf.build(self._consts, slots)
        # One setsockopt replaces the group's program atomically.
        syscalls.attach_reuseport_cbpf(sockets[0], casm.encode(insns))
        self.insn_count = len(insns)

    def leave(self, slot: int) -> None:
        pass

    def holds(self, slot: int, sock: socket.socket) -> None:
        return None

    def reattach(self, sockets: Sequence[socket.socket], slots: int) -> None:
        self.route(sockets, slots)

    def counters(self, slots: int) -> Counters:
        return Counters((None,) * slots, None)

    def close(self) -> None:
        pass  # the program lives and dies with the group's sockets


@dataclass(frozen=True)
class Loader:
    routing: Callable[[HashSpec, Carried | None], Routing]
    slot_of: Callable[[Address, HashSpec, int], int]  # the Python mirror of its choice
    max_slots: int
    describe: str


LOADERS: dict[str, Loader] = {
    "native": Loader(
        lambda spec, carried: MapRouting(spec, load_native, carried),
        hashing.slot_of,
        MAX_SLOTS,
        "eBPF built in Python, loaded with bpf(2)",
    ),
    "bcc": Loader(
        lambda spec, carried: MapRouting(spec, load_bcc, carried),
        hashing.slot_of,
        MAX_SLOTS,
        "eBPF compiled by bcc",
    ),
    "cbpf": Loader(CbpfRouting, hashing_cbpf.slot_of, cbpf.MAX_CBPF_SLOTS, "classic BPF, unprivileged"),
}
# auto: eBPF where the kernel allows it (counters, 256 slots), otherwise classic BPF.
AUTO_ORDER = ("native", "cbpf")
# What makes auto try the next loader: the kernel or the platform refusing, never bad input.
FALLBACK_ERRORS = (PrivilegeError, UnsupportedKernelError)
CHOICES = (*LOADERS, "auto")


def max_slots(loader: str) -> int:
    """The most slots ``loader`` can route; auto can use whichever of its loaders fits."""
    names = AUTO_ORDER if loader == "auto" else (loader,)
    return max(LOADERS[name].max_slots for name in names)
