"""The classic-BPF router on the real kernel, as ``nobody`` with no capability at all.

Each test forks, drops to nobody (``netlab.drop_to_nobody`` checks CapEff/CapPrm/CapAmb = 0 from
/proc), opens the group with ``--loader auto`` (which must pick cbpf there) and checks every
connection against the cbpf mirror.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import netlab
from support.launcher import wait_for
from support.netlab import (
    accept_all,
    connect_all,
    in_child,
    local_ipv6_prefix,
    v4_sources,
)
from support.sandbox import deny_bpf_syscall, drop_to_nobody

from ebpf_sticky.addresses import parse_bind
from ebpf_sticky.errors import StickyError
from ebpf_sticky.hashing import HashSpec, parse_address
from ebpf_sticky.hashing import cbpf as hashing_cbpf
from ebpf_sticky.kernel import casm
from ebpf_sticky.kernel.router import Router
from ebpf_sticky.supervisor import membership

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
SPEC = HashSpec(KEY)
SOURCES = v4_sources(512)


def predicted(sources: list[str], slots: int, spec: HashSpec = SPEC) -> dict[str, int]:
    return {s: hashing_cbpf.slot_of(parse_address(s), spec, slots) for s in sources}


def routed(router: Router, sources: list[str], host: str = "127.0.0.1") -> dict[str, int]:
    return netlab.routed(router.sockets, router.port, sources, host, udp=router.udp)


def as_nobody(
    fn: Callable[[], Any], *, new_netns: bool = False, setup: Callable[[], None] | None = None
) -> Any:
    def child() -> Any:
        if setup is not None:
            setup()  # as root, e.g. addresses in the new netns
        drop_to_nobody()
        return fn()

    return in_child(child, new_netns=new_netns)


def test_ipv4_tcp_udp_specific_and_dual_stack() -> None:
    def check() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for bind in ("127.0.0.1:0", "[::]:0"):
            for udp in (False, True):
                with Router.open(parse_bind(bind), SPEC, 5, udp=udp) as router:
                    name = f"{bind}/{'udp' if udp else 'tcp'}"
                    out[name] = (router.loader, routed(router, SOURCES))
        return out

    results = as_nobody(check)
    assert len(results) == 4
    for name, (loader, got) in results.items():
        assert loader == "cbpf", name  # auto, without privilege
        assert got == predicted(SOURCES, 5), name
        assert set(got.values()) == set(range(5)), name


def test_prefix4_masks_in_the_kernel() -> None:
    # 10 sources in each of 40 /24s; a byte-order slip in the mask would split a /24 or disagree.
    sources = [f"127.{i // 8}.{i % 8 * 30}.{h}" for i in range(40) for h in (1, 77, 250)]
    spec = HashSpec(KEY, prefix4=20)

    def check() -> dict[str, int]:
        with Router.open(parse_bind("127.0.0.1:0"), spec, 7, loader="cbpf") as router:
            return routed(router, sources)

    got = as_nobody(check)
    assert got == predicted(sources, 7, spec)
    by_prefix: dict[int, set[int]] = {}
    for source, slot in got.items():
        by_prefix.setdefault(int(parse_address(source)) >> 12, set()).add(slot)
    assert all(len(slots) == 1 for slots in by_prefix.values())
    assert len(set(got.values())) > 1


def test_ipv6_tcp_udp_specific_and_dual_stack_in_a_netns() -> None:
    # 128 sources in distinct /56s, plus 16 in another /64 of the first 16 of those /56s: with
    # --prefix6 56 the two of a /56 share a slot.
    sources = [str(parse_address(f"fd00:5e:0:{i:x}00::1")) for i in range(128)]
    sources += [str(parse_address(f"fd00:5e:0:{i:x}42::beef")) for i in range(16)]
    spec = HashSpec(KEY, prefix6=56)

    def check() -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for bind in ("[fd00:5e:ffff::1]:0", "[::]:0"):
            for udp in (False, True):
                with Router.open(parse_bind(bind), spec, 6, udp=udp) as router:
                    assert router.loader == "cbpf"
                    out[f"{bind}/{'udp' if udp else 'tcp'}"] = routed(router, sources, "fd00:5e:ffff::1")
        return out

    results = as_nobody(
        check, new_netns=True, setup=lambda: local_ipv6_prefix("fd00:5e::/32", "fd00:5e:ffff::1")
    )
    assert len(results) == 4
    for name, got in results.items():
        assert got == predicted(sources, 6, spec), name
        assert len(got) == 144 and set(got.values()) == set(range(6)), name
        for i in range(16):
            assert got[sources[i]] == got[sources[128 + i]], name


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_add_retire_release_and_add_again_keep_position_equal_slot(udp: bool) -> None:
    def check() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 4, udp=udp) as router:
            out["before"] = routed(router, SOURCES)
            router.add_slot()
            out["grown"] = routed(router, SOURCES)
            router.retire_slot()
            out["retired"] = routed(router, SOURCES)
            # A worker's leftover child still holds the retired socket: release must take it
            # out of the group anyway, or the next slot would join behind it (TCP only: UDP has
            # no way to do that, see Router).
            leftover = os.dup(router.sockets[4].fileno()) if not udp else None
            router.release_slot(4)
            out["released"] = routed(router, SOURCES)
            router.add_slot()
            out["regrown"] = routed(router, SOURCES)
            if leftover is not None:
                os.close(leftover)
        return out

    got = as_nobody(check)
    before, grown = predicted(SOURCES, 4), predicted(SOURCES, 5)
    assert got["before"] == got["retired"] == got["released"] == before
    assert got["grown"] == got["regrown"] == grown
    moved = [s for s in SOURCES if before[s] != grown[s]]
    assert all(grown[s] == 4 for s in moved)
    print(f"cbpf 4->5 on the kernel: {len(moved)} of {len(SOURCES)} sources moved, all to slot 4")
    assert 0.15 <= len(moved) / len(SOURCES) <= 0.25


def test_negative_control_the_kernel_moves_the_last_member_into_a_hole() -> None:
    # What the router never lets happen: closing a middle member moves the last into its place,
    # so the program's answer for slot 1 now reaches slot 3's socket.
    def check() -> dict[str, Any]:
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 4, loader="cbpf") as router:
            hole = router.sockets[1]
            hole.close()  # behind the router's back
            sources = [s for s in SOURCES if predicted([s], 4)[s] == 1][:20]
            clients = connect_all(sources, "127.0.0.1", router.port)
            seen = accept_all([router.sockets[i] for i in (0, 2, 3)], len(sources), deadline=3)
            for client in clients:
                client.close()
            return {"landed": sorted(set(seen.values())), "count": len(seen)}

    got = as_nobody(check)
    assert got == {"landed": [2], "count": 20}  # index 2 of [0, 2, 3]: slot 3's socket


def test_negative_control_any_holder_of_a_member_can_replace_the_program() -> None:
    # Negative control for the seccomp filter (tested end to end in test_launch.py): any holder
    # of a member socket, unprivileged, can replace the classic program for the whole group.
    def check() -> list[int]:
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 3, loader="cbpf") as router:
            holder = socket.socket(fileno=os.dup(router.sockets[2].fileno()))
            ret0 = casm.encode([casm.ret(0)])
            from ebpf_sticky.kernel import syscalls

            syscalls.attach_reuseport_cbpf(holder, ret0)
            holder.detach()
            return sorted(set(routed(router, SOURCES[:60]).values()))

    assert as_nobody(check) == [0]


@pytest.mark.parametrize("comes_back", [True, False], ids=["left-and-came-back", "left"])
def test_the_watch_puts_every_client_back_and_leaves_slot_0_alone(comes_back: bool) -> None:
    """A holder of slot 1's socket takes it out of the group, and maybe back in at the end: the
    master's watch rejoins slots 1..3 in order and never touches slot 0, so a connection queued on
    slot 0 meanwhile is still there to accept, and every client is on its slot again."""

    def check() -> dict[str, Any]:
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 4, loader="cbpf") as router:
            watch = membership.Watch()
            watch.look(router)  # the order the master built
            source = next(s for s, slot in predicted(SOURCES, 4).items() if slot == 0)
            queued = socket.create_connection(("127.0.0.1", router.port), source_address=(source, 0))
            queued.sendall(b"queued")
            wait_for(lambda: router.pending(0) == 1, 5, "the connection queued on slot 0")
            holder = socket.socket(fileno=os.dup(router.sockets[1].fileno()))
            holder.shutdown(socket.SHUT_RD)
            if comes_back:
                holder.listen(16)
            watch.look(router)
            out: dict[str, Any] = {"pending": router.pending(0)}
            if out["pending"]:
                conn, _ = router.sockets[0].accept()
                out["queued"] = conn.recv(16).decode()
                conn.close()
            queued.close()
            holder.close()
            out["routed"] = routed(router, SOURCES[:200])
            return out

    got = as_nobody(check)
    assert got["pending"] == 1 and got["queued"] == "queued"
    assert got["routed"] == predicted(SOURCES[:200], 4)


def test_a_repair_decided_on_a_stale_view_still_puts_every_client_back() -> None:
    """Slot 2's holder takes it out; the master looks (slot 2 not listening); the holder puts it
    back, at the end, before the master repairs: the repair must take it out again anyway, or slot
    1 would rejoin behind it."""

    def check() -> dict[str, int]:
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 3, loader="cbpf") as router:
            holder = socket.socket(fileno=os.dup(router.sockets[2].fileno()))
            holder.shutdown(socket.SHUT_RD)
            repair = membership.decide(router.view(), 0)
            holder.listen(16)
            router.repair(repair.relisten, repair.reinsert, repair.rejoin_all)
            holder.close()
            return routed(router, SOURCES[:200])

    assert as_nobody(check) == predicted(SOURCES[:200], 3)


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "[::1]:0"], ids=["ipv4", "ipv6"])
def test_the_view_lists_a_group_in_join_order(bind: str) -> None:
    """The kernel's listening hash lists IPv4 listeners newest first and IPv6 ones oldest first;
    the view shows both in join order, which for a group the master built is slot order."""

    def check() -> list[list[int]]:
        with Router.open(parse_bind(bind), SPEC, 4, loader="cbpf") as router:
            orders = [list(router.view().order or ())]
            holder = socket.socket(fileno=os.dup(router.sockets[1].fileno()))
            holder.shutdown(socket.SHUT_RD)
            holder.listen(16)  # slot 1 joins again: last
            orders.append(list(router.view().order or ()))
            holder.close()
            return orders

    assert as_nobody(check) == [[0, 1, 2, 3], [0, 2, 3, 1]]


def test_a_socket_moved_before_the_first_look_is_put_back() -> None:
    """A holder moves slot 1's socket to the end before the master's watch ever looked (a group
    carried across an upgrade, whose workers kept running): the order is judged against slot
    order, not taken as the group's, so the first look repairs it."""

    def check() -> dict[str, int]:
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 3, loader="cbpf") as router:
            holder = socket.socket(fileno=os.dup(router.sockets[1].fileno()))
            holder.shutdown(socket.SHUT_RD)
            holder.listen(16)
            membership.Watch().look(router)
            holder.close()
            return routed(router, SOURCES[:200])

    assert as_nobody(check) == predicted(SOURCES[:200], 3)


