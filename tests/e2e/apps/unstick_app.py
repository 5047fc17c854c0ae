"""An app that tries to take its worker's listener out of the reuseport group, as hostile or buggy
app code could. ``GET /`` answers "<slot> <pid> <uid>" like asgi_app.py; ``GET /attack?how=H``
attacks fd 3 and answers with the errno of each step ("0" when it worked):

* ``shutdown``: shutdown(3, SHUT_RD) then listen(3, 128);
* ``connect``: connect(3, AF_UNSPEC) then listen(3, 128);
* ``dup``: dup(3), then shutdown and listen on the duplicate;
* ``passed``: fd 3 sent to itself over a Unix socket (SCM_RIGHTS), which no seccomp filter sees,
  then shutdown and listen on the received duplicate;
* ``left``: as ``passed``, but only the shutdown: the slot stays out of the group;
* ``hijack``: as ``left``, then the duplicate connects to a listener of the app's own, so that the
  socket can never listen again.

``GET /reach`` tries what a worker at the master's uid could: join the group with a listener of
its own on the same address and port, and signal the master (signal 0). It answers both errnos.
With ``?how=keep`` the listener stays, in the group, for the rest of the worker's life.
"""

import ctypes
import errno
import os
import socket

LISTEN_FD = 3
KEPT: list[socket.socket] = []  # sockets an attack keeps for the rest of the worker's life
libc = ctypes.CDLL(None, use_errno=True)


def call(result: int) -> int:
    return ctypes.get_errno() if result < 0 else 0


def unhash_and_rejoin(fd: int, how: str) -> list[int]:
    if how == "connect":
        unspec = ctypes.create_string_buffer(16)  # sa_family 0: AF_UNSPEC
        first = call(libc.connect(fd, unspec, 16))
    else:
        first = call(libc.shutdown(fd, socket.SHUT_RD))
    return [first, call(libc.listen(fd, 128))]


def duplicate(how: str) -> tuple[int, int]:
    if how == "dup":
        fd = libc.dup(LISTEN_FD)
        return fd, call(fd)
    left, right = socket.socketpair()
    with left, right:
        socket.send_fds(left, [b"x"], [LISTEN_FD])
        _, fds, _, _ = socket.recv_fds(right, 1, 1)
    return fds[0], 0


def attack(how: str) -> list[int]:
    if how in ("shutdown", "connect"):
        return unhash_and_rejoin(LISTEN_FD, how)
    fd, err = duplicate(how)
    if err:
        return [err]
    try:
        if how == "left":
            return [0, call(libc.shutdown(fd, socket.SHUT_RD))]
        if how == "hijack":
            elsewhere = socket.socket()
            elsewhere.bind(("127.0.0.1", 0))
            elsewhere.listen()
            KEPT.append(elsewhere)
            shut = call(libc.shutdown(fd, socket.SHUT_RD))
            hijacked = socket.socket(fileno=os.dup(fd))
            KEPT.append(hijacked)
            # The listener is non-blocking: the connection is under way (EINPROGRESS) when this returns.
            err = hijacked.connect_ex(elsewhere.getsockname())
            return [0, shut, 0 if err == errno.EINPROGRESS else err]
        return [0, *unhash_and_rejoin(fd, "shutdown")]
    finally:
        os.close(fd)


def reach(keep: bool) -> list[int]:
    listener = socket.socket(fileno=LISTEN_FD)  # only to learn the address; detached, never closed
    address = listener.getsockname()
    listener.detach()
    intruder = socket.socket()
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        intruder.bind(address)
        intruder.listen()  # a TCP listener joins the group here
        joined = 0
    except OSError as exc:
        joined = exc.errno or -1
    if keep and not joined:
        KEPT.append(intruder)
    else:
        intruder.close()
    try:
        os.kill(os.getppid(), 0)
        signalled = 0
    except OSError as exc:
        signalled = exc.errno or -1
    return [joined, signalled]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    if scope["path"] == "/attack":
        how = scope["query_string"].decode().partition("=")[2]
        body = " ".join(map(str, attack(how))).encode() + b"\n"
    elif scope["path"] == "/reach":
        body = " ".join(map(str, reach(scope["query_string"] == b"how=keep"))).encode() + b"\n"
    else:
        body = f"{os.environ['EBPF_STICKY_WORKER']} {os.getpid()} {os.getuid()}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
