"""uvicorn's options on `ebpf-sticky launch`: TLS in every worker with real clients from many
addresses, recycling by --limit-max-requests, --reload, --backlog and the per-worker options."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.launcher import (
    APPS,
    KEY,
    Instance,
    Load,
    default_worker,
    get,
    launched,
    predicted,
    run_bad,
    tagged_processes,
    wait_for,
)
from support.netlab import v4_sources
from support.sio_clients import CHROMIUM, CHROMIUM_ARGS, node_swarm, python_swarm

from ebpf_sticky.contract import OPTIONS_FDNAME

SOURCES = v4_sources(48, start=3000)
BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "10", "--no-access-log"]
CHAT = Path(__file__).parents[2] / "examples" / "socketio_chat" / "app.py"


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path
    encrypted_key: Path
    other_key: Path  # a key that belongs to no certificate here
    spki: str  # base64 SHA-256 of the server key: what Chromium is told to trust

    def args(self) -> list[str]:
        return ["--ssl-certfile", str(self.cert), "--ssl-keyfile", str(self.key)]

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def tls() -> Iterator[Tls]:
    # Readable by the workers (the default user's group), which load the key, and by no one else.
    directory = Path(tempfile.mkdtemp(prefix="ebpf-sticky-tls-"))
    try:
        yield _issue(directory)
    finally:
        shutil.rmtree(directory)


def _issue(directory: Path) -> Tls:
    os.chown(directory, 0, default_worker().pw_gid)
    directory.chmod(0o750)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key", "encrypted", "other")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    issued.private_key_pem.write_to_path(str(paths["key"]))
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(paths["cert"]), append=True)
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    paths["encrypted"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(paths["other"]))
    spki = (
        x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for path in paths.values():
        os.chown(path, 0, default_worker().pw_gid)
        path.chmod(0o640)
    return Tls(paths["ca"], paths["cert"], paths["key"], paths["encrypted"], paths["other"],
               base64.b64encode(hashlib.sha256(spki).digest()).decode())  # fmt: skip


# TLS ---------------------------------------------------------------------------------------------
def test_https_from_many_addresses_is_sticky(tls: Tls) -> None:
    with launched(["asgi_app.py", "-w", "3", *BASE, *tls.args()]) as instance:
        port = instance.port
        pids: dict[str, int] = {}
        for _ in range(2):
            for source in SOURCES:
                slot, pid, _ = get(source, port, tls=tls.client())
                assert slot == predicted(source, 3), source
                assert pids.setdefault(source, pid) == pid, source
        assert len(set(pids.values())) == 3
        for source in SOURCES[:6]:  # curl, trusting only the test CA
            out = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(tls.ca), "--interface", source,
                 f"https://127.0.0.1:{port}/"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.split()[:2] == [str(predicted(source, 3)), str(pids[source])]
        handshake = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(tls.ca),
             "-verify_return_error", "-brief"],
            input="", capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert handshake.returncode == 0, handshake.stderr
        assert "Verification: OK" in handshake.stderr and "TLSv1.3" in handshake.stderr
        # Negative controls: the port speaks only TLS, and only the test CA vouches for it.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/")
            plain.getresponse()
        plain.close()
        untrusted = subprocess.run(
            ["curl", "-sS", f"https://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=30
        )
        assert untrusted.returncode == 60, untrusted.stderr  # CURLE_PEER_FAILED_VERIFICATION


@pytest.mark.parametrize("given", ["flag", "environment", "file"])
def test_secrets_never_reach_a_worker(tls: Tls, tmp_path: Path, given: str) -> None:
    """The key's password (however given) and the hash key (from the environment) are in no
    worker's environment, argv or fds; given as a file or a variable, not in the master's argv."""
    args = ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.encrypted_key)]
    env = {"EBPF_STICKY_HASH_KEY": KEY}
    if given == "flag":
        args += ["--ssl-keyfile-password", "s3cret"]
    elif given == "environment":
        env["EBPF_STICKY_SSL_KEYFILE_PASSWORD"] = "s3cret"
    else:
        (tmp_path / "password").write_text("s3cret\n")
        args += ["--ssl-keyfile-password-file", str(tmp_path / "password")]
    with launched(["asgi_app.py", "-w", "2", *BASE[:2], *args], extra_env=env) as instance:
        assert get(SOURCES[0], instance.port, tls=tls.client())[0] == predicted(SOURCES[0], 2)
        for pids in instance.slot_pids().values():
            for what in ("environ", "cmdline"):
                seen = Path(f"/proc/{pids[0]}/{what}").read_bytes()
                assert b"s3cret" not in seen and KEY.encode() not in seen, what
            links = [str(fd.readlink()) for fd in Path(f"/proc/{pids[0]}/fd").iterdir()]
            assert not [link for link in links if OPTIONS_FDNAME in link]  # read once, closed
        master_argv = Path(f"/proc/{instance.proc.pid}/cmdline").read_bytes()
        assert (b"s3cret" in master_argv) == (given == "flag")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "--ssl-certfile '/nonexistent/cert.pem': no such file"),
        ("mismatch", "is not the key of --ssl-certfile"),
        ("no-password", "is encrypted: give its --ssl-keyfile-password"),
        ("wrong-password", "--ssl-keyfile-password does not decrypt"),
        ("key-as-cert", "no PEM certificate in it"),
        ("key-without-cert", "--ssl-keyfile needs --ssl-certfile too"),
        ("bad-ciphers", "--ssl-ciphers 'NO-SUCH-CIPHER': OpenSSL knows no cipher by it"),
        ("tls-for-a-command", "apply to a Python TARGET"),
    ],
)
def test_bad_tls_input_is_one_line_before_any_worker(tls: Tls, kind: str, expected: str) -> None:
    cert, key, enc = str(tls.cert), str(tls.key), str(tls.encrypted_key)
    args = {
        "missing": ["--ssl-certfile", "/nonexistent/cert.pem", "--ssl-keyfile", key],
        "mismatch": ["--ssl-certfile", cert, "--ssl-keyfile", str(tls.other_key)],
        "no-password": ["--ssl-certfile", cert, "--ssl-keyfile", enc],
        "wrong-password": ["--ssl-certfile", cert, "--ssl-keyfile", enc, "--ssl-keyfile-password", "nope"],
        "key-as-cert": ["--ssl-certfile", key],
        "key-without-cert": ["--ssl-keyfile", key],
        "bad-ciphers": [*tls.args(), "--ssl-ciphers", "NO-SUCH-CIPHER"],
        "tls-for-a-command": [*tls.args(), "--", "sleep", "60"],
    }[kind]
    target = [] if "--" in args else ["asgi_app.py"]
    output = run_bad([*target, "-w", "2", "--bind", "127.0.0.1:0", *args], expected)
    assert "worker" not in output  # rejected before any worker started
    assert re.search(r"exited with|error: .*\n.*error:", output) is None


def test_workers_read_the_key_as_their_user(tls: Tls) -> None:
    # The master (root) reads the key; workers dropped to nobody cannot: say so, once, and stop
    # before starting any.
    directory = Path(tempfile.mkdtemp(prefix="ebpf-sticky-tls-"))
    try:
        directory.chmod(0o755)
        shutil.copy(APPS / "asgi_app.py", directory)
        (directory / "asgi_app.py").chmod(0o644)
        cert, key = directory / "cert.pem", directory / "key.pem"
        shutil.copy(tls.cert, cert)
        shutil.copy(tls.key, key)
        cert.chmod(0o644)
        key.chmod(0o600)
        args = ["asgi_app.py", "-w", "2", "--bind", "127.0.0.1:0", "--user", "nobody",
                "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]  # fmt: skip
        instance = Instance(args, cwd=directory)
        try:
            assert instance.finish() == 2  # said by the master, before any worker starts
            assert f"workers run as nobody (uid 65534) and cannot read {key}: make it" in instance.output()
            assert "worker" not in instance.output().replace("workers run as", "")
            assert tagged_processes(instance.tag) == []
        finally:
            instance.close()
        key.chmod(0o644)  # readable: the unprivileged workers terminate TLS
        with launched(args[:-4] + ["--hash-key", KEY, *args[-4:]], cwd=directory) as instance:
            slot, _, uid = get(SOURCES[0], instance.port, tls=tls.client())
            assert (slot, uid) == (predicted(SOURCES[0], 2), 65534)
    finally:
        shutil.rmtree(directory)


@pytest.fixture(scope="module")
def chat_https(tls: Tls) -> Iterator[str]:
    args = [str(CHAT), "-w", "4", *BASE, "--graceful-timeout", "5", *tls.args()]
    with launched(args) as instance:
        yield f"https://127.0.0.1:{instance.port}"


@pytest.mark.parametrize("swarm", ["python-socketio", "node-socket.io-client"])
def test_socketio_over_https_keeps_every_session(chat_https: str, tls: Tls, swarm: str) -> None:
    sources = v4_sources(60, start=3500)
    if swarm == "python-socketio":
        result = python_swarm(chat_https, sources, ["polling", "websocket"], tls=tls.client())
    else:
        result = node_swarm(chat_https, sources, ["polling", "websocket"], ca_file=str(tls.ca))
    assert (result.ok, result.failed) == (len(sources), 0), result.errors[:5]
    assert set(result.workers.values()) == {"0", "1", "2", "3"}
    for source, worker in result.workers.items():
        assert int(worker) == predicted(source, 4)


def test_chromium_loads_the_https_page_and_upgrades_to_wss(chat_https: str, tls: Tls) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        untrusting = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:  # negative control: the test CA is no CA of Chromium's
            with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
                untrusting.new_page().goto(chat_https + "/")
        finally:
            untrusting.close()
        # Trust exactly the test server's key (no blanket "ignore certificate errors").
        trust = f"--ignore-certificate-errors-spki-list={tls.spki}"
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, trust])
        try:
            page = browser.new_page()
            page.goto(chat_https + "/")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('joined')")
            assert page.text_content("#status") == f"joined lobby on worker {predicted('127.0.0.1', 4)}"
            page.wait_for_function("socket.io.engine.transport.name === 'websocket'")
            assert page.evaluate("location.protocol") == "https:"
        finally:
            browser.close()


# Recycling, reload, backlog ----------------------------------------------------------------------
def test_limit_max_requests_recycles_under_load_without_a_failure() -> None:
    limits = ["--limit-max-requests", "150", "--limit-max-requests-jitter", "50"]
    with launched(["asgi_app.py", "-w", "2", *BASE, *limits]) as instance:
        first = instance.slot_pids()

        def recycled(slot: int) -> int:
            pattern = rf"slot {slot}: worker \d+ reached --limit-max-requests"
            return len(re.findall(pattern, instance.output()))

        with Load(instance.port, SOURCES, threads=4) as load:
            wait_for(lambda: recycled(0) >= 2 and recycled(1) >= 2, 120, "two recycles of each slot")
            load.wait_requests(40)

        def settled() -> bool:
            now = instance.slot_pids()
            return all(len(now[slot]) == 1 and now[slot] != first[slot] for slot in first)

        wait_for(settled, 60, "one new worker per slot")
        print(f"recycling: {load.requests} requests, {len(load.failures)} failed")
        assert load.failures == []
        for source, answers in load.seen.items():
            assert {slot for slot, _ in answers} == {predicted(source, 2)}, source
        pids_seen = {slot: {pid for answers in load.seen.values() for s, pid in answers if s == slot}
                     for slot in (0, 1)}  # fmt: skip
        assert all(len(pids) >= 2 for pids in pids_seen.values()), pids_seen
        # Every worker left because it was asked to: no crash, no kill, no respawn.
        assert re.search(r"killed by signal|exited with|ignored TERM", instance.output()) is None


def test_reload_picks_up_an_edit_and_keeps_clients_on_their_slot(world_readable_apps: Path) -> None:
    tmp_path = world_readable_apps  # the workers (nobody) import the app from there
    app = tmp_path / "app.py"
    template = (APPS / "asgi_app.py").read_text().replace('{os.getuid()}\\n"', '{os.getuid()} VERSION\\n"')
    app.write_text(template.replace("VERSION", "v1"))

    def answers() -> dict[str, tuple[int, str]]:
        out = {}
        for source in SOURCES[:16]:
            conn = http.client.HTTPConnection(
                "127.0.0.1", instance.port, timeout=10, source_address=(source, 0)
            )
            conn.request("GET", "/")
            slot, _, _, version = conn.getresponse().read().split()
            conn.close()
            out[source] = (int(slot), version.decode())
        return out

    with launched(["app.py", "-w", "2", *BASE, "--reload"], cwd=tmp_path) as instance:
        before = answers()
        assert {v for _, v in before.values()} == {"v1"}
        (tmp_path / "notes.txt").write_text("not a .py file: no reload")
        app.write_text(template.replace("VERSION", "v2"))
        wait_for(lambda: {v for _, v in answers().values()} == {"v2"}, 60, "the edit to be served")
        after = answers()
        assert {s: slot for s, (slot, _) in after.items()} == {s: slot for s, (slot, _) in before.items()}
        assert all(slot == predicted(s, 2) for s, (slot, _) in after.items())
        assert "notes.txt" not in instance.output()
        assert "change detected" not in instance.output()  # watchfiles' own chatter stays quiet


def listen_backlogs(port: int) -> list[int]:
    """Send-Q of each listening socket on the port: its listen() backlog."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return sorted(int(line.split()[2]) for line in out.stdout.splitlines())


