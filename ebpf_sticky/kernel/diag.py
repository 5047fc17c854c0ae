"""The kernel's own list of TCP listeners on a port, through sock_diag (NETLINK_SOCK_DIAG).

A listener joins its reuseport group when it is hashed (listen()), and the kernel puts it into the
listening hash bucket of its address and port at the same moment: at the head for IPv4, at the
tail for IPv6 (``__inet_hash``). A dump of the listeners on one port walks that bucket in order,
so the order of the group's sockets in the dump is their join order (reversed for IPv4). A socket
that left the group and joined again (a worker's ``shutdown`` then ``listen`` on a duplicate of
its fd) moves to the head or the tail: the dump shows it even when the move happened between two
looks, which is what the classic-BPF router, whose program returns positions in the group, needs.
No privilege is needed: sock_diag dumps every socket of the network namespace to anyone.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid: sport, dport (big
# endian), src[16], dst[16], if, cookie[2].
_REQUEST = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB48sIIIII")


@dataclass(frozen=True)
class Listener:
    address: bytes  # 16 bytes; an IPv4 address in the first 4
    uid: int
    inode: int


def listeners(family: int, port: int) -> list[Listener]:
    """TCP listeners of ``family`` on ``port`` in this network namespace, in the kernel's listening
    hash order. Raises OSError when netlink is refused."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
        request += _SOCKID.pack(port, 0, bytes(16), bytes(16)) + struct.pack(
            "=III", 0, 0xFFFFFFFF, 0xFFFFFFFF
        )
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        nl.send(header + request)
        found: list[Listener] = []
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                msg = _MSG.unpack_from(data, offset + _NLMSGHDR.size)
                sport, _, src, _ = _SOCKID.unpack_from(msg[4])
                if sport == port:
                    found.append(Listener(src, msg[8], msg[9]))
                offset += (length + 3) & ~3
