"""Least privilege for a running group: what every worker gives up before exec, what the master keeps.

Workers: no capability at all in any set that can reach the exec'd program (effective,
permitted, inheritable, ambient; they are handed their socket and need none), no_new_privs so no
exec gains one back (a root exec would regain the bounding set; a binary with file capabilities
its own), and the seccomp filter. Each step is checked: a worker that cannot be locked down is
never exec'd.

The master, once the group is built, keeps only what running it still takes (``master_needs``):
map updates through the fds it holds need no capability, so not CAP_BPF nor CAP_NET_ADMIN.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..contract import EXIT_LOCKDOWN
from ..errors import ConfigError, LockdownError
from ..kernel import capabilities as caps
from ..kernel import seccomp
from ..options import WorkerOptions
from ..targets import module_dir, parse_target

log = logging.getLogger("ebpf_sticky")

_UNUSABLE = "unusable:"
_FIXES = {
    "seccomp": "this platform refuses seccomp filters to the launched process: allow seccomp(2) and "
    "prctl(PR_SET_SECCOMP) in its own seccomp profile (a filter that denies them is unusual)",
    "no_new_privs": "the kernel refused prctl(PR_SET_NO_NEW_PRIVS): check the platform's seccomp profile",
}


def master_needs(
    *,
    worker_uid: int | None,
    worker_gid: int | None,
    port: int,
    unprivileged_port_start: int,
    pid_dir_writable: bool = True,
) -> int:
    """The capabilities the master uses after the group is built; pure.

    Spawning workers as --user/--group takes CAP_SETUID and CAP_SETGID (setgroups, setregid,
    setreuid in each new worker), signalling workers of another uid CAP_KILL, a new slot's socket
    on a port below ip_unprivileged_port_start CAP_NET_BIND_SERVICE, and removing the pid file at
    exit from a directory its uid cannot write CAP_DAC_OVERRIDE. Everything else it does (adding
    or retiring a slot, reading counters) goes through sockets and map fds it holds.
    """
    needs = 0
    if worker_uid is not None or worker_gid is not None:
        needs |= caps.mask(caps.CAP_SETUID, caps.CAP_SETGID)
    if worker_uid is not None:
        needs |= caps.mask(caps.CAP_KILL)
    if 0 < port < unprivileged_port_start:
        needs |= caps.mask(caps.CAP_NET_BIND_SERVICE)
    if not pid_dir_writable:
        needs |= caps.mask(caps.CAP_DAC_OVERRIDE)
    return needs


def _writable_without_privilege(directory: Path) -> bool:
    """Whether this process's uid and groups alone let it remove an entry it owns there."""
    st = directory.stat()
    if st.st_uid == os.geteuid():
        bits = st.st_mode >> 6
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o3 == 0o3  # write and search


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def lock_down_worker(listener: seccomp.Listener) -> None:
    """In a new worker, between fork and exec: drop, filter (guarding fd 3 as ``listener`` says),
    then verify from /proc/self/status. Raises LockdownError naming the step that failed."""
    step = "capabilities"
    try:
        caps.drop(caps.ALL)
        step = "no_new_privs"
        caps.set_no_new_privs()
        step = "seccomp"
        seccomp.forbid_program_changes(listener)
        status = caps.read_status()
    except OSError as exc:
        fix = _FIXES.get(step, "report this at the project's issue tracker")
        raise LockdownError(
            f"cannot lock down the workers ({exc.strerror or exc}): refusing to start them with "
            f"privileges they must not have; {fix}",
            exc.errno or 0,
        ) from exc
    held = caps.parse_status(status).holding(caps.ALL)
    if held or caps.status_field(status, "NoNewPrivs") != "1" or caps.status_field(status, "Seccomp") != "2":
        raise LockdownError(
            f"cannot lock down the workers: after dropping, a worker still holds {caps.names(held)} "
            f"(NoNewPrivs {caps.status_field(status, 'NoNewPrivs')}, Seccomp "
            f"{caps.status_field(status, 'Seccomp')}): refusing to start them; report this"
        )


def refuse_to_exec(reason: BaseException) -> None:
    """End a child that must not exec; subprocess would hide an exception's message, so the reason
    goes to stderr (the master's log) and the status is distinct."""
    os.write(2, f"[ebpf-sticky] worker not started: {reason}\n".encode())
    os._exit(EXIT_LOCKDOWN)


@dataclass(frozen=True)
class WorkerPlan:
    """Who the workers are and what they must be able to read, for the probe."""

    uid: int | None
    gid: int | None
    default_user: bool  # uid is a root master's default, not --user
    listener: seccomp.Listener
    reads: tuple[_Need, ...]  # what a worker opens or runs, with the access it needs


_READ, _RUN, _LIST = os.R_OK, os.X_OK, os.R_OK | os.X_OK
_Need = tuple[Path, int]  # a path and the access (os.R_OK, os.X_OK) a worker needs
_VERBS = {_READ: "read", _RUN: "run", _LIST: "list"}


