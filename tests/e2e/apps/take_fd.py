"""What a process of the workers' uid outside the filter (another daemon of --user nobody) can do
to a worker: take its fd 3 with pidfd_getfd, or attach with ptrace. Prints "<getfd> <ptrace>",
each "0" when it worked or the errno. x86_64 and aarch64 system call numbers."""

import ctypes
import sys

PIDFD_OPEN, PIDFD_GETFD = 434, 438
PTRACE_SEIZE, PTRACE_DETACH = 0x4206, 17

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.ptrace.restype = ctypes.c_long


def errno_of(result: int) -> int:
    return ctypes.get_errno() if result < 0 else 0


pid = int(sys.argv[1])
pidfd = libc.syscall(PIDFD_OPEN, pid, 0)
taken = errno_of(libc.syscall(PIDFD_GETFD, pidfd, 3, 0)) if pidfd >= 0 else ctypes.get_errno()
traced = errno_of(libc.ptrace(PTRACE_SEIZE, pid, None, None))
if traced == 0:
    libc.ptrace(PTRACE_DETACH, pid, None, None)
print(taken, traced)
