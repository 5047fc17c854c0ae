"""Routing of a running instance measured from the client side: non-default prefixes against the
kernel (IPv6 in a throwaway network namespace), and the share of clients TTIN/TTOU really move."""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import sys
from typing import Any

import pytest
from support.launcher import KEY, Instance, launched, wait_for
from support.netlab import in_new_netns, local_ipv6_prefix, v4_sources

from ebpf_sticky.hashing import HashSpec, parse_address, slot_of

# Answers each connection with its slot number: the cheapest worker there is.
SLOT_SERVER = (
    "import os, socket; s = socket.socket(fileno=3); w = os.environ['EBPF_STICKY_WORKER'].encode()\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(w); c.close()\n"
)
WORKERS = 4


def slot_server(bind: str, *extra: str, workers: int = WORKERS) -> list[str]:
    return [
        "-w",
        str(workers),
        "--bind",
        bind,
        "--hash-key",
        KEY,
        *extra,
        "--",
        sys.executable,
        "-c",
        SLOT_SERVER,
    ]


def slot_for(source: str, host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.bind((source, 0))
        client.connect((host, port))
        return int(client.recv(8))


def check_groups(groups: dict[str, list[str]], seen: dict[str, int], spec: HashSpec, slots: int) -> None:
    """Every client of a prefix on one slot, the slot the Python mirror predicts, prefixes spread."""
    for prefix, members in groups.items():
        assert {seen[m] for m in members} == {slot_of(parse_address(prefix), spec, slots)}, (prefix, seen)
        for member in members:
            assert seen[member] == slot_of(parse_address(member), spec, slots), member
    assert len({seen[members[0]] for members in groups.values()}) > 1  # the prefixes did not all collapse


def v4_groups(length: int, count: int) -> dict[str, list[str]]:
    """``count`` prefixes of ``length`` inside 127/8, each with members spread over its host bits."""
    groups = {}
    for i in range(count):
        network = ipaddress.ip_network(f"127.{16 + i * 16}.0.0/{length}")
        hosts = [network.network_address + offset for offset in (1, 2, network.num_addresses // 2 + 3,
                                                                  network.num_addresses - 2)]  # fmt: skip
        groups[str(network.network_address)] = [str(h) for h in hosts]
    return groups


@pytest.mark.parametrize("length", [24, 20])
def test_prefix4_groups_clients_in_the_kernel(length: int) -> None:
    groups = v4_groups(length, 12)
    spec = HashSpec(bytes.fromhex(KEY), prefix4=length)
    with launched(slot_server("127.0.0.1:0", "--prefix4", str(length))) as instance:
        seen = {m: slot_for(m, "127.0.0.1", instance.port) for ms in groups.values() for m in ms}
    check_groups(groups, seen, spec, WORKERS)


def v6_groups(length: int, count: int) -> dict[str, list[str]]:
    groups = {}
    for i in range(count):
        network = ipaddress.ip_network(f"fd00:{length}:{i + 1:x}::/{length}" if length == 48
                                       else f"fd00:{length}:0:{(i + 1) << 8:x}::/{length}")  # fmt: skip
        base = int(network.network_address)
        span = network.num_addresses
        # Members differ in the bits right after the prefix too: a mask applied to the wrong bytes
        # would split them.
        offsets = (1, span // 2 + 7, span - 2, span // 256 * 3 + 1)
        groups[str(network.network_address)] = [str(ipaddress.IPv6Address(base + o)) for o in offsets]
    return groups


def route_in_netns(length: int, groups: dict[str, list[str]]) -> dict[str, int]:
    """Inside a fresh netns: fd00::/16 is local (server and clients alike), then launch and ask."""
    local_ipv6_prefix("fd00::/16", "fd00::1")
    with launched(slot_server("[fd00::1]:0", "--prefix6", str(length))) as instance:
        return {m: slot_for(m, "fd00::1", instance.port) for ms in groups.values() for m in ms}


@pytest.mark.parametrize("length", [48, 56])
def test_prefix6_groups_clients_in_the_kernel(length: int) -> None:
    groups = v6_groups(length, 12)
    seen: dict[str, Any] = in_new_netns(lambda: route_in_netns(length, groups))
    check_groups(groups, seen, HashSpec(bytes.fromhex(KEY), prefix6=length), WORKERS)


def test_ttin_ttou_move_exactly_the_new_slots_share_measured_live() -> None:
    sources = v4_sources(600, start=40000)
    spec = HashSpec(bytes.fromhex(KEY))

    def measure(instance: Instance) -> dict[str, int]:
        return {s: slot_for(s, "127.0.0.1", instance.port) for s in sources}

    with launched(slot_server("127.0.0.1:0", workers=3)) as instance:
        before = measure(instance)
        instance.signal(signal.SIGTTIN)
        wait_for(lambda: re.search(r"slot 3: worker \d+ ready", instance.output()), 30, "slot 3 ready")
        grown = measure(instance)
        instance.signal(signal.SIGTTOU)
        wait_for(lambda: "slot 3 retired" in instance.output(), 30, "slot 3 retired")
        shrunk = measure(instance)
    moved = [s for s in sources if grown[s] != before[s]]
    share = len(moved) / len(sources)
    print(f"TTIN 3→4 moved {len(moved)}/{len(sources)} clients ({share:.3f}; ideal 0.250), all to slot 3; "
          f"TTOU moved {sum(shrunk[s] != grown[s] for s in sources)} back")  # fmt: skip
    assert before == {s: slot_of(parse_address(s), spec, 3) for s in sources}
    assert grown == {s: slot_of(parse_address(s), spec, 4) for s in sources}
    assert {grown[s] for s in moved} == {3}  # only to the new slot: nobody else moved
    assert 0.2 <= share <= 0.3
    assert shrunk == before