def worker_reads(target: str | None, options: WorkerOptions, command: Sequence[str]) -> tuple[_Need, ...]:
    """What a worker needs before it serves, with the access (os.R_OK/X_OK) it needs. Our Python
    worker: the interpreter, this package, the directory it imports the app from, a path target,
    and the files its options name (TLS, --env-file). A -- COMMAND: its program, where PATH finds
    it (the rest of its needs are its own)."""
    if target is None:
        program = shutil.which(command[0]) if command else None
        return ((Path(program), _RUN),) if program else ()
    reads = [
        (Path(sys.executable), _RUN),
        (Path(__file__).parents[1], _LIST),
        (Path(module_dir(options.app_dir)).absolute(), _LIST),
    ]
    parsed = parse_target(target)
    if parsed.is_path:
        reads.append((Path(parsed.location).absolute(), _READ))
    reads += [(Path(path).absolute(), _READ) for _, path in options.files()]
    return tuple(reads)


def _unusable(reads: tuple[_Need, ...]) -> str | None:
    """ "<verb> <path>" for the first of ``reads`` this process cannot use as it needs, or None."""
    for path, mode in reads:
        if not os.access(path, mode):
            return f"{_VERBS[mode]} {path}"
    return None


def _who(plan: WorkerPlan) -> str:
    uid = os.geteuid() if plan.uid is None else plan.uid
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "uid"
    why = ", the default for a root master" if plan.default_user else ""
    return f"{name} (uid {uid}{why})"


def _probe_workers(plan: WorkerPlan, started_with: int) -> None:
    """Lock down a throwaway child exactly as a worker (same user change, same steps), check it can
    read what a worker reads, and report the outcome through a pipe: a failure becomes one error
    line here, before any worker starts."""
    uid, gid = plan.uid, plan.gid
    read_end, write_end = os.pipe()

    def probe() -> None:
        try:
            lock_down_worker(plan.listener)
            unusable = _unusable(plan.reads)
            os.write(write_end, b"ok" if unusable is None else f"{_UNUSABLE}{unusable}".encode())
        except BaseException as exc:  # anything: the master reports it
            os.write(write_end, str(exc).encode())
        os._exit(0)

    try:
        try:
            proc = subprocess.Popen(
                [sys.executable],  # never exec'd: the probe exits first
                preexec_fn=probe,
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            if exc.errno == errno.EPERM and (uid is not None or gid is not None):
                instead = "pass --user root" if plan.default_user else "drop --user/--group"
                raise LockdownError(
                    f"cannot start workers as {_who(plan)}: {exc.strerror}; the master needs "
                    f"CAP_SETUID and CAP_SETGID for that, and was started with "
                    f"{caps.names(started_with)}: grant them, or {instead}",
                    exc.errno,
                ) from exc
            raise LockdownError(f"cannot start a worker ({exc.strerror})", exc.errno or 0) from exc
        os.close(write_end)
        write_end = -1
        proc.wait()
        verdict = os.read(read_end, 4096).decode(errors="replace")
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if verdict.startswith(_UNUSABLE):
        raise ConfigError(
            f"workers run as {_who(plan)} and cannot {verdict[len(_UNUSABLE) :]}: make it and its "
            "directories readable by that user, or choose another --user (--user root runs the app as root)"
        )
    if verdict != "ok":
        raise LockdownError(verdict or f"the workers' lock-down probe died ({proc.returncode})")


def secure_group(plan: WorkerPlan, port: int, pid_file: str | None) -> None:
    """Once the group is built: drop what the master no longer needs, make sure workers can be
    locked down, and log what each holds. Raises LockdownError (nothing started yet)."""
    uid = plan.uid
    needs = master_needs(
        worker_uid=uid if uid != os.geteuid() else None,
        worker_gid=plan.gid,
        port=port,
        unprivileged_port_start=_unprivileged_port_start(),
        pid_dir_writable=pid_file is None or _writable_without_privilege(Path(pid_file).absolute().parent),
    )
    started_with = caps.capget()[1]
    try:
        # Also from the bounding set where CAP_SETPCAP allows: it is inherited by every worker.
        caps.drop(caps.ALL & ~needs)
        # Workers of the master's uid, without capabilities, would otherwise pass the ptrace check
        # (same uid, no capability the master lacks) and could take its map fds with pidfd_getfd.
        caps.set_not_dumpable()
    except OSError as exc:
        raise LockdownError(f"cannot drop the master's capabilities ({exc.strerror}): report this") from exc
    # Capabilities belong to threads: one started before the drop would keep them.
    kept = [
        caps.parse_status(task.read_text()).permitted for task in Path("/proc/self/task").glob("*/status")
    ]
    if any(permitted & ~needs for permitted in kept):
        raise LockdownError(
            f"{len(kept)} threads run in the master and only this one dropped its capabilities: start "
            "threads after the privilege drop (supervisor.privileges.secure_group)"
        )
    _probe_workers(plan, started_with)
    log.info("privileges: the master keeps %s; workers hold no capability", caps.names(caps.capget()[1]))
