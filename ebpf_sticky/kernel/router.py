"""The group: one SO_REUSEPORT listening socket per slot, routed by the loader's program.

``Router.open`` builds everything or, if any step fails, nothing: every fd and socket made so far is
closed before the error propagates. With ``loader="auto"`` it applies the policy of ``loaders.py``:
native eBPF where the kernel allows it, else classic BPF, and says which and why. The router knows
nothing of workers or the CLI; the supervisor asks it to add or retire slots and reads its counters.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from ..addresses import Bind
from ..errors import AddressInUseError, ConfigError, KernelError, StickyError
from ..hashing import MAX_SLOTS, Address, HashSpec
from . import diag
from .loaders import AUTO_ORDER, CHOICES, FALLBACK_ERRORS, LOADERS, Carried, Counters, MapRouting, Routing
from .program import MapFds

log = logging.getLogger("ebpf_sticky")
_U32 = struct.Struct("=I")
_TCPI_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: a listener's accept-queue length
DEFAULT_BACKLOG = 1024
# TCP_DEFER_ACCEPT, as nginx's `listen ... deferred`: a connection reaches the accept queue (and
# wakes the worker) only once its first bytes have arrived, so accepting and reading it happen in
# one turn of the worker's loop. The kernel rounds the seconds to SYN-ACK retransmissions (1 s:
# one); a client still silent by then is queued anyway when it acknowledges the retransmission,
# so nothing is dropped. Only for protocols where the client speaks first (HTTP, TLS).
DEFER_ACCEPT_S = 1
__all__ = ["DEFAULT_BACKLOG", "DEFER_ACCEPT_S", "Carried", "Counters", "GroupView", "Router"]


@dataclass(frozen=True)
class GroupView:
    """What the kernel says of the group now (``Router.view``), for the master's watch."""

    listening: tuple[bool, ...]  # per slot: still a listener (SO_ACCEPTCONN; always True for UDP)
    in_map: tuple[bool, ...] | None  # per slot: the sockarray holds its socket; None under cbpf
    order: tuple[int, ...] | None  # the listening slots in the order they joined (TCP; see diag.py)
    strangers: int  # other listeners of our uid on our address and port: they joined the group


def _listener(bind: Bind, udp: bool, backlog: int, defer_accept: int = 0) -> socket.socket:
    sock = socket.socket(bind.family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if bind.dual_stack else 1)
        _bind(sock, bind)
        if not udp:
            if defer_accept:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, bind: Bind) -> None:
    """Bind, with the kernel's refusals said as what to do."""
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


