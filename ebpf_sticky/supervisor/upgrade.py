"""Replace the master in place (SIGUSR2, `ebpf-sticky upgrade`): exec what is installed now in the
same process, and hand it the group.

Same pid: systemd's MAINPID and a container's PID 1 stay, and the workers stay its children (it
reaps them, and their parent-death signal never fires: exec is not death). What crosses the exec:

* by inheritance: the slot sockets (their queues never close), the eBPF program and maps, the
  control socket, the metrics listener and the workers' notify socket;
* by inheritance too, with ``--session-key``/``--proxy-protocol``: the session table (a memfd of
  learnt ids) and every slot's handoff channel (moves queued in it wait for the new workers);
* in a memfd, as JSON (``handover.py``): the launch settings with the hash key, the routing's state
  (loader, bucket table in use), the workers (pid, slot, readiness), the generation and the
  numbers of the fds above.

The new image may not start at all (a broken install, settings it refuses). Exec is one way, so
that is found out before it: a child runs the installed code on the very handover the new image
would read (``resume.py --check``: imports the master, decodes and validates the settings, and
checks the carried session table against them on the carried fds themselves). If
it fails, nothing was given up: the master logs why in one line and serves on. A file changed
between that check and the exec (milliseconds) is not covered: a new image that then fails to
start ends the master, and with it the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from typing import NoReturn

from ..errors import UpgradeError
from ..handover import Handover
from .resume import REFUSED

log = logging.getLogger("ebpf_sticky")

RESUME_MODULE = "ebpf_sticky.supervisor.resume"
# How long the installed code may take to import and read the handover before the check gives up.
CHECK_TIMEOUT = 60.0


def resume_argv(state_fd: int, *, check: bool = False) -> list[str]:
    """The fd number only (the state itself never goes in argv: world-readable in /proc), then the
    command line the master was launched with, so that ps and `pgrep -f` still know it."""
    mode = ["--check"] if check else []
    return [sys.executable, "-m", RESUME_MODULE, *mode, str(state_fd), "--", *launched_as()]


def launched_as() -> list[str]:
    argv = sys.orig_argv
    if RESUME_MODULE not in argv:
        return argv
    return argv[argv.index("--", argv.index(RESUME_MODULE)) + 1 :]  # upgraded before


def write_state(handover: Handover) -> int:
    """A memfd holding the handover: no file on disk to leak the key, and gone with its last fd."""
    fd = os.memfd_create("ebpf-sticky-handover", 0)  # no MFD_CLOEXEC: the new image reads it
    try:
        os.write(fd, handover.to_json().encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int) -> Handover:
    size = os.fstat(fd).st_size
    # pread: the check and the exec read the same fd, so neither may move its offset for the other.
    return Handover.from_json(os.pread(fd, size, 0).decode())


def check_installed(state_fd: int, carried: list[int]) -> None:
    """Run the installed code on the handover, and the fds it names, in a child; raise
    UpgradeError saying why it would not start."""
    try:
        result = subprocess.run(
            resume_argv(state_fd, check=True),
            pass_fds=(state_fd, *carried),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CHECK_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise UpgradeError(f"the installed ebpf-sticky did not start within {CHECK_TIMEOUT:g} s") from None
    except OSError as exc:
        raise UpgradeError(f"cannot run {sys.executable} ({exc.strerror or exc})") from exc
    if result.returncode != 0:
        lines = [line for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {result.returncode}"
        if result.returncode == REFUSED:  # the line names the cause and the fix
            raise UpgradeError(f"the installed ebpf-sticky cannot take this group over: {why}")
        raise UpgradeError(
            f"the installed ebpf-sticky cannot start ({why}): fix the install, then upgrade again"
        )


def exec_upgrade(handover: Handover) -> NoReturn:
    """Check the installed code, then exec it in place of this process. Returns only by raising
    UpgradeError, with this process unchanged."""
    state_fd = write_state(handover)
    try:
        carried = handover.fds()
        check_installed(state_fd, carried)
        for fd in carried:
            os.set_inheritable(fd, True)
        try:
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, resume_argv(state_fd))
        except OSError as exc:
            raise UpgradeError(f"exec {sys.executable} failed ({exc.strerror or exc})") from exc
        finally:  # reached only when exec failed
            for fd in carried:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)
    finally:
        os.close(state_fd)
