"""Figures about the kernel side and the hash, measured without a load generator: the program's
cost per selection (kernel.bpf_stats_enabled), the floor of what any selection program costs on
this kernel, and the hash's balance and remapping against sticky-session's."""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import os
import random
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ebpf_sticky.addresses import parse_bind
from ebpf_sticky.hashing import BUCKETS, Address, HashSpec, bucket_table, buckets_of
from ebpf_sticky.kernel import asm, program, syscalls
from ebpf_sticky.kernel.loaders import LOADERS
from ebpf_sticky.kernel.router import Router

from .seedhash import seed_worker


@contextlib.contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(old)


def bpf_stats(master_pid: int) -> dict[str, float]:
    for fdinfo in Path(f"/proc/{master_pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            text = fdinfo.read_text()
            if re.search(rf"^prog_type:\s+{syscalls.PROG_TYPE_SK_REUSEPORT}$", text, re.M):
                run_ns = int(re.search(r"run_time_ns:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
                runs = int(re.search(r"run_cnt:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
                return {"run_cnt": runs, "ns_per_selection": round(run_ns / max(runs, 1), 1)}
    return {}


def program_sizes(workers: int) -> dict[str, int]:
    """Instructions of the selection program each loader of this tree builds for ``workers``."""
    sizes = {}
    for loader in LOADERS:
        with Router.open(
            parse_bind("127.0.0.1:0"), HashSpec(os.urandom(16)), workers, loader=loader
        ) as router:
            sizes[loader] = router.insn_count
    return sizes


def floor_programs(connections: int) -> dict[str, float]:
    """What this kernel charges for the least a selection program can do: an empty program, and
    one that only reads the source address and selects slot 0."""
    spec = HashSpec(os.urandom(16))
    with Router.open(parse_bind("127.0.0.1:0"), spec, 2) as router:
        socks_fd = router.map_fds.socks if router.map_fds else -1
        variants = {
            "empty_program_ns": [asm.mov(asm.R0, program.SK_PASS), asm.exit_()],
            "load_and_select_ns": [
                asm.movr(asm.R6, asm.R1),
                asm.mov(asm.R2, program.IPV4_SRC_OFFSET),
                asm.movr(asm.R3, asm.R10),
                asm.alu64("add", asm.R3, program.ADDR),
                asm.mov(asm.R4, 4),
                asm.mov(asm.R5, program.HDR_START_NET),
                asm.call(program.HELPER_SKB_LOAD_BYTES_RELATIVE),
                asm.st(asm.W, asm.R10, program.SLOT, 0),
                asm.movr(asm.R1, asm.R6),
                *asm.ld_map_fd(asm.R2, socks_fd),
                asm.movr(asm.R3, asm.R10),
                asm.alu64("add", asm.R3, program.SLOT),
                asm.mov(asm.R4, 0),
                asm.call(program.HELPER_SK_SELECT_REUSEPORT),
                asm.mov(asm.R0, program.SK_PASS),
                asm.exit_(),
            ],
        }
        out = {}
        programs = {
            name: syscalls.prog_load(
                syscalls.PROG_TYPE_SK_REUSEPORT,
                asm.encode(asm.assemble(insns)),
                "floor",
                syscalls.ATTACH_SK_REUSEPORT_SELECT,
            )
            for name, insns in variants.items()
        }
        programs["full_program_ns"] = router.program_fd
        for name, fd in programs.items():
            syscalls.attach_reuseport(router.sockets[0], fd)
            before = _fd_stats(fd)
            for i in range(connections):
                with socket.socket() as client:
                    client.bind((f"127.77.{200 + i // 250}.{i % 250 + 1}", 0))  # untracked, as CLIENT_NET
                    client.connect(("127.0.0.1", router.port))
                for sock in router.sockets:
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            sock.accept()[0].close()
            after = _fd_stats(fd)
            out[name] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 1)
            if name != "full_program_ns":
                os.close(fd)
        return out


def _fd_stats(fd: int) -> tuple[int, int]:
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    ns = int(re.search(r"run_time_ns:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    cnt = int(re.search(r"run_cnt:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    return ns, cnt


def classic_mirror() -> Callable[[list[Address], HashSpec], list[int]] | None:
    """The classic-BPF router's Python mirror (address -> bucket), where this tree has it."""
    try:
        module = importlib.import_module("ebpf_sticky.hashing.cbpf")
    except ImportError:
        return None
    mirror: Callable[[list[Address], HashSpec], list[int]] = module.buckets_of
    return mirror


def hash_figures(quick: bool) -> dict[str, Any]:
    spec = HashSpec(os.urandom(16))
    rng = random.Random(7)
    n4, seq_prefix = (100_000, 15) if quick else (1_000_000, 12)
    sets: dict[str, list[Address]] = {
        "random_ipv4": [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(n4)],
        f"sequential_ipv4_{seq_prefix}": [
            ipaddress.IPv4Address(0x0A000000 + i) for i in range(1 << (32 - seq_prefix))
        ],
        "random_ipv6_64s": [ipaddress.IPv6Address(rng.getrandbits(64) << 64) for _ in range(100_000)],
    }
    mirrors: dict[str, Callable[[list[Address], HashSpec], list[int]]] = {"ebpf": buckets_of}
    # The classic mirror is pure-Python HalfSipHash (a few µs an address): full runs only.
    if not quick and (cbpf := classic_mirror()):
        mirrors["cbpf"] = cbpf
    balance: dict[str, dict[str, Any]] = {}
    remap_buckets = {}
    for router, mirror in mirrors.items():
        for name, addresses in sets.items():
            table = bucket_table(8)
            counts = Counter(table[b] for b in mirror(addresses, spec))
            key = name if router == "ebpf" else f"{name} (cbpf)"
            balance[key] = {
                "addresses": len(addresses),
                "slots": 8,
                "max_over_mean": round(max(counts.values()) / (len(addresses) / 8), 4),
            }
        remap_buckets[router] = mirror(sets["random_ipv4"], spec)
    buckets = remap_buckets["ebpf"]
    seed = rng.getrandbits(31)
    packed = [a.packed for a in sets["random_ipv4"][:100_000]]
    remap = []
    for n in range(2, 17):
        before, after = bucket_table(n), bucket_table(n + 1)
        ours = sum(before[b] != after[b] for b in buckets) / len(buckets)
        classic = {
            f"ebpf_sticky_{router}": round(sum(before[b] != after[b] for b in bs) / len(bs), 4)
            for router, bs in remap_buckets.items()
            if router != "ebpf"
        }
        modulo = sum(seed_worker(p, seed, n) != seed_worker(p, seed, n + 1) for p in packed) / len(packed)
        remap.append(
            {
                "n": n,
                "ideal": round(1 / (n + 1), 4),
                "ebpf_sticky": round(ours, 4),
                "sticky_session_modulo": round(modulo, 4),
                **classic,
            }
        )
    # The seed's skew: its int31 hash over 10 workers (uqee/sticky-cluster measured 27,367 of 100k
    # on one worker); the worst of a few random seeds, as each restart draws a new one.
    worst = 0.0
    for _ in range(5):
        s = rng.getrandbits(31)
        counts10 = Counter(seed_worker(p, s, 10) for p in packed)
        worst = max(worst, max(counts10.values()) / len(packed))
    return {
        "buckets": BUCKETS,
        "balance": balance,
        "remap": remap,
        "sticky_session_max_share_10_workers": round(worst, 4),
        "ideal_share_10_workers": 0.1,
    }
