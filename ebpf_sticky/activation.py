"""File descriptors handed in at start (systemd's ``LISTEN_FDS``), and the names the master stores
its own under (``FDSTORE=1``). Pure: the environment in, a plan out.

Under systemd the master pushes every slot's socket and a memfd holding the hash key to the
service's file-descriptor store (and the session layer's table and handoff sockets). When the
service starts again (``systemctl restart``, a crash with ``Restart=``), systemd hands them back as
fds 3, 4, ... with ``LISTEN_FDNAMES``: the new master goes on with the same sockets (their queues
were never closed: connections made meanwhile wait) and the same key (every client keeps its slot).
Fds without our names come from a ``.socket`` unit: the master takes them as its first slots if
they fit (see ``Router.open``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
SLOT_PREFIX = "ebpf-sticky-slot-"
KEY_NAME = "ebpf-sticky-key"
# The eBPF program's name carries its loader and size: "ebpf-sticky-prog-native-292".
PROGRAM_PREFIX = "ebpf-sticky-prog-"
MAP_PREFIX = "ebpf-sticky-map-"
MAP_ROLES = ("socks", "table", "live", "counters")  # program.MapFds, in order
SESSIONS_NAME = "ebpf-sticky-sessions"  # the session table's memfd
# Each slot's handoff socketpair, one name per end: "ebpf-sticky-handoff-2-receive".
HANDOFF_PREFIX = "ebpf-sticky-handoff-"
HANDOFF_ENDS = ("receive", "send")


def slot_name(slot: int) -> str:
    return f"{SLOT_PREFIX}{slot}"


def program_name(loader: str, insn_count: int) -> str:
    return f"{PROGRAM_PREFIX}{loader}-{insn_count}"


def map_name(role: str) -> str:
    return f"{MAP_PREFIX}{role}"


def handoff_name(slot: int, end: str) -> str:
    return f"{HANDOFF_PREFIX}{slot}-{end}"


@dataclass(frozen=True)
class SessionFds:
    """The session layer's kernel objects, carried to the next master (an upgrade's exec, or
    systemd's store): learnt ids and queued handoffs go on."""

    table: int  # the memfd of learnt ids every worker maps
    channels: tuple[tuple[int, int], ...]  # (receive end, send end) of each slot's handoffs


@dataclass(frozen=True)
class HandedProgram:
    """The eBPF program still attached to the stored sockets, and its maps (a socket sits in one
    sockarray at most: the next master must go on with this one)."""

    loader: str
    insn_count: int
    fd: int
    maps: tuple[int, int, int, int]


@dataclass(frozen=True)
class Handed:
    """What the service manager handed in, sorted by what it is for."""

    slots: list[int] = field(default_factory=list)  # our stored slot sockets, in slot order
    key: int | None = None  # the memfd holding the hash key
    foreign: list[int] = field(default_factory=list)  # a socket unit's sockets, in their order
    program: HandedProgram | None = None
    sessions: SessionFds | None = None


def listen_fds(environ: Mapping[str, str], pid: int) -> list[tuple[int, str]]:
    """(fd, name) of every fd handed to ``pid`` (sd_listen_fds_with_names); none if the variables
    are absent or meant for another process (LISTEN_PID)."""
    if environ.get("LISTEN_PID") != str(pid) or not environ.get("LISTEN_FDS"):
        return []
    try:
        count = int(environ["LISTEN_FDS"])
    except ValueError:
        raise ConfigError(f"LISTEN_FDS={environ['LISTEN_FDS']!r} is not a number of fds") from None
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    names += ["unknown"] * (count - len(names))  # what systemd names an fd it has no name for
    return [(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def sort_handed(fds: list[tuple[int, str]]) -> Handed:
    """Our slots by number (they must be 0..n-1: a gap would mean a lost slot), the key, the
    program and maps, and the rest."""
    slots: dict[int, int] = {}
    maps: dict[str, int] = {}
    key = None
    program: tuple[str, int, int] | None = None
    foreign = []
    table: int | None = None
    ends: dict[tuple[int, str], int] = {}
    for fd, name in fds:
        number = name.removeprefix(SLOT_PREFIX)
        loader, _, insns = name.removeprefix(PROGRAM_PREFIX).rpartition("-")
        channel, _, end = name.removeprefix(HANDOFF_PREFIX).partition("-")
        if name.startswith(SLOT_PREFIX) and number.isdigit():
            slots[int(number)] = fd
        elif name == KEY_NAME:
            key = fd
        elif name.startswith(PROGRAM_PREFIX) and loader and insns.isdigit():
            program = (loader, int(insns), fd)
        elif name.startswith(MAP_PREFIX) and name.removeprefix(MAP_PREFIX) in MAP_ROLES:
            maps[name.removeprefix(MAP_PREFIX)] = fd
        elif name == SESSIONS_NAME:
            table = fd
        elif name.startswith(HANDOFF_PREFIX) and channel.isdigit() and end in HANDOFF_ENDS:
            ends[int(channel), end] = fd
        else:
            foreign.append(fd)
    if sorted(slots) != list(range(len(slots))):
        raise ConfigError(
            f"the service manager handed back slots {sorted(slots)}, not 0..{len(slots) - 1}: the file "
            "descriptor store lost some (FileDescriptorStoreMax= too small?); stop the service fully to "
            "start a new group"
        )
    if slots and foreign:
        raise ConfigError(
            "both stored slot sockets and a socket unit's sockets were handed in: use one or the other"
        )
    if (program is None) != (len(maps) < len(MAP_ROLES)):
        raise ConfigError(
            "the service manager handed back the eBPF program without all its maps (or maps without "
            "it): FileDescriptorStoreMax= too small? stop the service fully to start a new group"
        )
    loaded = None
    if program is not None:
        loaded = HandedProgram(
            program[0], program[1], program[2], (maps["socks"], maps["table"], maps["live"], maps["counters"])
        )
    return Handed([slots[i] for i in range(len(slots))], key, foreign, loaded, _sessions(table, ends))


def _sessions(table: int | None, ends: dict[tuple[int, str], int]) -> SessionFds | None:
    """The table with both ends of every slot's channel 0..n-1, or none of them."""
    count = len(ends) // 2
    complete = all((slot, end) in ends for slot in range(count) for end in HANDOFF_ENDS)
    if table is None and not ends:
        return None
    if table is None or not ends or not complete or len(ends) % 2:
        raise ConfigError(
            "the service manager handed back the session table without every handoff socket (or "
            "them without it): FileDescriptorStoreMax= too small? stop the service fully to start a "
            "new group"
        )
    return SessionFds(table, tuple((ends[slot, "receive"], ends[slot, "send"]) for slot in range(count)))
