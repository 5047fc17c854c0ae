"""App code in a worker attacks the group through its own listener (fd 3), as the security model
(docs/discussion/security.md) says it cannot: every client must stay on its slot afterwards.

Each test launches 3 workers of ``unstick_app.py``, checks 90 client addresses against the
loader's Python mirror, has slot 0's worker attack, and checks the 90 again.
"""

from __future__ import annotations

import errno
import http.client
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.launcher import APPS, KEY, SPEC, Instance, get, launched, wait_for
from support.netlab import former_listener_connects, v4_sources

from ebpf_sticky.hashing import parse_address
from ebpf_sticky.kernel.loaders import LOADERS

SOURCES = v4_sources(90)
SLOTS = 3
BASE = ["unstick_app.py", "-w", str(SLOTS), "--bind", "127.0.0.1:0", "--hash-key", KEY]


def misrouted(instance: Instance, loader: str) -> list[str]:
    """Sources whose connection reached another slot than the loader's mirror predicts."""
    wrong = []
    for source in SOURCES:
        slot, _, _ = get(source, instance.port)
        if slot != LOADERS[loader].slot_of(parse_address(source), SPEC, SLOTS):
            wrong.append(source)
    return wrong


def attack(instance: Instance, loader: str, how: str, path: str = "/attack") -> list[int]:
    """Have slot 0's worker attack its listener; the errno of each step."""
    source = next(s for s in SOURCES if LOADERS[loader].slot_of(parse_address(s), SPEC, SLOTS) == 0)
    conn = http.client.HTTPConnection("127.0.0.1", instance.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", f"{path}?how={how}")
        return [int(n) for n in conn.getresponse().read().split()]
    finally:
        conn.close()


@pytest.mark.parametrize("loader", ["native", "cbpf"])
@pytest.mark.parametrize("how", ["shutdown", "connect", "dup"])
def test_the_filter_refuses_unhashing_fd_3(loader: str, how: str) -> None:
    with launched([*BASE, "--loader", loader]) as instance:
        assert misrouted(instance, loader) == []
        # shutdown/connect(3) and dup(3) answer EPERM; listen() on a listener is harmless.
        assert attack(instance, loader, how) == ([errno.EPERM] if how == "dup" else [errno.EPERM, 0])
        assert misrouted(instance, loader) == []
        assert "membership:" not in instance.output()


@pytest.mark.parametrize("loader", ["native", "cbpf"])
@pytest.mark.parametrize("how", ["passed", "left"])
def test_the_master_repairs_what_the_filter_cannot_see(loader: str, how: str) -> None:
    """fd 3 passed to itself over a Unix socket: the duplicate's shutdown (and listen, unless the
    slot only leaves) succeed, and the master's watch puts the group back (native: listening and
    the sockarray entry; cbpf: listening and the join order)."""
    with launched([*BASE, "--loader", loader]) as instance:
        assert misrouted(instance, loader) == []
        assert attack(instance, loader, how) == ([0, 0, 0] if how == "passed" else [0, 0])
        wait_for(lambda: "membership: repaired" in instance.output(), 10, "the master's repair")
        assert misrouted(instance, loader) == [], instance.output()


@pytest.mark.parametrize("loader", ["native", "cbpf"])
def test_a_slot_whose_socket_is_connected_elsewhere_does_not_stop_the_others(loader: str) -> None:
    """Slot 0's worker takes its socket out of the group through a passed duplicate and connects it
    to a server of its own: it can never listen again. The master says so once, puts back what it
    can, and every client is still served, by the other slots. A kernel that refuses connect() on
    a former listener (EINVAL) leaves the attack a slot that only left: the master puts it back."""
    with launched([*BASE, "--loader", loader]) as instance:
        connects = former_listener_connects()
        assert attack(instance, loader, "hijack") == [0, 0, 0 if connects else errno.EINVAL]
        if not connects:  # the slot only left
            wait_for(lambda: "membership: repaired" in instance.output(), 10, "the master's repair")
            assert misrouted(instance, loader) == [], instance.output()
            return
        wait_for(lambda: "cannot listen again" in instance.output(), 10, "the master's report")
        served = {get(source, instance.port)[0] for source in SOURCES}
        assert served == {1, 2}, instance.output()
        assert instance.output().count("cannot listen again") == 1, instance.output()


HOLD_FD_3 = (
    "import os, socket, time; s = socket.socket(); os.dup2(s.fileno(), 3); print('ready'); time.sleep(60)"
)
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", "--"]


def take(pid: int) -> list[int]:
    """A process of nobody outside any filter tries pidfd_getfd(pid, 3) and ptrace(pid)."""
    out = subprocess.run(
        [*NOBODY, sys.executable, str(APPS / "take_fd.py"), str(pid)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return [int(n) for n in out.stdout.split()]


def test_workers_are_not_dumpable(world_readable_apps: Path) -> None:
    """Another process of the workers' uid cannot take a worker's listener or trace it; the
    control, a dumpable process of the same uid holding a socket on fd 3, gives both away."""
    with subprocess.Popen([*NOBODY, sys.executable, "-u", "-c", HOLD_FD_3], stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
            assert take(holder.pid) == [0, 0]
        finally:
            holder.kill()
    args = ["asgi_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--user", "nobody"]
    with launched(args, cwd=world_readable_apps) as instance:
        for pids in instance.slot_pids().values():
            assert take(pids[0]) == [errno.EPERM, errno.EPERM]


@pytest.mark.parametrize("user", ["default", "root"])
def test_workers_of_another_uid_cannot_join_the_group_nor_signal_the_master(user: str) -> None:
    """A root master's workers run as nobody: the kernel keeps their listener out of the group
    (EADDRINUSE) and signals to the master fail (EPERM). The control: --user root, where both
    work (and under cbpf a later TTIN would send the new slot's clients to the intruder)."""
    args = [*BASE, "--loader", "native", *(["--user", "root"] if user == "root" else [])]
    with launched(args) as instance:
        reached = attack(instance, "native", "keep", path="/reach")
        assert reached == ([errno.EADDRINUSE, errno.EPERM] if user == "default" else [0, 0])
        assert misrouted(instance, "native") == []  # the eBPF program selects from its sockarray only
        if user == "root":  # the master sees the stranger, and says what would keep it out
            wait_for(
                lambda: "1 listener(s) of the master's uid" in instance.output(), 10, "the stranger reported"
            )


def answers(instance: Instance) -> dict[str, list[str]]:
    """What each source's connection hears from the `-- COMMAND` worker it reaches."""
    heard = {}
    for source in SOURCES:
        with socket.create_connection(
            ("127.0.0.1", instance.port), timeout=10, source_address=(source, 0)
        ) as c:
            heard[source] = c.makefile().readline().split()
    return heard


@pytest.mark.parametrize("loader", ["native", "cbpf"])
@pytest.mark.parametrize("how", ["direct", "dup"])
def test_a_command_worker_may_dup_fd_3_and_the_master_repairs(loader: str, how: str) -> None:
    """For a -- COMMAND the filter refuses shutdown/listen on fd 3 itself but not on a duplicate;
    the master's watch puts the group back. Every client ends on its slot either way."""
    args = ["-w", str(SLOTS), "--bind", "127.0.0.1:0", "--hash-key", KEY, "--loader", loader]
    with launched([*args, "--", sys.executable, str(APPS / "unstick_cmd.py"), how]) as instance:
        if how == "dup":
            wait_for(lambda: "membership: repaired" in instance.output(), 10, "the master's repair")
        heard = answers(instance)
        attacker = next(words for words in heard.values() if words[0] == "0")
        assert attacker[1:] == ([str(errno.EPERM), "0"] if how == "direct" else ["0", "0"])
        slot_of = LOADERS[loader].slot_of
        wrong = [s for s, words in heard.items() if int(words[0]) != slot_of(parse_address(s), SPEC, SLOTS)]
        assert wrong == [], instance.output()
