"""TTOU resets nothing the kernel accepted. Clients in a network namespace of their own are held in
their handshake (nftables drops everything they send after the SYN, as a long or lossy path would
delay the final ACK) while their slot retires; the path then clears and each must be served.

eBPF routers are attached for migration: the kernel moves the closed listener's handshakes to the
slot the program picks. Classic BPF has no migration: the master waits for them before closing."""

from __future__ import annotations

import random
import re
import select
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.launcher import KEY, SPEC, Instance, launched, wait_for

from ebpf_sticky.hashing import parse_address
from ebpf_sticky.kernel.diag import handshakes
from ebpf_sticky.kernel.loaders import LOADERS
from lab.multihost import IFA_F_NODAD, in_netns

CLIENTS = 12
HOLD = 3.0  # seconds the path holds the final ACKs after TTOU: past the old release (~1 s)
REQUEST = b"GET / HTTP/1.1\r\nHost: drain\r\nConnection: close\r\n\r\n"


@dataclass
class Net:
    netns: str
    server: str
    sources: list[str]
    server6: str
    sources6: list[str]  # each in a /64 of its own: the default IPv6 prefix hashes /64s


@pytest.fixture
def net() -> Iterator[Net]:
    """A namespace for the clients, joined to ours by a veth pair."""
    from pyroute2 import IPRoute, netns

    tag = uuid.uuid4().hex[:6]
    name, host_if, octet = f"core-drain-{tag}", f"cd{tag}", random.randrange(1, 255)
    prefix, prefix6 = f"198.18.{octet}", f"fd00:18:{octet:x}"
    netns.create(name)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            index = ipr.link_lookup(ifname=host_if)[0]
            ipr.addr("add", index=index, address=f"{prefix}.1", prefixlen=24, flags=IFA_F_NODAD)
            ipr.addr("add", index=index, address=f"{prefix6}::1", prefixlen=48, flags=IFA_F_NODAD)
            ipr.link("set", index=index, state="up")
        sources = [f"{prefix}.{i}" for i in range(10, 250)]
        sources6 = [f"{prefix6}:{i:x}::2" for i in range(1, 200)]
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            index = ipr.link_lookup(ifname="eth0")[0]
            for source in sources:
                ipr.addr("add", index=index, address=source, prefixlen=24, flags=IFA_F_NODAD)
            for source in sources6:
                ipr.addr("add", index=index, address=source, prefixlen=48, flags=IFA_F_NODAD)
            ipr.link("set", index=index, state="up")
        yield Net(name, f"{prefix}.1", sources, f"{prefix6}::1", sources6)
    finally:
        netns.remove(name)  # takes the veth pair with it


def nft(net: Net, script: str) -> None:
    in_netns(net.netns, lambda: subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True))


def open_held(net: Net, server: str, sources: list[str], port: int) -> list[socket.socket]:
    """Connections whose SYN went through and whose every later packet is dropped for now."""
    rule = f"tcp dport {port} tcp flags & syn != syn drop"
    nft(net, f"table inet hold {{\n chain out {{\n type filter hook output priority 0;\n {rule}\n }}\n}}\n")

    def connect() -> list[socket.socket]:
        clients = []
        for source in sources:
            client = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
            client.setblocking(False)
            client.bind((source, 0))
            client.connect_ex((server, port))
            clients.append(client)
        return clients

    clients: list[socket.socket] = in_netns(net.netns, connect)  # sockets stay in their namespace
    end = time.monotonic() + 10
    pending = set(clients)
    while pending and time.monotonic() < end:  # connected = the SYN-ACK came back
        _, writable, _ = select.select([], list(pending), [], 0.5)
        pending -= set(writable)
    assert not pending, "handshakes not answered"
    for client in clients:
        client.send(REQUEST)  # dropped and retransmitted until the path clears
    return clients


def outcome(client: socket.socket, deadline: float) -> str:
    data = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([client], [], [], 0.2)
        if not readable:
            continue
        try:
            chunk = client.recv(4096)
        except ConnectionResetError:
            return "reset"
        if not chunk:
            break
        data += chunk
    answer = re.match(rb"HTTP/1.1 200 OK\r\n.*?\r\n\r\n(?:[0-9a-f]+\r\n)?(\d+) ", data, re.DOTALL)
    if answer:  # the body is "slot pid uid", in one chunk
        return f"slot {answer.group(1).decode()}"
    return "no answer" if not data else "bad answer"


@pytest.mark.parametrize(
    ("loader", "family"),
    # "dual": IPv4 clients of a [::] socket, which the moving socket shows as ::ffff:a.b.c.d.
    [("native", "ipv4"), ("cbpf", "ipv4"), ("native", "ipv6"), ("native", "dual")],
)
def test_handshakes_in_flight_at_release_are_served(net: Net, loader: str, family: str) -> None:
    def slot_of(source: str, slots: int) -> int:
        return LOADERS[loader].slot_of(parse_address(source), SPEC, slots)

    server, bind = {
        "ipv4": (net.server, f"{net.server}:0"),
        "ipv6": (net.server6, f"[{net.server6}]:0"),
        "dual": (net.server, "[::]:0"),
    }[family]
    sources = [s for s in (net.sources6 if family == "ipv6" else net.sources) if slot_of(s, 3) == 2][:CLIENTS]
    args = ["asgi_app.py", "-w", "3", "--bind", bind, "--hash-key", KEY, "--loader", loader]
    with launched([*args, "--graceful-timeout", "30"]) as instance:
        clients = open_held(net, server, sources, instance.port)
        try:
            assert len(handshakes(instance.port)) >= len(sources)
            instance.signal(signal.SIGTTOU)
            released = retired(instance, HOLD)
            nft(net, "delete table inet hold")
            results = [outcome(client, time.monotonic() + 30) for client in clients]
        finally:
            for client in clients:
                client.close()
        wait_for(lambda: retired(instance, 0), 60, "slot 2 retired")
        expected = (
            [f"slot {slot_of(s, 2)}" for s in sources] if loader == "native" else ["slot 2"] * len(sources)
        )
        resets = results.count("reset")
        print(f"{loader} {family}: {len(sources)} handshakes held across TTOU, {resets} reset, "
              f"released {'before' if released else 'after'} the path cleared; {results}")  # fmt: skip
        assert results == expected, results


def retired(instance: Instance, within: float) -> bool:
    end = time.monotonic() + within
    while True:
        if re.search(r"slot 2 retired", instance.output()):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
