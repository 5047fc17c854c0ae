"""The move: a connection's fd, the bytes already read from it and its client, to another slot.

One unix datagram socketpair per slot, created and kept by the master like the listening sockets:
a handoff queued for a slot waits in the kernel while that slot's worker is replaced. A datagram
holds one connection (SCM_RIGHTS) and a small frame:

    u8 version | u8 family (0: the socket's own peer, 4, 6) | u16 port | 16-byte address | bytes read

The family/address/port is the client a PROXY protocol header named (0 when none was read).
Nothing here parses HTTP.
"""

from __future__ import annotations

import array
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

_FRAME = struct.Struct("!BBH16s")
_VERSION = 1
# A datagram carries the request head and what came with it; a bigger prefix is served where it
# landed (the socket's send buffer is the limit, and a head is at most a few KiB).
MAX_PREFIX = 128 * 1024
SEND_BUFFER = 4 * 1024 * 1024


@dataclass(frozen=True)
class Handoff:
    fd: int
    client: tuple[str, int] | None  # what a PROXY header said; None: the socket's own peer
    data: bytes  # bytes already read from the connection, in order


def encode(client: tuple[str, int] | None, data: bytes) -> list[bytes]:
    """The datagram as the buffers ``sendmsg`` gathers (the bytes read are not copied into it)."""
    if client is None:
        return [_FRAME.pack(_VERSION, 0, 0, bytes(16)), data]
    address = ipaddress.ip_address(client[0])
    return [_FRAME.pack(_VERSION, address.version, client[1], address.packed.rjust(16, b"\0")), data]


def decode(fd: int, message: bytes | memoryview) -> Handoff:
    version, family, port, packed = _FRAME.unpack_from(message)
    if version != _VERSION:
        raise ValueError(f"handoff frame version {version}")
    client = None
    if family == 4:
        client = (str(ipaddress.IPv4Address(packed[12:])), port)
    elif family == 6:
        client = (str(ipaddress.IPv6Address(packed)), port)
    return Handoff(fd, client, bytes(message[_FRAME.size :]))


def send(channel: socket.socket, fd: int, client: tuple[str, int] | None, data: bytes) -> None:
    """Queue the connection for the slot behind ``channel``; raises BlockingIOError when full."""
    fds = array.array("i", [fd])
    channel.sendmsg(encode(client, data), [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def receive_buffer() -> bytearray:
    """Where ``receive`` reads datagrams: allocated once per receiver (a fresh buffer of this size
    per call would be mapped and unmapped by malloc every time, an empty queue included)."""
    return bytearray(MAX_PREFIX + _FRAME.size)


_ANCILLARY = socket.CMSG_SPACE(struct.calcsize("i") * 4)


def receive(channel: socket.socket, buffer: bytearray) -> Handoff | None:
    """The next queued connection, or None when the queue is empty. The fd is the caller's."""
    while True:
        try:
            size, ancdata, _, _ = channel.recvmsg_into([buffer], _ANCILLARY)
        except BlockingIOError:
            return None
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:  # else a datagram without a connection: nothing to serve
            for extra in fds[1:]:
                os.close(extra)
            return decode(fds[0], memoryview(buffer)[:size])  # one copy: the data's


@dataclass
class Channels:
    """The master's handoff socketpairs, one per slot that ever existed (slot numbers are reused)."""

    pairs: dict[int, tuple[socket.socket, socket.socket]] = field(default_factory=dict)

    def ensure(self, slot: int) -> None:
        if slot not in self.pairs:
            receive_end, send_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            send_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            receive_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SEND_BUFFER)
            self.pairs[slot] = (receive_end, send_end)

    @classmethod
    def adopt(cls, pairs: tuple[tuple[int, int], ...]) -> Channels:
        """The channels of the image before, by fd (receive end, send end) in slot order."""
        return cls(
            {slot: (socket.socket(fileno=r), socket.socket(fileno=s)) for slot, (r, s) in enumerate(pairs)}
        )

    def carried(self) -> tuple[tuple[int, int], ...]:
        """(receive end, send end) of every slot in slot order, as ``adopt`` takes them."""
        return tuple((r.fileno(), s.fileno()) for r, s in (self.pairs[slot] for slot in sorted(self.pairs)))

    def worker_fds(self, slot: int) -> tuple[int, list[int]]:
        """(this slot's receive end, every slot's send end in slot order) for a worker of ``slot``."""
        return self.pairs[slot][0].fileno(), [self.pairs[s][1].fileno() for s in sorted(self.pairs)]

    def close(self) -> None:
        for pair in self.pairs.values():
            for sock in pair:
                sock.close()
        self.pairs.clear()
