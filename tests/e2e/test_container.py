"""The production image, built and run for real with podman, in the three privilege shapes users run.

Networking: the containers share the host's network namespace (`--network host`) and clients
connect from 127.x sources. That is the path on which the client's own address reaches the
group unchanged, which is what source-address stickiness is about. A published port on podman's
CNI bridge is no such path: from this host's loopback it does not connect at all here ("No route
to host"), and where it does, the CNI portmap plugin masquerades connections from 127/8 (its
CNI-HOSTPORT-SETMARK/MASQ rules), so every client would arrive from the bridge's gateway (the
collapse that `externalTrafficPolicy: Local` prevents on Kubernetes). A routed path from a netns of
our own would need routes into podman's 10.88/16 bridge, outside the addresses tests may use.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.launcher import KEY, Load, Waiting, children, wait_for
from support.launcher import get as launcher_get
from support.netlab import v4_sources

from ebpf_sticky.hashing import HashSpec, parse_address
from ebpf_sticky.kernel.loaders import LOADERS

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/ebpf-sticky-base:bookworm"
# runc: crun fails on this machine's hybrid cgroup layout; runc sets RLIMIT_NPROC, hence both ulimits.
RUNTIME = ["--runtime", "runc"]
RUN = ["podman", "run", *RUNTIME, "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
SLOTS = 3
SOURCES = v4_sources(48, start=5000)
GRACE = 8  # the image's EBPF_STICKY_GRACEFUL_TIMEOUT
STICKY_UID = 10001  # the image's user `sticky`
# CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF
BPF_CAPS = (12, 21, 38, 39)
ONLY_BPF = ["--cap-drop", "ALL", "--cap-add", "BPF", "--cap-add", "NET_ADMIN"]
USER_SWITCH = ["--cap-add", "SETUID", "--cap-add", "SETGID", "--cap-add", "KILL"]
NEEDS_CBPF = pytest.mark.skipif(
    "cbpf" not in LOADERS, reason="needs the classic-BPF router and --loader auto"
)

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None, reason="podman missing: scripts/setup installs it"
)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # No image registry and no PyPI inside the build here: the base is built locally (once, then
    # cached) and the wheels come from the host's pip, mounted into the build.
    subprocess.run(["bash", str(ROOT / "scripts/base-image"), BASE_IMAGE], check=True, timeout=600)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(ROOT), "setuptools>=64"],
        check=True,
        timeout=300,
    )
    tag = f"localhost/ebpf-sticky:test-{uuid.uuid4().hex[:8]}"
    podman(
        "build", *RUNTIME, "--network", "none", "--layers=false", "--format", "docker", "-q", "-t", tag,
        "--build-arg", f"BASE={BASE_IMAGE}",
        "--build-arg", "PIP_OPTIONS=--no-index --find-links /wheels",
        "--build-arg", "COMPILER=",  # no apt here: the image's head search is the Python one
        "-v", f"{wheels}:/wheels:ro",
        str(ROOT),
        timeout=300,
    )  # fmt: skip
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


class Container:
    """One detached container of the image, removed (forcibly if need be) on close."""

    def __init__(self, image: str, options: list[str]) -> None:
        self.name = f"ebpf-sticky-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            [
                *RUN, "-d", "--name", self.name, "--network", "host",
                "-e", "EBPF_STICKY_BIND=127.0.0.1:0", "-e", f"EBPF_STICKY_WORKERS={SLOTS}",
                "-e", f"EBPF_STICKY_HASH_KEY={KEY}",
                *options, image,
            ],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def running(self) -> bool:
        return podman("inspect", "-f", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def wait_serving(self) -> int:
        def serving() -> int | None:
            text = self.logs()
            if not self.running():
                raise AssertionError(f"the container exited:\n{text}")
            match = re.search(r"slots on 127\.0\.0\.1:(\d+) ", text)
            return int(match.group(1)) if match and f"all {SLOTS} slots serving" in text else None

        return int(wait_for(serving, 60, "the container's slots serving"))

    def master(self) -> int:
        """Host pid of the container's PID 1: `ebpf-sticky launch`."""
        return int(podman("inspect", "-f", "{{.State.Pid}}", self.name).stdout)

    def close(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def get(source: str, port: int) -> tuple[str, int, int]:
    """One request to the image's app on a new connection from ``source``: (client it saw, slot, pid)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.status == 200, response.status
        match = re.fullmatch(r"client (\S+) -> worker slot (\d+) \(pid (\d+)\)\n", response.read().decode())
        assert match, "unexpected answer"
        return match.group(1), int(match.group(2)), int(match.group(3))
    finally:
        conn.close()


def slot_mirror(router: str) -> Callable[[str], int]:
    """The Python mirror of the router the container chose."""
    mirror = LOADERS[router].slot_of
    return lambda source: mirror(parse_address(source), HashSpec(bytes.fromhex(KEY)), SLOTS)


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


@pytest.mark.parametrize(
    ("options", "router", "worker_uid"),
    [
        # (a) What a cautious operator writes: the router's capabilities and the user switch's,
        # with the runtime's default seccomp profile (which refuses bpf(2) without CAP_SYS_ADMIN).
        # Workers never stay at the master's uid 0 unless asked (-e EBPF_STICKY_USER=root).
        pytest.param(
            [*ONLY_BPF, *USER_SWITCH],
            "cbpf",
            STICKY_UID,
            id="a-bpf-caps-default-seccomp",
            marks=NEEDS_CBPF,
        ),
        # (b) Nothing asked for: the runtime's default capabilities (no BPF, no NET_ADMIN).
        pytest.param([], "cbpf", STICKY_UID, id="b-runtime-defaults", marks=NEEDS_CBPF),
        # (c) The shipped profile lets CAP_BPF holders call bpf(2). SETUID/SETGID let the master
        # drop workers to the image's user `sticky`, and KILL lets it signal them once they are
        # another user's (without it `podman stop` met EPERM: the master cannot stop its workers).
        pytest.param(
            [
                *ONLY_BPF,
                *USER_SWITCH,
                "--security-opt",
                f"seccomp={ROOT / 'deploy/seccomp/ebpf-sticky.json'}",
            ],
            "native",
            STICKY_UID,
            id="c-bpf-caps-shipped-seccomp",
        ),
    ],
)
def test_image_serves_stickily_and_stops_cleanly(
    image: str, options: list[str], router: str, worker_uid: int
) -> None:
    container = Container(image, options)
    try:
        port = container.wait_serving()
        assert f"({router} loader" in container.logs()

        # Sticky from many addresses, each seen by the app as itself and served by the slot the
        # router's Python mirror predicts, on the same worker every time.
        mirror = slot_mirror(router)
        pids: dict[str, int] = {}
        for _ in range(2):
            for source in SOURCES:
                client, slot, pid = get(source, port)
                assert client == source
                assert slot == mirror(source), source
                assert pids.setdefault(source, pid) == pid, source
        assert len(set(pids.values())) == SLOTS

        # No worker holds a BPF capability, whatever the master was given.
        workers = children(container.master())
        assert len(workers) == SLOTS
        for pid in workers:
            fields = status_fields(pid)
            assert fields["Uid"].split()[0] == str(worker_uid)
            for name in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
                held = int(fields[name], 16)
                assert not [cap for cap in BPF_CAPS if held >> cap & 1], (pid, name, fields[name])

        # `status` through the runtime: the master is PID 1 and counted what was sent.
        status = podman("exec", container.name, "ebpf-sticky", "status")
        assert re.match(
            rf"ebpf-sticky pid 1: tcp 127\.0\.0\.1:{port}, {router} loader, running", status.stdout
        )
        if router == "native":  # per-slot counters are the eBPF program's
            routed = [int(line.split()[-1]) for line in status.stdout.splitlines()[2:]]
            assert sum(routed) == 2 * len(SOURCES), status.stdout
        assert podman("healthcheck", "run", container.name, check=False).returncode == 0

        # PID 1 reaps what is orphaned in the container: here the child of an exec'd shell.
        podman("exec", container.name, "sh", "-c", "sleep 0.5 & exit 0")
        master = container.master()
        orphans = [pid for pid in children(master) if Path(f"/proc/{pid}/comm").read_text() == "sleep\n"]
        assert len(orphans) == 1
        wait_for(lambda: not Path(f"/proc/{orphans[0]}").exists(), 10, "the orphan reaped, not left a zombie")

        # A stop is TERM to PID 1: the workers finish, the master exits 0 within the grace period.
        start = time.monotonic()
        podman("stop", "-t", str(GRACE + 5), container.name)
        assert time.monotonic() - start < GRACE, container.logs()
        exit_code = podman("inspect", "-f", "{{.State.ExitCode}}", container.name).stdout.strip()
        assert exit_code == "0", container.logs()
        assert "SIGTERM: graceful stop" in container.logs()
    finally:
        container.close()


def test_image_exit_status_is_the_launchs(image: str) -> None:
    # The master is PID 1: its exit status is the container's, its one error line the log.
    result = subprocess.run(
        [*RUN, "--rm", "--network", "none", image, "missing.py"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "ebpf-sticky: error: target file 'missing.py' does not exist" in result.stderr


def test_image_user_without_the_capabilities_to_switch_is_one_line(image: str) -> None:
    # The image's default user `sticky` with only the router's capabilities: one line, exit 3,
    # instead of a worker that cannot start and a master that cannot signal it.
    result = subprocess.run(
        [*RUN, "--rm", "--network", "none", *ONLY_BPF, image], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("ebpf-sticky: error:")]
    assert len(errors) == 1, result.stderr
    assert "--user" in errors[0] and "CAP_SETUID" in errors[0], errors[0]
    assert "Traceback" not in result.stderr


# systemd as PID 1 ---------------------------------------------------------------------------------
# The base image has no systemd and no registry is reachable: its packages come from this host's
# apt cache, and the few libraries they link that the minimal base lacks from this (same Debian
# release) host's /lib.
SYSTEMD_DEBS = ("systemd", "libsystemd-shared", "libsystemd0", "systemd-sysv")
SYSTEMD_LIBS = (
    "libapparmor.so.1", "libkmod.so.2", "libfdisk.so.1", "libcryptsetup.so.12", "libip4tc.so.2",
    "libargon2.so.1", "libdevmapper.so.1.02.1", "libjson-c.so.5",
)  # fmt: skip
APT_CACHE = Path("/var/cache/apt/archives")
UNIT = """\
[Service]
Type=notify
ExecStart=/opt/ebpf-sticky/bin/ebpf-sticky launch app.py --workers {slots} --bind 127.0.0.1:{port}
WorkingDirectory=/app
Environment=EBPF_STICKY_USER= XDG_RUNTIME_DIR=/run PYTHONUNBUFFERED=1
FileDescriptorStoreMax=512
Restart=on-failure
RestartSec=1
KillMode=mixed
"""
CONTAINERFILE = """\
FROM {image}
COPY libs/ /usr/lib/x86_64-linux-gnu/
COPY debs/ /tmp/debs/
RUN dpkg -i --force-depends /tmp/debs/*.deb >/dev/null 2>&1; rm -rf /tmp/debs; test -x /lib/systemd/systemd
COPY app.py /app/app.py
COPY ebpf-sticky.service /etc/systemd/system/
RUN ln -s /etc/systemd/system/ebpf-sticky.service /etc/systemd/system/multi-user.target.wants/
ENTRYPOINT ["/lib/systemd/systemd"]
"""


@pytest.fixture(scope="module")
def systemd_image(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    debs = [next(iter(sorted(APT_CACHE.glob(f"{name}_*.deb"))), None) for name in SYSTEMD_DEBS]
    libs = [Path("/lib/x86_64-linux-gnu") / name for name in SYSTEMD_LIBS]
    if None in debs or not all(lib.exists() for lib in libs):
        pytest.skip("no systemd packages in this host's apt cache to put in the image")
    context = tmp_path_factory.mktemp("systemd-image")
    for directory, files in (("debs", debs), ("libs", libs)):
        (context / directory).mkdir()
        for path in files:
            assert path is not None
            shutil.copyfile(path, context / directory / path.name)  # follows the links
    with socket.socket() as probe:  # a free port, baked into the unit
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (context / "ebpf-sticky.service").write_text(UNIT.format(slots=SLOTS, port=port))
    shutil.copyfile(ROOT / "tests/e2e/apps/asgi_app.py", context / "app.py")
    (context / "Containerfile").write_text(CONTAINERFILE.format(image=image))
    tag = f"localhost/ebpf-sticky:systemd-{uuid.uuid4().hex[:8]}"
    podman(
        "build", *RUNTIME, "--network", "none", "--layers=false", "-q", "-t", tag, str(context), timeout=300
    )
    try:
        yield tag, port
    finally:
        podman("rmi", "-f", tag, check=False)


class SystemdContainer:
    def __init__(self, image: str) -> None:
        self.name = f"ebpf-sticky-systemd-{uuid.uuid4().hex[:8]}"
        # --privileged: systemd mounts its cgroups and runs units in namespaces of its own.
        run = [*RUN, "-d", "--name", self.name, "--systemd=always", "--privileged", "--network", "host"]
        subprocess.run([*run, image], capture_output=True, text=True, timeout=60, check=True)

    def exec(self, *argv: str) -> str:
        return podman("exec", self.name, *argv, timeout=60).stdout

    def show(self, prop: str) -> str:
        """A property of the service ("" while systemd is still coming up)."""
        argv = ["exec", self.name, "systemctl", "show", "-p", prop, "--value", "ebpf-sticky"]
        return podman(*argv, check=False).stdout.strip()

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.exec("ebpf-sticky", "status", "--json"))
        return result

    def journal(self) -> str:
        return podman("exec", self.name, "journalctl", "-u", "ebpf-sticky", "--no-pager", check=False).stdout

    def close(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


def test_systemd_as_pid_1_keeps_the_group_through_usr2_and_kill_9(
    systemd_image: tuple[str, int],
) -> None:
    image, port = systemd_image
    container = SystemdContainer(image)
    try:
        stored = 1 + SLOTS + 5  # the key, the slots, the program and its 4 maps
        wait_for(lambda: container.show("NFileDescriptorStore") == str(stored), 60, "the fd store")
        main = container.show("MainPID")
        before = {source: launcher_get(source, port)[0] for source in SOURCES}
        # USR2 under load: the same main pid, every worker new, nothing failed.
        with Load(port, SOURCES, threads=4) as load:
            load.wait_requests(100)
            old = {pid for row in container.status()["slots"] for pid in row["pids"]}
            container.exec("systemctl", "kill", "-s", "USR2", "--kill-who=main", "ebpf-sticky")

            def renewed() -> bool:
                with contextlib.suppress(subprocess.CalledProcessError, ValueError):
                    status = container.status()
                    pids = [row["pids"] for row in status["slots"]]
                    return status["generation"] == 1 and all(len(p) == 1 and p[0] not in old for p in pids)
                return False

            wait_for(renewed, 120, "generation 1")
            load.wait_requests(100)
        assert load.failures == [] and container.show("MainPID") == main
        for source, seen in load.seen.items():
            assert {slot for slot, _ in seen} == {before[source]}
        # kill -9 of the master: systemd restarts it with the stored fds; clients meanwhile wait.
        container.exec("systemctl", "kill", "-s", "KILL", "--kill-who=main", "ebpf-sticky")
        waiting = [Waiting(source, port) for source in SOURCES]
        wait_for(lambda: container.show("NRestarts") == "1", 60, "the restart")
        for client in waiting:
            client.thread.join(90)
        answers = {client.source: client.answer for client in waiting}
        served = sum(isinstance(answer, tuple) for answer in answers.values())
        print(f"systemd: kill -9 with {len(waiting)} clients waiting: {served} served")
        assert all(isinstance(a, tuple) and a[0] == before[s] for s, a in answers.items()), answers
        assert container.show("MainPID") != main
        assert "systemd handed back 3 slot sockets" in container.journal()
    finally:
        container.close()
