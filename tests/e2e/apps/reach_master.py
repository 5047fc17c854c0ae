"""A worker that tries to reach past its socket, as an attacker holding one worker would: take
the parent's (the master's) fds with pidfd_getfd, which would hand it the group's BPF maps, and
call bpf(2). Reports "<fds taken> <bpf errno>"; with "serve", answers each connection on fd 3 with
that, otherwise prints it. x86_64 and aarch64 system call numbers."""

import ctypes
import os
import platform
import socket
import sys

PIDFD_OPEN, PIDFD_GETFD = 434, 438
BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_MAP_LOOKUP_ELEM = 1

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
pidfd = libc.syscall(PIDFD_OPEN, os.getppid(), 0)
taken = sum(1 for fd in range(256) if libc.syscall(PIDFD_GETFD, pidfd, fd, 0) >= 0)
attr = ctypes.create_string_buffer(32)  # map_fd 0 is no map: EBADF/EINVAL unless filtered
libc.syscall(BPF, BPF_MAP_LOOKUP_ELEM, attr, 32)
report = f"{taken} {ctypes.get_errno()}"
if sys.argv[1:] != ["serve"]:
    print(report)
    raise SystemExit
listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    conn.sendall(report.encode())
    conn.close()
