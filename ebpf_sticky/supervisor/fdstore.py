"""The group in systemd's file-descriptor store: pushed after it is built, adopted at start.

Pushed (``FDSTORE=1``, one named fd per message): each slot's socket, and a memfd holding the hash
key, which only the service itself is handed back. systemd keeps them while the service runs and
across a restart or a crash (as long as a restart job is queued: ``Restart=``, ``systemctl
restart``); ``systemctl stop`` empties the store, and the next start is a new group.

Adopted (``LISTEN_FDS``): the slot sockets are still listening, still in their SO_REUSEPORT group
with the program attached, and still queueing the connections made while no master ran; the new
master takes them as its slots, with the stored key, so the same clients reach the same slots and
nothing queued is reset. The eBPF program and its maps are stored too and taken as they are (a
socket sits in one sockarray at most, so the next master must go on with the one its sockets are
in); the classic-BPF program is attached anew from the key, which gives the same table.

With ``--session-key``/``--proxy-protocol``, the session table (a memfd of learnt ids) and every
slot's handoff socketpair are stored too: the next master goes on with the ids learnt before and
serves the handoffs queued in the channels meanwhile. A stored table this version cannot use
(another layout) is dropped with a warning: the learnt ids start over, the group starts anyway.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import astuple, replace

from ..activation import (
    HANDOFF_ENDS,
    KEY_NAME,
    MAP_ROLES,
    SESSIONS_NAME,
    Handed,
    SessionFds,
    handoff_name,
    listen_fds,
    map_name,
    program_name,
    slot_name,
    sort_handed,
)
from ..config import Launch
from ..errors import ConfigError
from ..hashing import KEY_BYTES
from ..kernel.router import Carried, Router
from ..notify import sd_notify_with_fds
from ..sessions.master import MasterSessions, carried_problem
from ..sessions.settings import SessionSettings

log = logging.getLogger("ebpf_sticky")
_ACTIVATION = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def handed_in() -> Handed:
    """What systemd handed this process; the variables are then removed (workers must not see them)."""
    fds = listen_fds(os.environ, os.getpid())
    for name in _ACTIVATION:
        os.environ.pop(name, None)
    return sort_handed(fds)


def adopt(settings: Launch, handed: Handed) -> Launch:
    """The settings with the stored key, and as many workers as slots were stored at least."""
    if handed.key is not None:
        key = os.pread(handed.key, KEY_BYTES + 1, 0)
        os.close(handed.key)
        if len(key) != KEY_BYTES:
            raise ConfigError(
                f"the stored hash key has {len(key)} bytes, not {KEY_BYTES}: stop the service fully"
            )
        log.info("hash key: the group's own, from systemd's file-descriptor store")
        settings = replace(settings, spec=replace(settings.spec, key=key))
    count = len(handed.slots or handed.foreign)
    if handed.slots:
        log.info("systemd handed back %d slot sockets: the group goes on", count)
    elif count:
        log.info("a socket unit handed in %d sockets: they are the first slots", count)
    if count > settings.workers:
        log.warning(
            "%d slots handed in, --workers %d: keeping %d (TTOU retires one)", count, settings.workers, count
        )
        settings = replace(settings, workers=count)
    return settings


def open_router(settings: Launch, handed: Handed, defer_accept: int = 0) -> Router:
    """The group: on the sockets handed in (with their program and maps if systemd kept them: a
    socket sits in one sockarray at most), completed up to --workers."""
    s = settings
    sockets = [socket.socket(fileno=fd) for fd in handed.slots or handed.foreign]
    program = handed.program
    if program is None:
        return Router.open(
            s.bind,
            s.spec,
            s.workers,
            udp=s.udp,
            loader=s.loader,
            backlog=s.uvicorn.backlog,
            existing=sockets,
            defer_accept=defer_accept,
        )
    carried = Carried(program.insn_count, program.fd, program.maps, live_table=None)
    router = Router.adopt(
        s.bind, s.spec, sockets, udp=s.udp, loader=program.loader, carried=carried, defer_accept=defer_accept
    )
    try:
        while router.slots < s.workers:
            router.add_slot(s.uvicorn.backlog)
    except BaseException:
        router.close()
        raise
    return router


def store_group(key: bytes, router: Router) -> None:
    """Push the key, every slot's socket, and the eBPF program and maps, under a service manager
    only (systemd drops duplicates: pushing what it handed back is harmless)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    _store_key(key)
    for slot, sock in enumerate(router.sockets):
        store_slot(slot, sock)
    if router.map_fds is not None:
        # FDPOLL=0: a BPF map fd polls as EPOLLERR (bpf_map_poll), and systemd drops a stored
        # fd that reports an error unless told not to watch it.
        _store(program_name(router.loader, router.insn_count), router.program_fd, poll=False)
        for role, fd in zip(MAP_ROLES, astuple(router.map_fds), strict=True):
            _store(map_name(role), fd, poll=False)


def adopt_sessions(settings: SessionSettings, stored: SessionFds, slots: int) -> MasterSessions | None:
    """The stored table and channels, over ``slots`` now; None (the fds closed and removed from the
    store) when this version cannot use them."""
    why = carried_problem(settings, stored, None)
    if why:
        log.warning("the stored session table is not used (%s): learnt session ids start over", why)
        for fd in (stored.table, *(fd for pair in stored.channels for fd in pair)):
            os.close(fd)
        _send(f"FDSTOREREMOVE=1\nFDNAME={SESSIONS_NAME}", ())
        for slot in range(len(stored.channels)):
            for end in HANDOFF_ENDS:
                _send(f"FDSTOREREMOVE=1\nFDNAME={handoff_name(slot, end)}", ())
        return None
    sessions = MasterSessions.adopt(settings, stored)
    sessions.slots_changed(slots)
    log.info("session table: the group's own, from systemd's file-descriptor store")
    return sessions


def store_sessions(sessions: MasterSessions) -> None:
    """The table and every slot's handoff channel, under a service manager only."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    carried = sessions.carried()
    _store(SESSIONS_NAME, carried.table)
    for slot, pair in enumerate(carried.channels):
        for end, fd in zip(HANDOFF_ENDS, pair, strict=True):
            _store(handoff_name(slot, end), fd)


def _store_key(key: bytes) -> None:
    fd = os.memfd_create(KEY_NAME, os.MFD_CLOEXEC)
    try:
        os.write(fd, key)
        _store(KEY_NAME, fd)
    finally:
        os.close(fd)  # systemd holds its own copy


def store_slot(slot: int, sock: socket.socket) -> None:
    _store(slot_name(slot), sock.fileno())


def forget_slot(slot: int) -> None:
    """A retired slot must not come back at the next start."""
    _send(f"FDSTOREREMOVE=1\nFDNAME={slot_name(slot)}", ())


def _store(name: str, fd: int, *, poll: bool = True) -> None:
    _send(f"FDSTORE=1\nFDNAME={name}" + ("" if poll else "\nFDPOLL=0"), (fd,))


def _send(message: str, fds: tuple[int, ...]) -> None:
    try:
        sd_notify_with_fds(message, fds)
    except OSError as exc:  # the group serves on; only a restart would miss it
        log.warning("systemd's file-descriptor store refused %s: %s", message.split("\n")[-1], exc)
