"""Instances on the same address and port in different network namespaces, each with its own control
socket: `status` and `route` run inside a namespace answer for that namespace's instance."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from support.launcher import APPS, KEY, get

from ebpf_sticky.hashing import HashSpec, parse_address, slot_of
from lab.multihost import Lab, Service, Topology

SERVICE = Service(hosts=("one", "two"), bind_host="127.0.0.1", port=8000)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"sticky-{uuid.uuid4().hex[:6]}", Topology(nodes=(*SERVICE.hosts, "empty")), SERVICE)
    try:
        lab.build()
        lab.start_hosts(APPS / "asgi_app.py", workers=2, launch_args=["--hash-key", KEY])
        lab.wait_running()
        yield lab
    finally:
        lab.down()


def cli(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = lab.exec_argv(node, [sys.executable, "-m", "ebpf_sticky", *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_both_serve_on_one_address_and_port(lab: Lab) -> None:
    for host in SERVICE.hosts:
        _, pid, _ = lab.run_in(host, lambda: get("127.0.0.1", SERVICE.port))
        assert pid in [p for row in lab.status(host)["slots"] for p in row["pids"]], host
    # One directory, two sockets whose names differ only by the namespace.
    controls = {lab.control(host) for host in SERVICE.hosts}
    assert len(controls) == 2 and all(path.is_socket() for path in controls)


def test_status_and_route_find_their_namespace_instance(lab: Lab) -> None:
    for host in SERVICE.hosts:
        status = cli(lab, host, "status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.startswith(f"ebpf-sticky pid {lab.masters[host].pid}: tcp 127.0.0.1:8000"), host
        route = cli(lab, host, "route", "10.1.2.3")
        assert route.returncode == 0, route.stderr
        slot = slot_of(parse_address("10.1.2.3"), HashSpec(bytes.fromhex(KEY)), 2)
        pids = next(row["pids"] for row in lab.status(host)["slots"] if row["slot"] == slot)
        assert route.stdout == f"router: native\n10.1.2.3 {slot} pid={','.join(map(str, pids))}\n", host


def test_a_namespace_without_an_instance_finds_none(lab: Lab) -> None:
    proc = cli(lab, "empty", "status")
    assert proc.returncode == 2
    error = "ebpf-sticky: error: no running ebpf-sticky instance in this network namespace found in /run/"
    assert proc.stderr.startswith(error)


def test_another_user_in_the_namespace_can_neither_reach_nor_take_the_socket(lab: Lab) -> None:
    # What an abstract socket would allow: any user of the namespace connecting, or binding the
    # name before the master does. The path sits in a root-only directory: both are refused.
    path = lab.control("one")
    probe = (
        "import errno, socket, sys\n"
        "for verb in ('connect', 'bind'):\n"
        "    try:\n"
        "        getattr(socket.socket(socket.AF_UNIX), verb)(sys.argv[1])\n"
        "        print(verb, 'ok')\n"
        "    except OSError as exc:\n"
        "        print(verb, errno.errorcode[exc.errno])\n"
    )
    nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    proc = subprocess.run(
        lab.exec_argv("one", [*nobody, sys.executable, "-c", probe, str(path)]),
        capture_output=True,
        text=True,
    )
    assert proc.stdout == "connect EACCES\nbind EACCES\n", proc.stderr
    # Negative control: root reaches it.
    proc = subprocess.run(
        lab.exec_argv("one", [sys.executable, "-c", probe, str(path)]), capture_output=True, text=True
    )
    assert proc.stdout == "connect ok\nbind EADDRINUSE\n", proc.stderr
