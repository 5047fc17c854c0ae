"""A `-- COMMAND` worker that attacks its listener once at start (slot 0 only), then answers every
connection on fd 3 with "<slot> <errno of shutdown> <errno of listen>" ("0": it worked).

    unstick_cmd.py direct   # shutdown(3) and listen(3): refused for commands too
    unstick_cmd.py dup      # on dup(3), which commands may do (gunicorn's fd://3 does)
"""

import ctypes
import os
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)


def call(result: int) -> int:
    return ctypes.get_errno() if result < 0 else 0


slot = os.environ["EBPF_STICKY_WORKER"]
report = "- -"
if slot == "0":
    fd = 3 if sys.argv[1] == "direct" else libc.dup(3)
    report = f"{call(libc.shutdown(fd, socket.SHUT_RD))} {call(libc.listen(fd, 128))}"
listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    conn.sendall(f"{slot} {report}\n".encode())
    conn.close()
