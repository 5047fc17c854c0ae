"""The router on the real kernel: every connection lands where the Python mirror says."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
from support.netlab import (
    accept_all,
    connect_all,
    in_new_netns,
    local_ipv6_prefix,
    recv_all_udp,
    routed,
    send_all_udp,
    v4_sources,
)

from ebpf_sticky.addresses import parse_bind
from ebpf_sticky.errors import AddressInUseError, VerifierError
from ebpf_sticky.hashing import HashSpec, parse_address, slot_of
from ebpf_sticky.kernel import asm, syscalls
from ebpf_sticky.kernel.router import Router

SPEC = HashSpec(bytes.fromhex("00112233445566778899aabbccddeeff"))
SOURCES = v4_sources(512)


def predicted(sources: list[str], slots: int, spec: HashSpec = SPEC) -> dict[str, int]:
    return {s: slot_of(parse_address(s), spec, slots) for s in sources}


def routed_tcp(router: Router, sources: list[str], host: str = "127.0.0.1") -> dict[str, int]:
    return routed(router.sockets, router.port, sources, host)


@pytest.fixture(params=["native", pytest.param("bcc", marks=pytest.mark.bcc)])
def loader(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def router4(loader: str) -> Iterator[Router]:
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 5, loader=loader) as router:
        yield router


def test_tcp_ipv4_every_connection_lands_on_the_predicted_slot(router4: Router) -> None:
    got = routed_tcp(router4, SOURCES)
    assert got == predicted(SOURCES, 5)
    counters = router4.counters()
    assert counters.failures == 0
    # The counters count selections: one per SYN, and a second on the ACK of a connection that
    # went through SYN cookies (which a loaded machine turns on for a burst like this one).
    for slot in range(5):
        connections, selections = Counter(got.values())[slot], counters.per_slot[slot]
        assert selections is not None and connections <= selections <= 2 * connections


def test_udp_ipv4_every_datagram_lands_on_the_predicted_slot(loader: str) -> None:
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 4, udp=True, loader=loader) as router:
        send_all_udp(SOURCES, "127.0.0.1", router.port)
        got = recv_all_udp(router.sockets, len(SOURCES))
        assert got == predicted(SOURCES, 4)


def test_dual_stack_ipv4_client_hashes_as_on_an_ipv4_socket(loader: str) -> None:
    with Router.open(parse_bind("[::]:0"), SPEC, 5, loader=loader) as router:
        got = routed_tcp(router, SOURCES[:256])
    assert got == predicted(SOURCES[:256], 5)


@pytest.mark.bcc
def test_native_and_bcc_route_identically() -> None:
    bind = parse_bind("127.0.0.1:0")
    with (
        Router.open(bind, SPEC, 7, loader="native") as native,
        Router.open(bind, SPEC, 7, loader="bcc") as bcc,
    ):
        assert routed_tcp(native, SOURCES) == routed_tcp(bcc, SOURCES)


def _ipv6_routes(loader: str) -> dict[str, dict[str, int]]:
    # 128 subscribers in distinct /64s, plus a second address in each of the first 16 /64s.
    sources = [str(parse_address(f"fd00:5e:0:{i:x}::1")) for i in range(128)]
    sources += [str(parse_address(f"fd00:5e:0:{i:x}::beef")) for i in range(16)]
    local_ipv6_prefix("fd00:5e::/32", "fd00:5e:ffff::1")
    result: dict[str, dict[str, int]] = {}
    for bind in ("[fd00:5e:ffff::1]:0", "[::]:0"):
        with Router.open(parse_bind(bind), SPEC, 6, loader=loader) as router:
            result[bind] = routed_tcp(router, sources, "fd00:5e:ffff::1")
        with Router.open(parse_bind(bind), SPEC, 6, udp=True, loader=loader) as router:
            send_all_udp(sources, "fd00:5e:ffff::1", router.port, socket.AF_INET6)
            got = recv_all_udp(router.sockets, len(sources))
            result[bind + "/udp"] = {str(parse_address(p)): s for p, s in got.items()}
    return result


def test_ipv6_sources_in_a_netns(loader: str) -> None:
    results = in_new_netns(lambda: _ipv6_routes(loader))
    for got in results.values():
        assert len(got) == 144
        assert got == predicted(list(got), 6)
        for i in range(16):  # two addresses of one /64 share a slot
            one, other = (str(parse_address(f"fd00:5e:0:{i:x}::{h}")) for h in ("1", "beef"))
            assert got[one] == got[other]
        assert len(set(got.values())) == 6


def test_foreign_reuseport_socket_receives_nothing(router4: Router) -> None:
    with socket.socket() as foreign:
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", router4.port))
        foreign.listen(1024)
        got = routed_tcp(router4, SOURCES[:300])
        assert got == predicted(SOURCES[:300], 5)
        foreign.setblocking(False)
        with pytest.raises(BlockingIOError):
            foreign.accept()


def test_negative_control_without_program_is_not_sticky() -> None:
    # The same group with the program detached: the kernel's 4-tuple hash scatters one source's
    # connections over the slots, which is what the tests above would catch.
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 5) as router:
        router.sockets[0].setsockopt(socket.SOL_SOCKET, syscalls.SO_DETACH_REUSEPORT_BPF, 0)
        sources = SOURCES[:40]
        first, second = routed_tcp(router, sources), routed_tcp(router, sources)
        assert first != second


def test_add_then_retire_slot_moves_only_the_new_share(loader: str) -> None:
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 4, loader=loader) as router:
        before = routed_tcp(router, SOURCES)
        assert router.add_slot() == 4
        grown = routed_tcp(router, SOURCES)
        assert grown == predicted(SOURCES, 5)
        assert all(grown[s] == 4 for s in SOURCES if grown[s] != before[s])
        assert router.retire_slot() == 4
        assert routed_tcp(router, SOURCES) == before
        router.release_slot(4)
        assert router.slots == 4
        assert routed_tcp(router, SOURCES) == before
        assert router.counters().failures == 0


def test_retired_slot_keeps_its_queue_until_released() -> None:
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 3) as router:
        victims = [s for s in SOURCES if predicted([s], 3)[s] == 2][:20]
        clients = connect_all(victims, "127.0.0.1", router.port)
        assert accept_all(router.sockets[:2], 1, deadline=0.3) == {}
        router.retire_slot()
        assert router.pending(2) == 20  # queued before the flip: still there, not reset
        assert len(accept_all([router.sockets[2]], 20)) == 20
        assert router.pending(2) == 0
        for client in clients:
            client.close()


def test_port_taken_by_a_plain_socket() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        with pytest.raises(AddressInUseError, match="in use by a socket that is not ours"):
            Router.open(parse_bind(f"127.0.0.1:{port}"), SPEC, 2)
    assert_no_leaked_bpf_fds()


def assert_no_leaked_bpf_fds() -> None:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [link for link in links if link.startswith("anon_inode:bpf")], links


def test_verifier_rejection_carries_the_log() -> None:
    bad = asm.encode([asm.ldx(asm.DW, asm.R0, asm.R10, 8), asm.exit_()])  # reads above the stack
    with pytest.raises(VerifierError) as info:
        syscalls.prog_load(syscalls.PROG_TYPE_SK_REUSEPORT, bad, "bad", syscalls.ATTACH_SK_REUSEPORT_SELECT)
    assert "invalid" in info.value.log or "R10" in info.value.log
    assert "verifier rejected 'bad'" in str(info.value)


def test_no_privilege_gives_one_clear_line() -> None:
    script = (
        "import os, sys\n"
        "from ebpf_sticky.addresses import parse_bind\n"
        "from ebpf_sticky.errors import PrivilegeError\n"
        "from ebpf_sticky.hashing import HashSpec\n"
        "from ebpf_sticky.kernel.router import Router\n"
        "try:\n"
        "    Router.open(parse_bind('127.0.0.1:0'), HashSpec(os.urandom(16)), 2, loader='native')\n"
        "except PrivilegeError as exc:\n"
        "    print(exc); sys.exit(7)\n"
    )
    proc = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 7, proc.stderr
    assert "this process lacks CAP_BPF (or CAP_SYS_ADMIN)" in proc.stdout


def test_pending_is_zero_for_udp() -> None:
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 2, udp=True) as router:
        assert router.pending(0) == 0
