"""Real clients from many source addresses, and throwaway network namespaces, for the tests."""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import json
import os
import select
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000


def v4_sources(count: int, start: int = 2) -> list[str]:
    """Distinct loopback addresses 127.x.y.z, usable as client sources with no setup."""
    sources: list[str] = []
    i = start
    while len(sources) < count:
        if i & 0xFF not in (0, 255):
            sources.append(f"127.{(i >> 16) & 0xFF}.{(i >> 8) & 0xFF}.{i & 0xFF}")
        i += 1
    return sources


def connect_all(
    sources: Iterable[str], host: str, port: int, family: int = socket.AF_INET
) -> list[socket.socket]:
    clients = []
    for source in sources:
        client = socket.socket(family, socket.SOCK_STREAM)
        client.bind((source, 0))
        client.connect((host, port))
        clients.append(client)
    return clients


def accept_all(listeners: list[socket.socket], expected: int, deadline: float = 10.0) -> dict[str, int]:
    """Accept from every listener until ``expected`` connections arrived: peer address → slot."""
    seen: dict[str, int] = {}
    end = time.monotonic() + deadline
    while len(seen) < expected and time.monotonic() < end:
        readable, _, _ = select.select(listeners, [], [], 0.2)
        for sock in readable:
            conn, peer = sock.accept()
            seen[peer[0]] = listeners.index(sock)
            conn.close()
    return seen


def send_all_udp(sources: Iterable[str], host: str, port: int, family: int = socket.AF_INET) -> None:
    for source in sources:
        with socket.socket(family, socket.SOCK_DGRAM) as client:
            client.bind((source, 0))
            client.sendto(b"x", (host, port))


def recv_all_udp(listeners: list[socket.socket], expected: int, deadline: float = 10.0) -> dict[str, int]:
    seen: dict[str, int] = {}
    end = time.monotonic() + deadline
    while len(seen) < expected and time.monotonic() < end:
        readable, _, _ = select.select(listeners, [], [], 0.2)
        for sock in readable:
            _, peer = sock.recvfrom(16)
            seen[peer[0]] = listeners.index(sock)
    return seen


def routed(
    sockets: list[socket.socket], port: int, sources: list[str], host: str = "127.0.0.1", *, udp: bool = False
) -> dict[str, int]:
    """One connection (or datagram) from each source to host:port: source → index of the socket
    that got it. An IPv4 client seen on a dual-stack socket is reported as its IPv4 address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if udp:
        send_all_udp(sources, host, port, family)
        seen = recv_all_udp(sockets, len(sources))
    else:
        clients = connect_all(sources, host, port, family)
        try:
            seen = accept_all(sockets, len(sources))
        finally:
            for client in clients:
                client.close()
    return {_canonical(peer): index for peer, index in seen.items()}


def _canonical(peer: str) -> str:
    address = ipaddress.ip_address(peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@functools.cache
def former_listener_connects() -> bool:
    """Whether this kernel lets a socket that listened, and was shut down, connect() somewhere.
    Where it does, a holder of a slot's socket can make it something that never listens again;
    some kernels (seen on a 6.18 build) refuse with EINVAL, and the slot can only leave."""
    with socket.socket() as server, socket.socket() as former:
        server.bind(("127.0.0.1", 0))
        server.listen()
        former.bind(("127.0.0.1", 0))
        former.listen()
        former.shutdown(socket.SHUT_RD)
        former.setblocking(False)
        refused = former.connect_ex(server.getsockname())
        if refused not in (0, errno.EINPROGRESS, errno.EINVAL):
            raise OSError(refused, os.strerror(refused))
        return refused != errno.EINVAL


def in_new_netns(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child inside a fresh network namespace; return its JSON result.

    Everything the child adds (addresses, sockets) dies with the namespace: nothing to clean up.
    """
    return in_child(fn, new_netns=True)


def in_child(fn: Callable[[], Any], *, new_netns: bool = False) -> Any:
    """Run ``fn`` in a forked child (optionally in a fresh network namespace); return its JSON
    result. What the child changes in itself (a privilege drop, a seccomp filter) stays there."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            if new_netns and ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            payload = {"result": fn()}
        except BaseException:
            payload, code = {"error": traceback.format_exc()}, 1
        with os.fdopen(write_end, "w") as f:
            json.dump(payload, f)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        data = f.read()
    os.waitpid(pid, 0)
    payload = json.loads(data)
    if "error" in payload:
        raise AssertionError("child failed:\n" + payload["error"])
    return payload["result"]


def local_ipv6_prefix(prefix: str, probe: str) -> None:
    """Inside a fresh netns: every address of ``prefix`` is local and bindable, at once.

    One local route for the whole prefix and non-local binds instead of an address per source:
    addresses added one by one get their local routes from the kernel's asynchronous addrconf, and
    a connect right after fails now and then with ENETUNREACH.
    """
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-6", "route", "add", "local", prefix, "dev", "lo"], check=True)
    Path("/proc/sys/net/ipv6/ip_nonlocal_bind").write_text("1")
    end = time.monotonic() + 5.0
    while not _routable(probe):
        if time.monotonic() > end:
            raise AssertionError(f"no route to {probe} 5 s after adding {prefix}")
        time.sleep(0.02)


def _routable(address: str) -> bool:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))  # a route lookup; sends nothing
        except OSError:
            return False
    return True
