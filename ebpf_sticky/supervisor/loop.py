"""The supervisor's I/O: fork/exec, waitpid, signals, readiness, the control socket.

Every decision is the core's; this loop only turns OS happenings into core events and core actions
into system calls.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..activation import SessionFds
from ..config import Launch
from ..contract import (
    APP_LOAD_ERROR,
    LISTEN_FD,
    LISTEN_FDNAME,
    LOAD_ERROR_PREFIX,
    MASTER_ENV_PREFIX,
    MAX_REPORT,
    OPTIONS_FD,
    OPTIONS_FDNAME,
    RECYCLE,
    WORKER_BOOT,
    WORKER_ENV,
    encode_channel,
    parse_load_error,
)
from ..errors import AppLoadError, LockdownError, StickyError
from ..handover import Handover
from ..handover import Routing as CarriedRouting
from ..kernel.capabilities import prctl
from ..kernel.router import DEFER_ACCEPT_S, Carried, Router
from ..kernel.seccomp import Listener
from ..notify import sd_notify
from ..sessions.master import MasterSessions, check_carried, session_settings
from . import core, fdstore, membership
from .control_server import ControlServer
from .metrics import MetricsServer, serve
from .privileges import WorkerPlan, lock_down_worker, refuse_to_exec, secure_group, worker_reads
from .reloader import watching
from .upgrade import exec_upgrade

log = logging.getLogger("ebpf_sticky")

_PR_SET_PDEATHSIG = 1
_SIGNALS = {signal.Signals[f"SIG{name}"]: name for name in core.SignalName}
TICK = 0.05
_LEVELS = {
    core.Level.INFO: logging.INFO,
    core.Level.WARNING: logging.WARNING,
    core.Level.ERROR: logging.ERROR,
}
# A `-- COMMAND` worker that does not speak sd_notify counts as ready once alive this long.
COMMAND_READY_AFTER = 1.0


def listener_guard(settings: Launch) -> Listener:
    """Our Python worker never duplicates fd 3, so its filter refuses that too; a command may."""
    return Listener.DUPLICABLE if settings.command else Listener.SEALED


def _child_setup(fds: dict[int, int], master_pid: int, listener: Listener) -> Callable[[], None]:
    """Runs in the child between fork and exec (after any user/group change); ``fds`` maps each
    contract fd (``LISTEN_FD``, ``OPTIONS_FD``, the session layer's) to the master's fd to put there.

    Every step is checked and a failure ends the child before exec (fail closed): subprocess would
    turn an exception raised here into a SubprocessError without its message, so the child says why
    on stderr and exits with EXIT_LOCKDOWN. The master has run the same lock-down in a probe child
    before the first worker (privileges.secure_group), so this is the second line of defence.
    """

    def setup() -> None:
        try:
            # Set after the uid change, which would clear it; the getppid check closes the race
            # with a master that died before the prctl.
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "setting the parent-death signal")
            if os.getppid() != master_pid:
                os._exit(1)
            # Before the filter, which refuses dup2 onto fd 3; first copied above every target, so
            # no target clobbers a source (the master's fd for one may be another's number).
            above = max(fds) + 1
            moved = {target: fcntl.fcntl(source, fcntl.F_DUPFD, above) for target, source in fds.items()}
            for target, source in moved.items():
                os.dup2(source, target)
                os.close(source)
            # No capability, no_new_privs, and the filter that keeps the socket's
            # holder from detaching or replacing the group's program (no privilege needed for that).
            lock_down_worker(listener)
        except (OSError, LockdownError) as exc:
            refuse_to_exec(exc)

    return setup


def worker_env(slot: int, notify_name: str) -> dict[str, str]:
    """The master's environment without its own settings (the hash key, the key's password...),
    plus the contract's variables. The master's NOTIFY_SOCKET (systemd's) is for the master alone."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(MASTER_ENV_PREFIX)}
    env.pop("LISTEN_PID", None)
    env.update(
        {WORKER_ENV: str(slot)}, LISTEN_FDS="1", LISTEN_FDNAMES=LISTEN_FDNAME, NOTIFY_SOCKET=notify_name
    )
    return env


def options_memfd(data: bytes) -> int:
    """A sealed memfd holding ``data``, read from the start: the worker's options channel."""
    fd = os.memfd_create(OPTIONS_FDNAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Supervisor:
    settings: Launch
    router: Router
    notify_socket: socket.socket
    notify_name: str
    control: ControlServer
    metrics: MetricsServer | None = None  # --metrics
    sessions: MasterSessions | None = None  # --session-key / --proxy-protocol
    started: float = field(default_factory=time.monotonic)
    generation: int = 0  # in-place upgrades since launch
    carried: tuple[core.Carried, ...] | None = None  # the workers of the image before, if upgraded
    children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    signals: list[core.SignalName] = field(default_factory=list)
    watch: membership.Watch = field(default_factory=membership.Watch)
    adopted: set[int] = field(default_factory=set)  # workers started by the image before

    def worker_argv(self) -> list[str]:
        s = self.settings
        if s.command:
            # sh replaces itself with the command, so $$ is the command's own pid.
            return [
                "/bin/sh",
                "-c",
                'LISTEN_PID=$$; export LISTEN_PID; exec "$@"',
                "ebpf-sticky-worker",
                *s.command,
            ]
        assert s.target is not None
        argv = [
            sys.executable,
            "-c",
            WORKER_BOOT,
            s.target,
            "--graceful-timeout",
            str(s.graceful_timeout),
            "--log-level",
            s.log_level,
        ]
        return argv + (["--factory"] if s.factory else [])

    def spawn(self, slot: int) -> int:
        fds = {LISTEN_FD: self.router.sockets[slot].fileno()}
        if self.sessions is not None:
            fds.update(self.sessions.worker_fds(slot))
        with contextlib.ExitStack() as stack:
            if self.settings.target is not None:
                sessions = self.sessions.worker_settings() if self.sessions is not None else None
                fds[OPTIONS_FD] = options_memfd(encode_channel(self.settings.uvicorn.to_json(), sessions))
                stack.callback(os.close, fds[OPTIONS_FD])
            setup = _child_setup(fds, os.getpid(), listener_guard(self.settings))

            def preexec() -> None:
                # Ctrl-C signals the whole foreground group: only the master should act on it (it
                # stops the workers with TERM), so workers start with SIGINT ignored. Servers that
                # install their own handler (uvicorn) still may; none prints a KeyboardInterrupt.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                setup()

            proc = subprocess.Popen(
                self.worker_argv(),
                env=worker_env(slot, self.notify_name),
                # subprocess marks these inheritable before preexec, so the master must have fds
                # 3 and 4 open: the group's first fds (sockets, maps, the control socket) are.
                pass_fds=tuple(fds),
                preexec_fn=preexec,
                user=self.settings.uid,
                group=self.settings.gid,
                extra_groups=[] if self.settings.uid is not None else None,
            )
        self.children[proc.pid] = proc
        return proc.pid

    def act(self, action: core.Action, now: float) -> list[core.Event]:
        """Carry out one action; what happened comes back as events (a failure included)."""
        try:
            if isinstance(action, core.Spawn):
                return [core.Spawned(action.slot, self.spawn(action.slot), now)]
            if isinstance(action, core.Kill):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(action.pid, signal.SIGKILL if action.signal == "KILL" else signal.SIGTERM)
            elif isinstance(action, core.AddSlot):
                slot = self.router.add_slot(self.settings.uvicorn.backlog)
                fdstore.store_slot(slot, self.router.sockets[slot])
                self.routed_slots_changed()
                if self.sessions is not None:  # the new slot's channel (the rest are duplicates)
                    fdstore.store_sessions(self.sessions)
                return [core.SlotAdded(slot, now)]
            elif isinstance(action, core.RetireSlot):
                self.router.retire_slot()
                self.routed_slots_changed()
            elif isinstance(action, core.ReleaseSlot):
                fdstore.forget_slot(action.slot)
                self.router.release_slot(action.slot)
            elif isinstance(action, core.NotifyReady):
                notify_systemd("READY=1")
            elif isinstance(action, core.Log):
                log.log(_LEVELS[action.level], "%s", action.message)
            elif isinstance(action, core.Upgrade):
                # Blocked across the exec (the mask survives it) and unblocked by the new image once
                # its handlers are in place: a signal meanwhile waits instead of killing the master.
                signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
                try:
                    exec_upgrade(self.handover(action.workers))
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        # A failed fork (EAGAIN under a pids limit), a preexec failure, a kernel refusal: the core
        # decides what it means; the group keeps serving.
        except (StickyError, OSError, subprocess.SubprocessError) as exc:
            return [core.ActionFailed(action, str(exc) or type(exc).__name__, now)]
        return []

    def handover(self, workers: tuple[core.Carried, ...]) -> Handover:
        """Everything the next image of this master needs to go on as the same group."""
        carried = self.router.carried()
        return Handover(
            launch=self.settings,
            routing=CarriedRouting(
                self.router.loader,
                tuple(sock.fileno() for sock in self.router.sockets),
                carried.insn_count,
                carried.program,
                carried.maps,
                carried.live_table or 0,
            ),
            generation=self.generation + 1,
            started=self.started,
            control=self.control.listener.fileno(),
            control_path=str(self.control.path),
            notify=self.notify_socket.fileno(),
            notify_name=self.notify_name,
            metrics=self.metrics.listener.fileno() if self.metrics is not None else None,
            workers=workers,
            sessions=self.sessions.carried() if self.sessions is not None else None,
        )

    def routed_slots_changed(self) -> None:
        if self.sessions is not None:
            retiring = self.router.retiring is not None
            self.sessions.slots_changed(self.router.slots - retiring)

    def execute(self, sup_core: core.Core, actions: list[core.Action]) -> core.Exit | None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, core.Exit):
                return action
            for event in self.act(action, time.monotonic()):
                queue += sup_core.handle(event)
        return None

    def reap(self) -> list[core.Event]:
        events: list[core.Event] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            self.adopted.discard(pid)
            proc = self.children.pop(pid, None)
            if proc is not None:
                proc.returncode = code  # so subprocess never waits for it again
            events.append(core.Exited(pid, code, time.monotonic()))
        return events

    def readiness(self) -> list[core.Event]:
        """READY=1 from workers, and the reports of workers that cannot load the app."""
        events: list[core.Event] = []
        while True:
            try:
                data, ancdata, _, _ = self.notify_socket.recvmsg(MAX_REPORT, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return events
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:12])[0]
                    if data.startswith(LOAD_ERROR_PREFIX):
                        report = parse_load_error(data)
                        if report is not None:
                            events.append(core.LoadFailed(pid, *report, time.monotonic()))
                        continue
                    lines = data.split(b"\n")  # sd_notify: one datagram may carry several
                    if b"READY=1" in lines:
                        events.append(core.Ready(pid, time.monotonic()))
                    if RECYCLE.encode() in lines:
                        events.append(core.Recycle(pid, time.monotonic()))

    def run(self) -> core.Exit:
        s = self.settings
        sup_core = core.Core(
            slots=self.router.slots,
            graceful_timeout=s.graceful_timeout,
            max_slots=self.router.max_slots,
            assume_ready_after=COMMAND_READY_AFTER if s.command else None,
            load_error_status=None if s.command else APP_LOAD_ERROR,
            generation=self.generation,
        )
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

        def on_signal(number: int, _frame: object) -> None:
            self.signals.append(_SIGNALS[signal.Signals(number)])

        handlers = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
        old_chld = signal.signal(signal.SIGCHLD, lambda _n, _f: None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked by an upgrade's exec
        try:
            log.info(
                "%s: %d slots on %s (%s loader, %d BPF instructions)",
                "udp" if s.udp else "tcp",
                self.router.slots,
                self.router.bind.with_port(self.router.port),
                self.router.loader,
                self.router.insn_count,
            )
            first: core.Event = (
                core.Start(time.monotonic())
                if self.carried is None
                else core.Resumed(self.carried, time.monotonic())
            )
            self.adopted = {worker.pid for worker in self.carried or ()}
            # The watch's first look, before any worker of this image starts: a group carried
            # across an upgrade, whose workers ran meanwhile, is checked before it serves more.
            self.watch.look(self.router)
            done = self.execute(sup_core, sup_core.handle(first))
            while done is None:
                servers: list[ControlServer | MetricsServer] = [
                    self.control,
                    *([self.metrics] if self.metrics else []),
                ]
                readable, writable, _ = select.select(
                    [wake_r, self.notify_socket, *(r for s in servers for r in s.readers())],
                    [w for s in servers for w in s.writers()],
                    [],
                    TICK,
                )
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                # Signals first: a worker that died of the terminal's Ctrl-C is then seen as stopping,
                # not as a crash to replace. Exits last: a worker's report precedes its exit.
                events: list[core.Event] = [
                    core.Signal(name, time.monotonic()) for name in self.signals[: len(self.signals)]
                ]
                del self.signals[: len(events)]
                exits = self.reap()
                events += self.readiness() + exits
                self.control.serve(readable, writable, sup_core.snapshot(), self.started, time.monotonic())
                draining = sup_core.draining_slot()
                pending = {draining: self.router.pending(draining)} if draining is not None else {}
                events.append(core.Tick(time.monotonic(), pending))
                for event in events:
                    done = self.execute(sup_core, sup_core.handle(event))
                    if done is not None:
                        break
                self.watch.look(self.router)
                if self.metrics is not None:
                    self.metrics.publish(sup_core)
                    self.metrics.serve(readable, writable, time.monotonic())
            return done
        finally:
            for pid in [*self.children, *self.adopted]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in [*self.children, *self.adopted]:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            for proc in self.children.values():
                proc.returncode = -9
            self.children.clear()
            self.adopted.clear()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.signal(signal.SIGCHLD, old_chld)
            wake_r.close()
            wake_w.close()


def notify_systemd(message: str) -> None:
    with contextlib.suppress(OSError):
        sd_notify(message)


def open_notify_socket() -> tuple[socket.socket, str]:
    """An abstract datagram socket workers send READY=1 to; the kernel stamps each message
    with the sender's pid (SO_PASSCRED), so only our children's messages count."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    name = f"ebpf-sticky-{os.getpid()}-{os.urandom(4).hex()}"
    sock.bind("\0" + name)
    sock.setblocking(False)
    return sock, "@" + name


def configure_logging(log_level: str) -> None:
    logging.basicConfig(
        level={"trace": "DEBUG"}.get(log_level, log_level.upper()),
        format="[ebpf-sticky] %(message)s",
        stream=sys.stderr,
    )


def defer_accept(settings: Launch) -> int:
    """TCP_DEFER_ACCEPT seconds for the slot sockets: HTTP and TLS clients speak first; a
    `-- COMMAND` may serve a protocol where the server speaks first, which deferring would stall
    until the client's own timeout."""
    return DEFER_ACCEPT_S if settings.target is not None else 0


def launch(settings: Launch) -> int:
    """Build the group (on the sockets systemd handed in, if any), run workers until told to stop;
    returns the exit status."""
    handed = fdstore.handed_in()
    settings = fdstore.adopt(settings, handed)
    with fdstore.open_router(settings, handed, defer_accept(settings)) as router:
        fdstore.store_group(settings.spec.key, router)
        return _run_group(
            settings, router, open_notify_socket(), ControlServer.open(router), stored=handed.sessions
        )


def resume(handover: Handover, state_fd: int) -> int:
    """Go on as the master this process was before it exec'd: adopt its group, its sockets and
    its workers (see upgrade.py), then renew the workers slot by slot."""
    s, r = handover.launch, handover.routing
    router = Router.adopt(
        s.bind,
        s.spec,
        [socket.socket(fileno=fd) for fd in r.sockets],
        udp=s.udp,
        loader=r.loader,
        carried=Carried(r.insn_count, r.program, r.maps, r.live_table),
        defer_accept=defer_accept(s),
    )
    os.close(state_fd)
    with router:
        return _run_group(
            s,
            router,
            (socket.socket(fileno=handover.notify), handover.notify_name),
            ControlServer.adopt(socket.socket(fileno=handover.control), Path(handover.control_path), router),
            metrics=socket.socket(fileno=handover.metrics) if handover.metrics is not None else None,
            before=handover,
        )


def open_sessions(
    settings: Launch, router: Router, carried: SessionFds | None, *, upgraded: bool
) -> MasterSessions:
    """The session table and handoff channels: the image before's if it carried them (checked
    before its exec, so a mismatch now ends the master), or systemd's store's if they fit; else
    new ones."""
    wanted = session_settings(settings, router.loader)
    if carried is not None and upgraded:
        check_carried(wanted, carried, router.slots)
        sessions = MasterSessions.adopt(wanted, carried)
        sessions.slots_changed(router.slots)  # channels made ahead, if the image before made none
        return sessions
    stored = fdstore.adopt_sessions(wanted, carried, router.slots) if carried is not None else None
    return stored or MasterSessions.open(wanted, router.slots)


def check_handover(handover: Handover) -> None:
    """What the pre-exec check proves beyond decoding: the carried session table fits this
    version (HandoverError otherwise)."""
    carried, launch = handover.sessions, handover.launch
    if carried is not None:
        wanted = session_settings(launch, handover.routing.loader)
        check_carried(wanted, carried, len(handover.routing.sockets))


def _run_group(
    settings: Launch,
    router: Router,
    notify: tuple[socket.socket, str],
    control_server: contextlib.AbstractContextManager[ControlServer],
    *,
    metrics: socket.socket | None = None,
    before: Handover | None = None,
    stored: SessionFds | None = None,
) -> int:
    """Secure the group, start the master's threads, and supervise until the end."""
    with control_server as control, contextlib.ExitStack() as stack:
        notify_sock, notify_name = notify
        stack.callback(notify_sock.close)
        if settings.pid_file:
            with open(settings.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
            stack.callback(os.unlink, settings.pid_file)
        # The group is built: from here on the master needs (almost) no privilege.
        plan = WorkerPlan(
            settings.uid,
            settings.gid,
            settings.default_user,
            listener_guard(settings),
            worker_reads(settings.target, settings.uvicorn, settings.command),
        )
        secure_group(plan, router.port, settings.pid_file)
        # Threads only from here on: capset drops the calling thread's capabilities alone.
        stack.enter_context(watching(settings.uvicorn.reload))
        metrics_server = (
            stack.enter_context(serve(settings.metrics, router, metrics)) if settings.metrics else None
        )
        sessions = None
        if settings.session_keys or settings.proxy_protocol:
            if before is not None:
                sessions = open_sessions(settings, router, before.sessions, upgraded=True)
            else:
                sessions = open_sessions(settings, router, stored, upgraded=False)
            stack.callback(sessions.close)
            fdstore.store_sessions(sessions)
            control.sessions = sessions
            if metrics_server is not None:
                metrics_server.exporter.sessions = sessions
        supervisor = Supervisor(
            settings, router, notify_sock, notify_name, control, metrics_server, sessions=sessions
        )
        if before is not None:  # go on where the image before left off
            supervisor.started, supervisor.generation = before.started, before.generation
            supervisor.carried = before.workers
        done = supervisor.run()
    if done.code == APP_LOAD_ERROR:
        raise AppLoadError(done.message)
    return done.code
