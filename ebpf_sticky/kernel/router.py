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
import socket
import struct
from types import TracebackType

from ..addresses import Bind
from ..errors import AddressInUseError, ConfigError, KernelError, StickyError
from ..hashing import MAX_SLOTS, Address, HashSpec
from .loaders import AUTO_ORDER, CHOICES, FALLBACK_ERRORS, LOADERS, Counters, MapRouting, Routing
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
__all__ = ["DEFAULT_BACKLOG", "DEFER_ACCEPT_S", "Counters", "Router"]


def _listener(bind: Bind, udp: bool, backlog: int, defer_accept: int = 0) -> socket.socket:
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
            if defer_accept:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


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
    in the group, and slots added later are misrouted until it closes (the README says so).
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
        defer_accept: int = 0,
    ) -> Router:
        """The group of ``slots`` listening sockets on ``bind``. ``defer_accept`` (seconds, TCP
        only): queue connections once the client has sent data (``DEFER_ACCEPT_S`` for HTTP)."""
        if not 1 <= slots <= MAX_SLOTS:
            raise ConfigError(f"workers must be 1..{MAX_SLOTS}, got {slots}")
        if loader not in CHOICES:
            raise ConfigError(f"unknown loader {loader!r}: choose one of {', '.join(CHOICES)}")
        if loader != "auto":
            return cls._open(bind, spec, slots, udp, loader, backlog, defer_accept)
        refused: list[str] = []
        errors: list[StickyError] = []
        for name in AUTO_ORDER:
            try:
                router = cls._open(bind, spec, slots, udp, name, backlog, defer_accept)
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
        cls, bind: Bind, spec: HashSpec, slots: int, udp: bool, loader: str, backlog: int, defer_accept: int
    ) -> Router:
        entry = LOADERS[loader]
        if slots > entry.max_slots:
            raise _TooManySlots(
                f"--workers {slots} is more than the {loader} router fits ({entry.max_slots} slots)"
            )
        router = cls(
            bind, spec, udp=udp, loader=loader, routing=entry.routing(spec), defer_accept=defer_accept
        )
        try:
            for _ in range(slots):
                router._add_socket(backlog)
            router._routing.route(router.sockets, slots)
        except BaseException:
            router.close()
            raise
        return router

    def _add_socket(self, backlog: int) -> None:
        bind = self.bind
        if self.sockets and bind.port == 0:
            bind = bind.with_port(self.port)
        # Joins the kernel's group last: its position is len(self.sockets), its slot.
        sock = _listener(bind, self.udp, backlog, self.defer_accept)
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
        return self.retiring

    def release_slot(self, slot: int) -> None:
        """Close a retired slot's socket (the highest one)."""
        if slot != self.slots - 1 or slot != self.retiring:
            raise ValueError("only the retired highest slot can be released")
        self._routing.leave(slot)
        sock = self.sockets.pop()
        _leave_group(sock, self.udp)
        sock.close()
        self.retiring = None

    def pending(self, slot: int) -> int:
        """Connections waiting in the slot's accept queue (TCP); 0 for UDP."""
        if self.udp:
            return 0
        info = self.sockets[slot].getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return int(_U32.unpack_from(info, _TCPI_UNACKED)[0])

    def counters(self) -> Counters:
        return self._routing.counters(self.slots)

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


class _TooManySlots(ConfigError):
    """More slots than the loader fits: auto tries the next loader, an explicit choice is bad input."""