class Router:
    """A sticky SO_REUSEPORT group. Use as a context manager, or call ``close``.

    Position = slot. The classic-BPF program returns a position in the kernel's list of the
    group's sockets (``reuse->socks[]``, net/core/sock_reuseport.c), not a slot: a socket is
    appended when it joins (TCP at listen(), UDP at bind()), and when a member leaves (its last fd
    closed, or shutdown() of a listener) the kernel moves the *last* member into the hole
    (``__reuseport_detach_sock``: ``socks[i] = socks[num_socks - 1]``). So position = slot holds
    only if sockets join in slot order and only the last one ever leaves, and this class keeps
    both true for every loader: slot k's socket is made after slots 0..k-1; the master keeps
    every socket for the life of the group (a worker's crash, kill -9 or HUP closes the worker's
    fd, never the socket); only the highest slot is ever released, after a new program routed
    its clients away (``retire_slot``) and its queue drained; and release shuts a TCP listener
    down before closing it, which takes it out of the group at once even if another process
    still holds a duplicate of its fd (a worker's leftover child). Without that, the duplicate
    would keep the retired socket in the group, the next ``add_slot`` would join *behind* it, and
    the new slot's clients would be sent to the dead socket (tested). UDP offers no such call: a
    UDP worker's leftover child that keeps fd 3 open after its slot is retired keeps that socket
    in the group, and slots added later are misrouted until it closes (docs/discussion/limits.md).
    """

    def __init__(
        self, bind: Bind, spec: HashSpec, *, udp: bool, loader: str, routing: Routing, defer_accept: int = 0
    ) -> None:
        # Private: use Router.open, which builds the group all-or-nothing.
        self.spec = spec
        self.udp = udp
        self.defer_accept = 0 if udp else defer_accept  # seconds of TCP_DEFER_ACCEPT, 0: off
        self.loader = loader  # the loader actually running, never "auto"
        self.choice = f"{loader} ({LOADERS[loader].describe}), asked for with --loader {loader}"
        self.bind = bind
        self.sockets: list[socket.socket] = []
        self.retiring: int | None = None  # the slot between retire_slot and release_slot
        # Slots whose socket a holder made something other than a listener: no repair brings them back.
        self.lost: set[int] = set()
        # Without migration: the handshakes in flight when the retiring slot got its last client.
        self._handshakes: set[diag.Handshake] = set()
        self.backlog = DEFAULT_BACKLOG
        self._routing = routing

    @classmethod
    def open(
        cls,
        bind: Bind,
        spec: HashSpec,
        slots: int,
        *,
        udp: bool = False,
        loader: str = "auto",
        backlog: int = DEFAULT_BACKLOG,
        existing: Sequence[socket.socket] = (),
        defer_accept: int = 0,
    ) -> Router:
        """The group of ``slots`` listening sockets on ``bind``. ``existing``: sockets handed in (by
        systemd) to take as slots 0, 1, ... in that order, which must be the order they joined their
        group; more are made up to ``slots``. ``defer_accept`` (seconds, TCP only): queue connections
        once the client has sent data (``DEFER_ACCEPT_S`` for HTTP)."""
        for sock in existing:
            _check_fits(sock, bind, udp)
        if not 1 <= slots <= MAX_SLOTS:
            raise ConfigError(f"workers must be 1..{MAX_SLOTS}, got {slots}")
        if loader not in CHOICES:
            raise ConfigError(f"unknown loader {loader!r}: choose one of {', '.join(CHOICES)}")
        if loader != "auto":
            return cls._open(bind, spec, slots, udp, loader, backlog, existing, defer_accept)
        refused: list[str] = []
        errors: list[StickyError] = []
        for name in AUTO_ORDER:
            try:
                router = cls._open(bind, spec, slots, udp, name, backlog, existing, defer_accept)
            except (*FALLBACK_ERRORS, _TooManySlots) as exc:
                refused.append(f"{name} refused: {exc}")
                errors.append(exc)
                continue
            why = "; ".join(refused) if refused else "the kernel allows eBPF"
            router.choice = f"{name} ({LOADERS[name].describe}), chosen by --loader auto: {why}"
            log.info("router: %s", router.choice)
            return router
        # Nothing runs here: report the first refusal (the real cause), with what auto tried.
        first = errors[0]
        first.args = (f"no router can run here ({'; '.join(refused)})",)
        raise first

    @classmethod
    def _open(
        cls,
        bind: Bind,
        spec: HashSpec,
        slots: int,
        udp: bool,
        loader: str,
        backlog: int,
        existing: Sequence[socket.socket] = (),
        defer_accept: int = 0,
    ) -> Router:
        entry = LOADERS[loader]
        if slots > entry.max_slots:
            raise _TooManySlots(
                f"--workers {slots} is more than the {loader} router fits ({entry.max_slots} slots)"
            )
        # Sockets handed in already have the group's port; otherwise a TCP port 0 is fixed first.
        ports = contextlib.nullcontext(bind) if existing else _port_for(bind, udp)
        with ports as bind:
            router = cls(
                bind,
                spec,
                udp=udp,
                loader=loader,
                routing=entry.routing(spec, None),
                defer_accept=defer_accept,
            )
            router.backlog = backlog
            try:
                for slot in range(slots):
                    router._add_socket(backlog, existing[slot] if slot < len(existing) else None)
                router._routing.route(router.sockets, slots)
            except BaseException:
                router.sockets = [
                    sock for sock in router.sockets if sock not in existing
                ]  # not ours to close
                router.close()
                raise
        return router

    @classmethod
    def adopt(
        cls,
        bind: Bind,
        spec: HashSpec,
        sockets: list[socket.socket],
        *,
        udp: bool,
        loader: str,
        carried: Carried,
        defer_accept: int = 0,
    ) -> Router:
        """The group a master built before it exec'd this image: its sockets (in slot order, which
        is the kernel's order in the group) and its routing's kernel objects, all taken as they are.
        Nothing is created or attached, so no client moves and no capability is needed.
        ``defer_accept`` applies to slots added later."""
        router = cls(
            bind,
            spec,
            udp=udp,
            loader=loader,
            routing=LOADERS[loader].routing(spec, carried),
            defer_accept=defer_accept,
        )
        router.sockets = sockets
        router.choice = f"{loader} ({LOADERS[loader].describe}), carried over from before the upgrade"
        return router

    def carried(self) -> Carried:
        """What ``adopt`` needs besides the sockets."""
        return self._routing.carried()

    def _add_socket(self, backlog: int, handed: socket.socket | None = None) -> None:
        bind = self.bind
        if self.sockets and bind.port == 0:
            bind = bind.with_port(self.port)
        # Joins the kernel's group last: its position is len(self.sockets), its slot.
        sock = handed or _listener(bind, self.udp, backlog, self.defer_accept)
        try:
            self._routing.join(sock, len(self.sockets))
        except BaseException:
            sock.close()
            raise
        self.sockets.append(sock)

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    @property
    def slots(self) -> int:
        return len(self.sockets)

    @property
    def max_slots(self) -> int:
        return LOADERS[self.loader].max_slots

    @property
    def insn_count(self) -> int:
        return self._routing.insn_count

    @property
    def program_fd(self) -> int:
        """The eBPF program's fd (native and bcc loaders)."""
        if not isinstance(self._routing, MapRouting):
            raise ValueError(f"the {self.loader} router has no eBPF program fd")
        return self._routing.program_fd

    @property
    def map_fds(self) -> MapFds | None:
        """The eBPF router's maps (None under cbpf): for programs measured beside ours (the bench)."""
        return self._routing.fds if isinstance(self._routing, MapRouting) else None

    def slot_of(self, address: Address, slots: int) -> int:
        """The slot this router's program picks for ``address`` with ``slots`` live slots."""
        return LOADERS[self.loader].slot_of(address, self.spec, slots)

    def add_slot(self, backlog: int = DEFAULT_BACKLOG) -> int:
        """A new listening socket in a new highest slot; it takes exactly its fair share."""
        if self.slots >= self.max_slots:
            raise ConfigError(f"cannot add a slot: the {self.loader} router fits at most {self.max_slots}")
        if self.retiring is not None:
            raise ConfigError(f"cannot add a slot while slot {self.retiring} is retiring")
        self._add_socket(backlog)
        self.backlog = backlog
        self._routing.route(self.sockets, self.slots)
        return self.slots - 1

    def retire_slot(self) -> int:
        """Route the highest slot's clients away; its socket stays until ``release_slot``.

        Between the two, the socket's queue drains into its worker: nothing queued is reset.
        """
        if self.slots <= 1:
            raise ConfigError("cannot retire the last slot")
        if self.retiring is not None:
            raise ConfigError(f"slot {self.retiring} is already retiring")
        self._routing.route(self.sockets, self.slots - 1)
        self.retiring = self.slots - 1
        if not self.udp and not self._routing.migrates:
            self._handshakes = self._in_flight()
        return self.retiring

    @property
    def migrates(self) -> bool:
        """Whether closing a slot moves its handshakes to the others (eBPF on 5.14+)."""
        return self._routing.migrates

    def _in_flight(self) -> set[diag.Handshake]:
        try:
            return diag.handshakes(self.port)
        except OSError as exc:  # sock_diag filtered (a seccomp profile): drain the queue alone
            log.warning("cannot list handshakes in flight (%s): a retiring slot may reset some", exc)
            return set()

    def release_slot(self, slot: int) -> None:
        """Close a retired slot's socket (the highest one)."""
        if slot != self.slots - 1 or slot != self.retiring:
            raise ValueError("only the retired highest slot can be released")
        self._routing.leave(slot)
        sock = self.sockets.pop()
        _leave_group(sock, self.udp)
        sock.close()
        self.retiring = None
        self._handshakes = set()

    def pending(self, slot: int) -> int:
        """Connections waiting in the slot's accept queue (TCP); 0 for UDP. For the retiring slot
        of a group without migration, also the handshakes that were in flight when it retired
        (on any slot: the kernel does not say which listener answered them): closing it before
        they complete would reset those that were its own."""
        if self.udp:
            return 0
        info = self.sockets[slot].getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        queued = int(_U32.unpack_from(info, _TCPI_UNACKED)[0])
        if slot == self.retiring and self._handshakes:
            self._handshakes &= self._in_flight()
        return queued + len(self._handshakes)

    def counters(self) -> Counters:
        return self._routing.counters(self.slots)

    def view(self) -> GroupView:
        """Each slot's membership as the kernel sees it now. Raises OSError."""
        if self.udp:
            listening = (True,) * self.slots
        else:
            listening = tuple(
                bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) for s in self.sockets
            )
        held = [self._routing.holds(slot, sock) for slot, sock in enumerate(self.sockets)]
        in_map = None if None in held else tuple(bool(h) for h in held)
        if self.udp:
            return GroupView(listening, in_map, None, 0)
        inodes = {os.fstat(sock.fileno()).st_ino: slot for slot, sock in enumerate(self.sockets)}
        ours = self.sockets[0].getsockname()[0]
        here = [
            found
            for found in diag.listeners(self.bind.family, self.port)
            if socket.inet_ntop(
                self.bind.family, found.address[: 4 if self.bind.family == socket.AF_INET else 16]
            )
            == ours
        ]
        order = tuple(inodes[found.inode] for found in here if found.inode in inodes)
        if self.bind.family == socket.AF_INET:
            order = order[::-1]  # the hash lists IPv4 listeners newest first
        strangers = sum(1 for found in here if found.inode not in inodes and found.uid == os.geteuid())
        return GroupView(listening, in_map, order, strangers)

    def repair(self, relisten: Sequence[int], reinsert: Sequence[int], rejoin_all: bool) -> None:
        """Put slots back: listen again, refill sockarray entries, or (classic BPF, positions
        moved) rejoin every slot but slot 0 in slot order, which resets their queued connections.
        A slot whose socket cannot listen again does not keep the others out: they are put back,
        then KernelError names it. Raises StickyError or OSError."""
        found: dict[int, OSError] = {}  # slots lost in this repair

        def listen(slot: int) -> None:
            try:
                self.sockets[slot].listen(self.backlog)
            except OSError as exc:  # a holder connected it elsewhere: it is no listener any more
                self.lost.add(slot)
                found[slot] = exc

        if rejoin_all:
            # Slot 0 never leaves: once every other member is out, it is alone at position 0
            # wherever it stood, so its queue and a worker blocked in its accept() are untouched.
            # The others leave and join again in slot order, each out for a few system calls. A
            # worker blocked in accept() on one of them is woken by its leaving and, if it runs
            # before the listen(), gets EINVAL (often: the wake-up can preempt the master).
            # uvicorn's workers carry on; a blocking server may exit, and is replaced on its slot.
            # Lost slots are in no group: they are left as they are.
            if 0 in relisten:
                listen(0)
            rejoin = [slot for slot in range(1, self.slots) if slot not in self.lost]
            for slot in rejoin:
                # Every one, not only those the view saw listening: a worker may have put its slot
                # back since, at the end. One that is out already answers ENOTCONN.
                try:
                    self.sockets[slot].shutdown(socket.SHUT_RD)
                except OSError as exc:
                    if exc.errno != errno_mod.ENOTCONN:
                        raise
            relisten = rejoin
        for slot in relisten:
            listen(slot)
        for slot in reinsert:
            if slot not in self.lost:
                self._routing.join(self.sockets[slot], slot)
        if relisten or rejoin_all:
            # A group that was emptied lost its program; attaching again is atomic and harmless.
            # Through a member: a lost socket is in no group.
            members = [sock for slot, sock in enumerate(self.sockets) if slot not in self.lost]
            if members:
                self._routing.reattach(members, self.slots - (self.retiring is not None))
        if found:
            slot, error = next(iter(found.items()))
            raise KernelError(
                f"slot {slot}'s socket cannot listen again ({error.strerror}): a holder made it "
                "something else; its clients go to the other slots until the group is restarted",
                error.errno or 0,
            )

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        self._routing.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _check_fits(sock: socket.socket, bind: Bind, udp: bool) -> None:
    """A socket handed in (systemd's fd store, a socket unit) must be what --bind and --udp ask
    for, and in a SO_REUSEPORT group, or it cannot be a slot: say which and how to fix it."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    name = sock.getsockname()
    where = f"{name[0]}:{name[1]}" if sock.family == socket.AF_INET else f"[{name[0]}]:{name[1]}"
    if sock.family != bind.family or sock.type != kind:
        raise ConfigError(
            f"the socket handed in ({where}) is not a {'UDP' if udp else 'TCP'} socket for --bind {bind}"
        )
    if (name[0], name[1] if bind.port else 0) != (bind.host, bind.port):
        raise ConfigError(f"the socket handed in listens on {where}, not on --bind {bind}: make them agree")
    if not udp and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ConfigError(f"the socket handed in ({where}) does not listen: a socket unit needs Accept=no")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        raise ConfigError(
            f"the socket handed in ({where}) has no SO_REUSEPORT, so no slot can join it: "
            "set ReusePort=yes in the socket unit"
        )


def _leave_group(sock: socket.socket, udp: bool) -> None:
    """Take a TCP listener out of its group now, even if another process holds a duplicate of it:
    shutdown(SHUT_RD) makes tcp_disconnect unhash it. It is the group's last member, so the kernel
    moves nothing into its place. UDP has no such call (shutdown does not unhash; connect() only
    makes lookups skip it; SO_BINDTODEVICE detaches it but then it outscores the group on that
    device), so a duplicate held elsewhere keeps a retired UDP socket in the group: see the class.
    """
    if not udp:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)


@contextlib.contextmanager
def _port_for(bind: Bind, udp: bool) -> Iterator[Bind]:
    """``bind`` with a port: for TCP port 0, one the kernel picks, held by a bound socket of our
    own (SO_REUSEADDR, never listening: it joins no group) until the slots are bound to it. A
    listener bound to port 0 gives the port back when it is shut down (no SOCK_BINDPORT_LOCK) and
    its next listen() picks another: a worker could move its slot off the group's port."""
    if bind.port != 0 or udp:
        yield bind
        return
    with socket.socket(bind.family, socket.SOCK_STREAM) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind.family == socket.AF_INET6:
            holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if bind.dual_stack else 1)
        _bind(holder, bind)
        yield bind.with_port(holder.getsockname()[1])


class _TooManySlots(ConfigError):
    """More slots than the loader fits: auto tries the next loader, an explicit choice is bad input."""
