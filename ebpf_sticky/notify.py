"""sd_notify(3): one datagram to ``$NOTIFY_SOCKET``. Workers tell the master; the master tells
systemd (each sees its own ``NOTIFY_SOCKET``)."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def sd_notify(message: str) -> None:
    sd_notify_with_fds(message, ())


def sd_notify_with_fds(message: str, fds: Sequence[int]) -> bool:
    """As sd_pid_notify_with_fds: the fds ride along as SCM_RIGHTS. False if there is no
    NOTIFY_SOCKET (not run by a service manager)."""
    address = _address()
    if address is None:
        return False
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendmsg([message.encode()], ancillary)
    return True