@pytest.mark.skipif(
    not netlab.former_listener_connects(),
    reason="this kernel refuses connect() on a former listener: a holder cannot lose its slot",
)
def test_a_slot_connected_elsewhere_does_not_keep_the_others_out() -> None:
    """A holder of slot 1's socket takes it out and connects it to another server: it can never
    listen again. The watch still puts slot 2 back, and then leaves the group alone: repairing
    it again on every look would reset slot 2's queue each time."""

    def check() -> dict[str, Any]:
        with socket.socket() as elsewhere:
            elsewhere.bind(("127.0.0.1", 0))
            elsewhere.listen()
            with Router.open(parse_bind("127.0.0.1:0"), SPEC, 3, loader="cbpf") as router:
                watch = membership.Watch()
                watch.look(router)
                holder = socket.socket(fileno=os.dup(router.sockets[1].fileno()))
                holder.shutdown(socket.SHUT_RD)
                holder.connect(elsewhere.getsockname())
                watch.look(router)
                out: dict[str, Any] = {"listening": router.view().listening, "lost": sorted(router.lost)}
                # Slot 1's clients now reach position 1: slot 2's socket.
                source = next(s for s, slot in predicted(SOURCES, 3).items() if slot == 1)
                queued = socket.create_connection(("127.0.0.1", router.port), source_address=(source, 0))
                wait_for(lambda: router.pending(2) == 1, 5, "a connection queued on slot 2")
                watch.look(router)
                watch.look(router)
                out["pending"] = router.pending(2)
                queued.close()
                # A later attack on slot 2 is repaired without slot 1 coming up again.
                other = socket.socket(fileno=os.dup(router.sockets[2].fileno()))
                other.shutdown(socket.SHUT_RD)
                repair = membership.decide(router.view(), 0, frozenset(router.lost))
                try:
                    router.repair(repair.relisten, repair.reinsert, repair.rejoin_all)
                    out["later"] = "repaired"
                except StickyError as exc:
                    out["later"] = str(exc)
                out["after"] = router.view().listening
                other.close()
                holder.close()
                return out

    assert as_nobody(check) == {
        "listening": [True, False, True],
        "lost": [1],
        "pending": 1,
        "later": "repaired",
        "after": [True, False, True],
    }


