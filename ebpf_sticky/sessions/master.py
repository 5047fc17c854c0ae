"""The master's share of the session layer: the shared table and the handoff sockets it keeps.

The master creates both once and keeps them for the life of the group, like the slots' sockets:
a worker's replacement inherits the table (learnt ids survive a crash) and the handoffs queued for
its slot. The master itself never reads a request.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass, replace

from ..config import Launch
from ..contract import HANDOFF_RECV_FD, HANDOFF_SEND_FD0, SESSION_TABLE_FD
from .handoff import Channels
from .ownership import SessionTable, table_size
from .settings import SessionSettings

# The top-source warning: at least this many connections seen, the top sources of each worker's
# window carrying more than this share of them.
CONCENTRATION_MIN = 200
CONCENTRATION_SHARE = 0.5


@dataclass(frozen=True)
class SessionFigures:
    """What `status` and /metrics show of the session layer."""

    per_slot: tuple[dict[str, int], ...]  # ownership.COUNTERS of each slot
    concentration: float | None  # share of recent connections from the top few sources
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


def forwarded_allow_ips(launch: Launch) -> str:
    """uvicorn's --forwarded-allow-ips as the workers apply it, its default included."""
    given = launch.uvicorn.config.get("forwarded_allow_ips")
    return str(given) if given is not None else os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")


TABLE_KEY_LABEL = b"ebpf-sticky session table"


def session_settings(launch: Launch, loader: str) -> SessionSettings:
    """What the workers get: the table key, and the routing key only if an address decides.

    The table key is a PRF of the launch's hash key (it tells nothing of it), so ids issued before
    an in-place upgrade or a restart from the fd store stay valid under the same key."""
    settings = SessionSettings(
        keys=launch.session_keys,
        proxy_protocol=launch.proxy_protocol,
        trusted=forwarded_allow_ips(launch),
        table_key=hashlib.blake2b(TABLE_KEY_LABEL, key=launch.spec.key, digest_size=16).hexdigest(),
        prefix4=launch.spec.prefix4,
        prefix6=launch.spec.prefix6,
        mirror="cbpf" if loader == "cbpf" else "native",
    )
    if settings.needs_routing_key:
        settings = replace(settings, routing_key=launch.spec.key.hex())
    return settings


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
        memory = mmap.mmap(memfd, table_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        table = SessionTable.create(memoryview(memory), bytes.fromhex(settings.table_key), slots)
        sessions = cls(settings, memfd, memory, table, Channels())
        sessions.slots_changed(slots)
        return sessions

    def slots_changed(self, slots: int) -> None:
        """After a slot is added or retired: workers hash addresses over the live count."""
        for slot in range(slots):
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

    def figures(self, slots: int) -> SessionFigures:
        rows = tuple(self.table.counters(slot) for slot in range(slots))
        total = sum(row["connections"] for row in rows)
        share = sum(row["top_source"] for row in rows) / total if total >= CONCENTRATION_MIN else None
        return SessionFigures(rows, share, self.settings.needs_routing_key)

    def close(self) -> None:
        self.channels.close()
        self.table.buf.release()
        self.memory.close()
        os.close(self.memfd)
