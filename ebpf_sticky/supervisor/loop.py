"""The supervisor's I/O: fork/exec, waitpid, signals, readiness, the control socket.

Every decision is the core's; this loop only turns OS happenings into core events and core actions
into system calls.
"""

from __future__ import annotations

import array
import contextlib
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

from ..config import Launch
from ..contract import (
    APP_LOAD_ERROR,
    LISTEN_FD,
    LISTEN_FDNAME,
    LOAD_ERROR_PREFIX,
    MAX_REPORT,
    OPTIONS_ENV,
    RECYCLE,
    WORKER_ENV,
    parse_load_error,
)
from ..errors import AppLoadError, LockdownError, StickyError
from ..kernel.capabilities import prctl
from ..kernel.router import DEFER_ACCEPT_S, Router
from ..notify import sd_notify
from . import core
from .control_server import ControlServer
from .metrics import Exporter, serve
from .privileges import lock_down_worker, refuse_to_exec, secure_group
from .reloader import watching

log = logging.getLogger("ebpf_sticky")

_PR_SET_PDEATHSIG = 1
_SIGNALS = {
    signal.SIGTERM: "TERM",
    signal.SIGINT: "INT",
    signal.SIGQUIT: "QUIT",
    signal.SIGHUP: "HUP",
    signal.SIGTTIN: "TTIN",
    signal.SIGTTOU: "TTOU",
}
TICK = 0.05
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# A `-- COMMAND` worker that does not speak sd_notify counts as ready once alive this long.
COMMAND_READY_AFTER = 1.0


def _child_setup(sock_fd: int, master_pid: int) -> Callable[[], None]:
    """Runs in the child between fork and exec (after any user/group change).

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
            # No capability, no_new_privs, and the filter that keeps the socket's
            # holder from detaching or replacing the group's program (no privilege needed for that).
            lock_down_worker()
            os.dup2(sock_fd, LISTEN_FD)
        except (OSError, LockdownError) as exc:
            refuse_to_exec(exc)

    return setup


@dataclass
class Supervisor:
    settings: Launch
    router: Router
    notify_socket: socket.socket
    notify_name: str
    control: ControlServer
    exporter: Exporter | None = None  # --metrics
    started: float = field(default_factory=time.monotonic)
    children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    signals: list[str] = field(default_factory=list)

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
            "-m",
            "ebpf_sticky.supervisor.worker",
            s.target,
            "--graceful-timeout",
            str(s.graceful_timeout),
            "--log-level",
            s.log_level,
        ]
        return argv + (["--factory"] if s.factory else [])

    def spawn(self, slot: int) -> int:
        env = dict(os.environ)
        # The master's own NOTIFY_SOCKET (systemd's) is for the master alone; workers get ours.
        env.update(
            **{WORKER_ENV: str(slot)},
            LISTEN_FDS="1",
            LISTEN_FDNAMES=LISTEN_FDNAME,
            NOTIFY_SOCKET=self.notify_name,
        )
        env.pop("LISTEN_PID", None)
        if self.settings.target is not None:
            env[OPTIONS_ENV] = self.settings.uvicorn.to_json()
        setup = _child_setup(self.router.sockets[slot].fileno(), os.getpid())

        def preexec() -> None:
            # Ctrl-C signals the whole foreground group: only the master should act on it (it
            # stops the workers with TERM), so workers start with SIGINT ignored. Servers that
            # install their own handler (uvicorn) still may; none prints a KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            setup()

        proc = subprocess.Popen(
            self.worker_argv(),
            env=env,
            pass_fds=(LISTEN_FD,),
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
                return [core.SlotAdded(self.router.add_slot(self.settings.uvicorn.backlog), now)]
            elif isinstance(action, core.RetireSlot):
                self.router.retire_slot()
            elif isinstance(action, core.ReleaseSlot):
                self.router.release_slot(action.slot)
            elif isinstance(action, core.NotifyReady):
                notify_systemd("READY=1")
            elif isinstance(action, core.Log):
                log.log(_LEVELS[action.level], "%s", action.message)
        # A failed fork (EAGAIN under a pids limit), a preexec failure, a kernel refusal: the core
        # decides what it means; the group keeps serving.
        except (StickyError, OSError, subprocess.SubprocessError) as exc:
            return [core.ActionFailed(action, str(exc) or type(exc).__name__, now)]
        return []

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
        )
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

        def on_signal(number: int, _frame: object) -> None:
            self.signals.append(_SIGNALS[signal.Signals(number)])

        handlers = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
        old_chld = signal.signal(signal.SIGCHLD, lambda _n, _f: None)
        try:
            log.info(
                "%s: %d slots on %s (%s loader, %d BPF instructions)",
                "udp" if s.udp else "tcp",
                self.router.slots,
                self.router.bind.with_port(self.router.port),
                self.router.loader,
                self.router.insn_count,
            )
            done = self.execute(sup_core, sup_core.handle(core.Start(time.monotonic())))
            while done is None:
                readable, writable, _ = select.select(
                    [wake_r, self.notify_socket, *self.control.readers()], self.control.writers(), [], TICK
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
                self.control.serve(readable, writable, sup_core, self.started, time.monotonic())
                draining = sup_core.draining_slot()
                pending = {draining: self.router.pending(draining)} if draining is not None else {}
                events.append(core.Tick(time.monotonic(), pending))
                for event in events:
                    done = self.execute(sup_core, sup_core.handle(event))
                    if done is not None:
                        break
                if self.exporter is not None:
                    self.exporter.publish(sup_core)
            return done
        finally:
            for proc in self.children.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            for pid in list(self.children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self.children.pop(pid).returncode = -9
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


def launch(settings: Launch) -> int:
    """Build the group, run workers until told to stop; returns the exit status."""
    router = Router.open(
        settings.bind,
        settings.spec,
        settings.workers,
        udp=settings.udp,
        loader=settings.loader,
        backlog=settings.uvicorn.backlog,
        # HTTP and TLS clients speak first; a `-- COMMAND` may serve a protocol where the server
        # speaks first, which deferring would stall until the client's own timeout.
        defer_accept=DEFER_ACCEPT_S if settings.target is not None else 0,
    )
    with router, ControlServer.open(router) as control, contextlib.ExitStack() as stack:
        notify_sock, notify_name = open_notify_socket()
        stack.callback(notify_sock.close)
        if settings.pid_file:
            with open(settings.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
            stack.callback(os.unlink, settings.pid_file)
        # The group is built: from here on the master needs (almost) no privilege.
        secure_group(settings.uid, settings.gid, router.port, settings.pid_file)
        # Threads only from here on: capset drops the calling thread's capabilities alone.
        stack.enter_context(watching(settings.uvicorn.reload))
        exporter = stack.enter_context(serve(settings.metrics, router)) if settings.metrics else None
        supervisor = Supervisor(settings, router, notify_sock, notify_name, control, exporter)
        done = supervisor.run()
    if done.code == APP_LOAD_ERROR:
        raise AppLoadError(done.message)
    return done.code