def test_auto_picks_cbpf_when_a_seccomp_filter_denies_bpf_and_native_as_root() -> None:
    def open_auto(deny: bool) -> dict[str, Any]:
        if deny:
            deny_bpf_syscall()
        status = Path("/proc/self/status").read_text().splitlines()
        caps = next(line for line in status if line.startswith("CapEff"))
        with Router.open(parse_bind("127.0.0.1:0"), SPEC, 3) as router:
            return {
                "loader": router.loader,
                "choice": router.choice,
                "caps": caps.split()[1],
                "routes": routed(router, SOURCES[:100]),
            }

    filtered = in_child(lambda: open_auto(True))
    assert filtered["loader"] == "cbpf"
    assert int(filtered["caps"], 16) & (1 << 39)  # CAP_BPF held: the filter is what refused
    assert "native refused" in filtered["choice"] and "permission denied" in filtered["choice"]
    assert filtered["routes"] == predicted(SOURCES[:100], 3)
    native = in_child(lambda: open_auto(False))
    assert native["loader"] == "native"
    assert native["choice"].endswith("the kernel allows eBPF")


def test_auto_without_privilege_and_too_many_workers_names_both_refusals() -> None:
    def check() -> dict[str, Any]:
        try:
            Router.open(parse_bind("127.0.0.1:0"), SPEC, 100)
        except StickyError as exc:
            return {"type": type(exc).__name__, "message": str(exc), "exit": exc.exit_code}
        return {}

    got = as_nobody(check)
    assert got["type"] == "PrivilegeError" and got["exit"] == 3
    assert got["message"].startswith("no router can run here (native refused: the kernel refused")
    assert "cbpf refused: --workers 100 is more than the cbpf router fits (71 slots)" in got["message"]
