"""sd_notify(3): one datagram to ``$NOTIFY_SOCKET``. Workers tell the master; the master tells
systemd (each sees its own ``NOTIFY_SOCKET``)."""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
