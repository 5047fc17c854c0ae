"""TCP handshakes in flight, as the kernel's sock_diag netlink lists them (what `ss state syn-recv`
shows): no privilege needed, and this network namespace's sockets only.

A retiring slot must not be closed while a handshake its listener answered is still waiting for
the client's final ACK: closing the listener drops that request, and the ACK, arriving later, is
answered with a reset. The group's listeners share one port and sock_diag does not say which
listener a request belongs to, so the router waits for every handshake on the port that was in
flight when the slot stopped getting new ones.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_SYN_RECV, TCP_NEW_SYN_RECV = 3, 12  # request sockets are listed as TCP_NEW_SYN_RECV
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBBBI48x")  # struct inet_diag_req_v2; its inet_diag_sockid left zero
# struct inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid (ports big-endian).
_MESSAGE = struct.Struct("=BBBB2s2s16s16s")
_SPORT = struct.Struct("!H")

Handshake = bytes  # the connection's addresses and ports, as the kernel wrote them


def handshakes(port: int) -> set[Handshake]:
    """The TCP connections to local ``port`` still in their handshake (SYN received, ACK not yet)."""
    found: set[Handshake] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            found |= _dump(sock, family, port)
    return found


def _dump(sock: socket.socket, family: int, port: int) -> set[Handshake]:
    states = 1 << TCP_SYN_RECV | 1 << TCP_NEW_SYN_RECV
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, states)
    sock.send(
        _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
    )
    found: set[Handshake] = set()
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
            _, _, _, _, sport, dport, src, dst = _MESSAGE.unpack_from(data, offset + _HEADER.size)
            if _SPORT.unpack(sport)[0] == port:
                found.add(bytes([family]) + sport + dport + src + dst)
            if length < _HEADER.size:
                raise OSError(f"sock_diag: malformed message of {length} bytes")
            offset += (length + 3) & ~3
