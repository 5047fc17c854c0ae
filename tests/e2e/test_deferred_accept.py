"""The slot sockets of an app defer accepting until the client has spoken (TCP_DEFER_ACCEPT, as
nginx's `deferred`): the options are where they should be, and no client is lost or stuck to it —
not a silent one, not one that leaves without a word, not a TLS one (which speaks first too)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest
import trustme
from support.launcher import KEY, Instance, get, launched, wait_for, worker_readable_dir

from ebpf_sticky.contract import LISTEN_FD
from ebpf_sticky.kernel.router import DEFER_ACCEPT_S
from ebpf_sticky.kernel.syscalls import borrow_socket

BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "5", "--no-access-log"]
# The kernel queues a still-silent connection once the client acknowledges the SYN-ACK retransmitted
# after DEFER_ACCEPT_S (the retransmission timer doubles: 1 s, then 3 s...). Ample on a loaded machine.
QUEUED_WITHIN = 30.0


def deferral(instance: Instance) -> list[int]:
    """TCP_DEFER_ACCEPT of every worker's slot socket, read back from the kernel."""
    values = []
    for pids in instance.slot_pids().values():
        with borrow_socket(pids[0], LISTEN_FD) as sock:
            values.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT))
    return values


def server_states(port: int, client_port: int) -> list[str]:
    """The server side of one connection as `ss` sees it: SYN-RECV while deferred, ESTAB once queued."""
    done = subprocess.run(
        ["ss", "-Htna", f"sport = :{port} and dport = :{client_port}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.split()[0] for line in done.stdout.splitlines()]


def accept_queues(port: int) -> list[int]:
    """Recv-Q of each listening socket on the port: connections queued and not yet accepted."""
    done = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return [int(line.split()[1]) for line in done.stdout.splitlines()]


@contextlib.contextmanager
def silent_client(port: int) -> Iterator[socket.socket]:
    """A connection whose handshake is done and which has sent nothing yet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        yield sock


def seen_deferred(port: int) -> socket.socket:
    """A silent connection whose server side `ss` saw in SYN-RECV. A reading that took longer
    than the deferral proves nothing on a loaded machine (the kernel may have queued it by
    then), so the connection is retried rather than the assertion weakened."""
    for _ in range(5):
        began = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        states = server_states(port, sock.getsockname()[1])
        if time.monotonic() - began < DEFER_ACCEPT_S:
            assert states == ["SYN-RECV"], states
            return sock
        sock.close()
    raise AssertionError(f"could not read a connection's state within {DEFER_ACCEPT_S} s in 5 tries")


def served(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def app() -> Iterator[Instance]:
    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        yield instance


def test_an_apps_slot_sockets_defer_accept_and_a_commands_do_not(app: Instance) -> None:
    assert deferral(app) == [DEFER_ACCEPT_S, DEFER_ACCEPT_S]
    # A `-- COMMAND` may speak first (SMTP, a database): deferring would stall its every client.
    with launched(["-w", "2", *BASE[:-1], "--", "sleep", "60"]) as command:
        assert deferral(command) == [0, 0]


def test_a_silent_client_is_queued_after_the_deferral_and_then_served(app: Instance) -> None:
    # Deferred: the handshake is done on the client's side, the server still waits for data.
    with seen_deferred(app.port) as sock:
        client_port = sock.getsockname()[1]
        # Silent past the deferral: the kernel queues it anyway and a worker accepts it ...
        wait_for(lambda: server_states(app.port, client_port) == ["ESTAB"], QUEUED_WITHIN, "queued")
        wait_for(lambda: accept_queues(app.port) == [0, 0], QUEUED_WITHIN, "accepted")
        # ... and it is served as any other once it speaks.
        response = served(sock)
    assert response.startswith(b"HTTP/1.1 200 "), response


@pytest.mark.parametrize("past_deferral", [False, True], ids=["within", "past"])
def test_a_client_that_leaves_without_a_word_leaves_nothing_behind(
    app: Instance, past_deferral: bool
) -> None:
    with silent_client(app.port) as sock:
        client_port = sock.getsockname()[1]
        if past_deferral:
            wait_for(lambda: server_states(app.port, client_port) == ["ESTAB"], QUEUED_WITHIN, "queued")
    # Its FIN counts as data: the connection is queued, accepted, read to EOF and closed by the
    # worker, not kept in SYN-RECV or CLOSE-WAIT.
    wait_for(
        lambda: not {"SYN-RECV", "ESTAB", "CLOSE-WAIT"} & set(server_states(app.port, client_port)),
        QUEUED_WITHIN,
        f"the server side of :{client_port} gone",
    )


def test_tls_clients_speak_first_and_are_served() -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with worker_readable_dir() as directory:  # the workers load the key
        cert, key = directory / "cert.pem", directory / "key.pem"
        issued.private_key_pem.write_to_path(str(key))
        for blob in issued.cert_chain_pems:
            blob.write_to_path(str(cert), append=True)
        for path in (cert, key):
            os.chown(path, 0, directory.stat().st_gid)
            path.chmod(0o640)
        args = ["asgi_app.py", "-w", "2", *BASE, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        with launched(args) as instance:
            assert deferral(instance) == [DEFER_ACCEPT_S, DEFER_ACCEPT_S]
            for source in ("127.0.9.1", "127.0.9.2", "127.0.9.3"):
                assert get(source, instance.port, tls=context)[0] in (0, 1)
            # A TLS client that waits past the deferral before its ClientHello is served too.
            with silent_client(instance.port) as raw:
                client_port = raw.getsockname()[1]
                wait_for(
                    lambda: server_states(instance.port, client_port) == ["ESTAB"], QUEUED_WITHIN, "queued"
                )
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    response = served(tls)
            assert response.startswith(b"HTTP/1.1 200 "), response
