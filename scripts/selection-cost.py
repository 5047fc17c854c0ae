#!/usr/bin/env python3
"""What one selection costs, per router: CPU ns per datagram with the router's program attached,
minus the same with a one-instruction classic program (``ret #0``) on the same UDP group.

On loopback the whole receive path, selection included, runs in the sender's context, so the
sender's CPU time (not wall time, which other tenants of a shared machine distort) per sendto()
measures it. Each variant runs ROUNDS short rounds interleaved; the minimum of each is kept (the
least-disturbed run). Needs root for the native loader; the cbpf figure needs nothing.

    scripts/selection-cost.py [--slots N] [--rounds N] [--datagrams N] [LOADER ...]  (default: native cbpf)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ebpf_sticky.addresses import parse_bind  # noqa: E402
from ebpf_sticky.hashing import HashSpec  # noqa: E402
from ebpf_sticky.hashing import cbpf as hashing_cbpf  # noqa: E402
from ebpf_sticky.kernel import casm, cbpf, syscalls  # noqa: E402
from ebpf_sticky.kernel.router import Router  # noqa: E402


def cpu_ns_per_datagram(sender: socket.socket, port: int, count: int) -> float:
    start = time.process_time_ns()
    for _ in range(count):
        sender.sendto(b"x", ("127.0.0.1", port))
    return (time.process_time_ns() - start) / count


def drain(router: Router) -> None:
    for sock in router.sockets:
        sock.setblocking(False)
        try:
            while True:
                sock.recv(16)
        except BlockingIOError:
            pass


def attach_own_program(router: Router) -> None:
    if router.loader == "cbpf":
        insns = cbpf.build(hashing_cbpf.program_constants(router.spec), router.slots)
        syscalls.attach_reuseport_cbpf(router.sockets[0], casm.encode(insns))
    else:
        syscalls.attach_reuseport(router.sockets[0], router.program_fd)


def measure(loader: str, slots: int, rounds: int, count: int) -> tuple[float, float, int]:
    spec = HashSpec(os.urandom(16))
    with (
        Router.open(parse_bind("127.0.0.1:0"), spec, slots, udp=True, loader=loader) as router,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        sender.bind(("127.0.0.2", 0))
        trivial = casm.encode([casm.ret(0)])
        full: list[float] = []
        minimal: list[float] = []
        for _ in range(rounds):
            syscalls.attach_reuseport_cbpf(router.sockets[0], trivial)
            drain(router)
            minimal.append(cpu_ns_per_datagram(sender, router.port, count))
            attach_own_program(router)
            drain(router)
            full.append(cpu_ns_per_datagram(sender, router.port, count))
        return min(full), min(minimal), router.insn_count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("loaders", nargs="*", default=["native", "cbpf"])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--datagrams", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{args.slots} slots\nrouter   insns  ns/datagram  with ret #0  selection ns")
    for loader in args.loaders:
        full, minimal, insns = measure(loader, args.slots, args.rounds, args.datagrams)
        print(f"{loader:<7} {insns:>6}  {full:>11.0f}  {minimal:>11.0f}  {full - minimal:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
