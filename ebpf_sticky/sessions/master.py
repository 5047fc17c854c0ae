"""The master's share of the session layer: the shared table and the handoff sockets it keeps.

The master creates both once and keeps them for the life of the group, like the slots' sockets:
a worker's replacement inherits the table (learnt ids survive a crash) and the handoffs queued for
its slot. An in-place upgrade carries both to the new image by inheritance (``adopt``), after the
installed code checked that they fit it (``check_carried``). The master itself never reads a
request.
"""

from __future__ import annotations

import contextlib
import heapq
import mmap
import os
import socket
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..activation import SessionFds
from ..config import Launch
from ..contract import HANDOFF_RECV_FD, HANDOFF_SEND_FD0, SESSION_TABLE_FD
from ..errors import HandoverError
from ..hashing import MAX_SLOTS
from ..kernel import diag
from .handoff import Channels
from .ownership import HEADER, SessionTable, carried_mismatch, table_key_of, table_size
from .settings import SessionSettings

# The top-source warning: at least this many connections open, the top few sources carrying more
# than this share of them.
CONCENTRATION_MIN = 32
CONCENTRATION_SHARE = 0.5
CONCENTRATION_TOP = 3


@dataclass(frozen=True)
class SessionFigures:
    """What `status` and /metrics show of the session layer."""

    per_slot: tuple[dict[str, int], ...]  # ownership.COUNTERS of each slot
    concentration: float | None  # share of the open connections from the top few sources
    forwarded: bool = False  # addresses already come from PROXY headers or X-Forwarded-For

    @property
    def concentrated(self) -> bool:
        """Worth a warning: few sources, and nothing yet that would see past them."""
        share = self.concentration
        return share is not None and share > CONCENTRATION_SHARE and not self.forwarded


CONCENTRATION_WARNING = (
    "a few source addresses carry most connections: a proxy in front? --proxy-protocol or "
    "--session-key forwarded would route by the client"
)


def concentration(peers: Sequence[bytes]) -> float | None:
    """The share of ``peers`` (one per connection) from the top few addresses; None for fewer
    than ``CONCENTRATION_MIN`` connections, too few to say. Pure."""
    if len(peers) < CONCENTRATION_MIN:
        return None
    return sum(heapq.nlargest(CONCENTRATION_TOP, Counter(peers).values())) / len(peers)


def forwarded_allow_ips(launch: Launch) -> str:
    """uvicorn's --forwarded-allow-ips as the workers apply it, its default included."""
    given = launch.uvicorn.config.get("forwarded_allow_ips")
    return str(given) if given is not None else os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")


def session_settings(launch: Launch, loader: str) -> SessionSettings:
    """What the workers get: the table key (``table_key_of``), and the routing key only if an
    address decides."""
    settings = SessionSettings(
        keys=launch.session_keys,
        proxy_protocol=launch.proxy_protocol,
        trusted=forwarded_allow_ips(launch),
        table_key=table_key_of(launch.spec.key).hex(),
        prefix4=launch.spec.prefix4,
        prefix6=launch.spec.prefix6,
        mirror="cbpf" if loader == "cbpf" else "native",
    )
    if settings.needs_routing_key:
        settings = replace(settings, routing_key=launch.spec.key.hex())
    return settings


def channels_for(slots: int) -> int:
    """Handoff channels to keep for ``slots`` live slots. A worker gets every channel's send end
    once, at exec: channels made ahead let the workers already running hand connections to slots
    added later (TTIN), up to twice the group (at least four more) without a renewal."""
    return min(MAX_SLOTS, slots + max(slots, 4))


