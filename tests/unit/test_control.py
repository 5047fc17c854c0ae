"""Control sockets are named per network namespace: each namespace finds only its own instances."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebpf_sticky.control import current_netns, find_instance, socket_name
from ebpf_sticky.errors import ControlError

HERE, THERE = 4026531840, 4026532999  # two namespaces' inodes


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[dict[tuple[int, int], Path]]:
    """Live control sockets: (netns, port) → path; the same address and port in both namespaces."""
    paths: dict[tuple[int, int], Path] = {}
    sockets: list[socket.socket] = []
    for netns, port in ((HERE, 8000), (THERE, 8000), (THERE, 9000)):
        path = tmp_path / socket_name("0.0.0.0", port, netns)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen()
        paths[netns, port] = path
        sockets.append(sock)
    yield paths
    for sock in sockets:
        sock.close()


def test_the_name_carries_the_namespace() -> None:
    assert socket_name("0.0.0.0", 8000, HERE) != socket_name("0.0.0.0", 8000, THERE)
    assert socket_name("::1", 8000, HERE) == f"net{HERE}-__1-8000.sock"
    assert socket_name("127.0.0.1", 8000) == socket_name("127.0.0.1", 8000, current_netns())


def test_each_namespace_finds_its_own(listening: dict[tuple[int, int], Path], tmp_path: Path) -> None:
    assert find_instance(tmp_path, None, HERE) == listening[HERE, 8000]
    assert find_instance(tmp_path, 8000, THERE) == listening[THERE, 8000]


def test_several_in_one_namespace_need_a_port(listening: dict[tuple[int, int], Path], tmp_path: Path) -> None:
    with pytest.raises(
        ControlError, match=r"several instances are running \(0\.0\.0\.0-8000, 0\.0\.0\.0-9000\)"
    ):
        find_instance(tmp_path, None, THERE)


def test_another_namespace_s_instance_is_not_found(
    listening: dict[tuple[int, int], Path], tmp_path: Path
) -> None:
    with pytest.raises(
        ControlError, match="no running ebpf-sticky instance on port 9000 in this network namespace"
    ):
        find_instance(tmp_path, 9000, HERE)
    with pytest.raises(ControlError, match="no running ebpf-sticky instance in this network namespace"):
        find_instance(tmp_path, None, 1)
