"""What the kernel's sock_diag netlink lists about one TCP port: its listeners, its handshakes and
the addresses of its connections.

No privilege is needed: sock_diag dumps every socket of this network namespace to anyone.

* **Listeners, in join order.** A listener joins its reuseport group when it is hashed (listen()),
  and the kernel puts it into the listening hash bucket of its address and port at the same
  moment: at the head for IPv4, at the tail for IPv6 (``__inet_hash``). A dump walks that bucket in
  order, so the group's sockets appear in join order (reversed for IPv4). A socket that left the
  group and joined again (a worker's ``shutdown`` then ``listen`` on a duplicate of its fd) moves
  to the head or the tail: the dump shows it even when the move happened between two looks, which
  is what the classic-BPF router, whose program returns positions in the group, needs.
* **Handshakes in flight** (what ``ss state syn-recv`` shows). A retiring slot must not be closed
  while a handshake its listener answered is still waiting for the client's final ACK: closing the
  listener drops that request, and the ACK, arriving later, is answered with a reset. The group's
  listeners share one port and sock_diag does not say which listener a request belongs to, so the
  router waits for every handshake on the port that was in flight when the slot stopped getting
  new ones.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED, TCP_SYN_RECV, TCP_LISTEN, TCP_NEW_SYN_RECV = 1, 3, 10, 12  # requests: NEW_SYN_RECV
_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then an inet_diag_sockid with only its
# local port set (big-endian; 0: any), by which a dump filters, the rest zero.
_REQUEST = struct.Struct("=BBBxI2s46x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport big-endian, src[16], dst[16],
# if, cookie[2]), expires, rqueue, wqueue, uid, inode.
_MSG = struct.Struct("=BBBB2s2s16s16s12xIIIII")

Handshake = bytes  # the connection's family, ports and addresses, as the kernel wrote them


@dataclass(frozen=True)
class Listener:
    address: bytes  # 16 bytes; an IPv4 address in the first 4
    uid: int
    inode: int


def listeners(family: int, port: int) -> list[Listener]:
    """TCP listeners of ``family`` on ``port`` in this network namespace, in the kernel's listening
    hash order. Raises OSError when netlink is refused."""
    return [
        Listener(src, uid, inode)
        for _, sport, _, src, _, uid, inode in _dump(family, 1 << TCP_LISTEN)
        if sport == port
    ]


def handshakes(port: int) -> set[Handshake]:
    """The TCP connections to local ``port`` still in their handshake (SYN received, ACK not yet)."""
    states = 1 << TCP_SYN_RECV | 1 << TCP_NEW_SYN_RECV
    return {
        bytes([family]) + sport.to_bytes(2, "big") + dport + src + dst
        for family in (socket.AF_INET, socket.AF_INET6)
        for _, sport, dport, src, dst, _, _ in _dump(family, states)
        if sport == port
    }


def peers(port: int) -> list[bytes]:
    """The remote address (16 bytes; IPv4 in the first 4) of each established TCP connection to
    local ``port``, accepted or still in a listener's queue. The kernel filters by the port."""
    return [
        dst
        for family in (socket.AF_INET, socket.AF_INET6)
        for _, sport, _, _, dst, _, _ in _dump(family, 1 << TCP_ESTABLISHED, port)
        if sport == port
    ]


def _dump(
    family: int, states: int, port: int = 0
) -> Iterator[tuple[int, int, bytes, bytes, bytes, int, int]]:
    """(state, local port, remote port bytes, local address, remote address, uid, inode) of each
    TCP socket of ``family`` in one of ``states`` (and on local ``port``, if not 0)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, states, port.to_bytes(2, "big"))
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        nl.send(header + body)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    raise OSError(err, f"sock_diag: {os.strerror(err)}")
                if length < _NLMSGHDR.size:
                    raise OSError(f"sock_diag: malformed message of {length} bytes")
                _, state, _, _, sport, dport, src, dst, _, _, _, uid, inode = _MSG.unpack_from(
                    data, offset + _NLMSGHDR.size
                )
                yield state, int.from_bytes(sport, "big"), dport, src, dst, uid, inode
                offset += (length + 3) & ~3