@dataclass
class MasterSessions:
    settings: SessionSettings
    memfd: int
    memory: mmap.mmap
    table: SessionTable
    channels: Channels

    @classmethod
    def open(cls, settings: SessionSettings, slots: int) -> MasterSessions:
        memfd = os.memfd_create("ebpf-sticky-sessions", os.MFD_CLOEXEC)
        os.ftruncate(memfd, table_size())
        memory = _map(memfd)
        table = SessionTable.create(memoryview(memory), bytes.fromhex(settings.table_key), slots)
        sessions = cls(settings, memfd, memory, table, Channels())
        sessions.slots_changed(slots)
        return sessions

    @classmethod
    def adopt(cls, settings: SessionSettings, carried: SessionFds) -> MasterSessions:
        """The table and channels a master before left (open across an upgrade's exec, or in
        systemd's store), once ``carried_problem`` found none: the ids it learnt stay routable and
        the handoffs queued in its channels are served."""
        memory = _map(carried.table)
        table = SessionTable(memoryview(memory), bytes.fromhex(settings.table_key))
        return cls(settings, carried.table, memory, table, Channels.adopt(carried.channels))

    def carried(self) -> SessionFds:
        """The table's memfd and every slot's channel, for the next master's ``adopt``."""
        return SessionFds(self.memfd, self.channels.carried())

    def slots_changed(self, slots: int) -> None:
        """After a slot is added or retired: workers hash addresses over the live count."""
        for slot in range(channels_for(slots)):
            self.channels.ensure(slot)
        self.table.set_slots(slots)

    def worker_fds(self, slot: int) -> dict[int, int]:
        """Target fd in the worker → the master's fd (see ``contract``)."""
        receive_end, send_ends = self.channels.worker_fds(slot)
        fds = {SESSION_TABLE_FD: self.memfd, HANDOFF_RECV_FD: receive_end}
        fds.update({HANDOFF_SEND_FD0 + i: fd for i, fd in enumerate(send_ends)})
        return fds

    def worker_settings(self) -> str:
        return replace(self.settings, send_slots=len(self.channels.pairs)).to_json()

    def figures(self, slots: int, port: int) -> SessionFigures:
        """The slots' counters, and where the port's open connections come from: the kernel's
        list, read when asked, so that no worker counts anything per connection."""
        rows = tuple(self.table.counters(slot) for slot in range(slots))
        forwarded = self.settings.needs_routing_key
        share = None
        if not forwarded:  # else the peers are the proxies by design, and clients routed past them
            # sock_diag refused (a sandbox): no figure rather than a wrong one.
            with contextlib.suppress(OSError):
                share = concentration(diag.peers(port))
        return SessionFigures(rows, share, forwarded)

    def close(self) -> None:
        self.channels.close()
        self.table.buf.release()
        self.memory.close()
        os.close(self.memfd)


def _map(memfd: int) -> mmap.mmap:
    return mmap.mmap(memfd, table_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def carried_problem(settings: SessionSettings, carried: SessionFds, slots: int | None) -> str:
    """Why a carried table and its channels cannot go on under these settings, or "": the table
    must be this version's, under this launch's table key, and route over ``slots`` (None: any
    count, as after a restart that tops the group up); every slot needs a datagram channel."""
    try:
        key = bytes.fromhex(settings.table_key)
        head, size = os.pread(carried.table, HEADER.size, 0), os.fstat(carried.table).st_size
        why = carried_mismatch(head, size, key, slots)
        if not why and slots is not None and len(carried.channels) < slots:
            why = f"{len(carried.channels)} handoff channels for {slots} slots"
        if not why and not all(_is_datagram_socket(fd) for pair in carried.channels for fd in pair):
            why = "a handoff channel is not a datagram socket"
    except OSError as exc:
        why = f"its fds are not open ({exc.strerror or exc})"
    return why


def check_carried(settings: SessionSettings, carried: SessionFds, slots: int) -> None:
    """An upgrade's: raise HandoverError unless ``carried_problem`` finds none."""
    why = carried_problem(settings, carried, slots)
    if why:
        raise HandoverError(
            f"the session table cannot be carried over ({why}): restart the group to run this "
            "version (the learnt session ids are then forgotten)"
        )


def _is_datagram_socket(fd: int) -> bool:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    probe = socket.socket(fileno=fd)
    try:
        return probe.family == socket.AF_UNIX and probe.type == socket.SOCK_DGRAM
    finally:
        probe.detach()