def test_backlog_reaches_every_slot_socket() -> None:
    with launched(["asgi_app.py", "-w", "3", *BASE, "--backlog", "77"]) as instance:
        assert listen_backlogs(instance.port) == [77, 77, 77]
    # A -- COMMAND worker never calls listen(): the master's listen() alone sets it.
    with launched(["-w", "2", *BASE[:-1], "--backlog", "33", "--", "sleep", "60"]) as instance:
        assert listen_backlogs(instance.port) == [33, 33]


# The other per-worker options --------------------------------------------------------------------
def test_per_worker_options_reach_uvicorn(world_readable_apps: Path) -> None:
    env_file = world_readable_apps / "app.env"  # the workers (nobody) read it
    env_file.write_text("GREETING=hello from the env file\n")
    args = [
        "optapp:app", "-w", "2", *BASE[:-1], "--app-dir", "appdir", "--env-file", str(env_file),
        "--root-path", "/api", "--header", "X-Served-By: ebpf-sticky", "--no-server-header",
        "--loop", "asyncio", "--http", "h11", "--access-log",
    ]  # fmt: skip
    with launched(args) as instance:
        conn = http.client.HTTPConnection(
            "127.0.0.1", instance.port, timeout=10, source_address=(SOURCES[0], 0)
        )
        conn.request("GET", "/")
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert body == {"slot": str(predicted(SOURCES[0], 2)), "greeting": "hello from the env file",
                        "root_path": "/api", "master_settings_in_env": [],
                        "options_fd_open": False}  # fmt: skip
        assert response.getheader("x-served-by") == "ebpf-sticky"
        assert response.getheader("server") is None
        wait_for(lambda: f"{SOURCES[0]}:" in instance.output(), 10, "the access log line")
        assert re.search(r'"GET \S+ HTTP/1.1" 200', instance.output())
