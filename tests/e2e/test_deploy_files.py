"""The files users copy from deploy/: Kubernetes manifests against the Kubernetes schemas (offline),
the systemd unit through systemd-analyze and a launch under its user and capabilities (setpriv),
the seccomp profile against the runtime's default it is derived from."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from support.launcher import Instance, children, wait_for

from ebpf_sticky.config import DEFAULT_WORKER_USERS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
UNIT = DEPLOY / "systemd" / "ebpf-sticky.service"
RUNTIME_DEFAULT_SECCOMP = Path("/usr/share/containers/seccomp.json")
# The Kubernetes release the schemas are checked against: the oldest still supported upstream.
KUBERNETES = "1.32.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str, name: str) -> dict[str, Any]:
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in {MANIFESTS}")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


# Kubernetes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_manifest_valid_against_kubernetes_schemas(path: Path) -> None:
    assert path.read_text().startswith("# "), "each file starts with a comment saying what it is for"
    for doc in documents(path):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_schema_check_rejects_a_misspelt_field() -> None:
    # Negative control: the validator is not vacuous.
    service = by_kind("Service", "ebpf-sticky")
    service["spec"]["externalTraficPolicy"] = service["spec"].pop("externalTrafficPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="externalTraficPolicy"):
        kubernetes_validate.validate(service, KUBERNETES, strict=True)


def test_manifests_agree_with_each_other() -> None:
    deployment = by_kind("Deployment", "ebpf-sticky")
    pod = deployment["spec"]["template"]["spec"]
    (app,) = pod["containers"]
    env = env_of(app)

    # The pod gets its graceful stop: preStop, then the workers' graceful timeout, then exit.
    pre_stop = int(app["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["EBPF_STICKY_GRACEFUL_TIMEOUT"])

    # Least privilege: everything dropped, only what the native router and the user switch need.
    security = app["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) <= {"BPF", "SETUID", "SETGID", "KILL"}
    assert security["allowPrivilegeEscalation"] is False
    assert env["EBPF_STICKY_LOADER"] == "native"
    assert security["seccompProfile"] == {"type": "Localhost", "localhostProfile": "ebpf-sticky.json"}
    assert (DEPLOY / "seccomp" / security["seccompProfile"]["localhostProfile"]).is_file()

    # The Service keeps client addresses (no SNAT) and pins clients to pods.
    service = by_kind("Service", "ebpf-sticky")
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    ports = {port["name"]: port["containerPort"] for port in app["ports"]}
    assert env["EBPF_STICKY_BIND"].endswith(f":{ports['http']}")
    assert env["EBPF_STICKY_METRICS"].endswith(f":{ports['metrics']}")

    # REDIS_URL names the Redis Service and its port.
    redis = by_kind("Service", "ebpf-sticky-redis")
    assert env["REDIS_URL"] == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"


# seccomp ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not RUNTIME_DEFAULT_SECCOMP.exists(), reason="containers-common missing: scripts/setup")
def test_seccomp_profile_is_the_runtime_default_plus_bpf_for_cap_bpf() -> None:
    derived = subprocess.run(
        [sys.executable, str(DEPLOY / "seccomp" / "derive.py")],
        input=RUNTIME_DEFAULT_SECCOMP.read_text(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(derived) == json.loads((DEPLOY / "seccomp" / "ebpf-sticky.json").read_text())
    # What changed: bpf(2) is allowed with CAP_BPF, still refused without it or CAP_SYS_ADMIN.
    rules = [rule for rule in json.loads(derived)["syscalls"] if "bpf" in rule["names"]]
    allowed = [rule["includes"].get("caps") for rule in rules if rule["action"] == "SCMP_ACT_ALLOW"]
    refused = [rule["excludes"].get("caps") for rule in rules if rule["action"] != "SCMP_ACT_ALLOW"]
    assert sorted(allowed) == [["CAP_BPF"], ["CAP_SYS_ADMIN"]]
    assert refused == [["CAP_SYS_ADMIN", "CAP_BPF"]]


# systemd ---------------------------------------------------------------------------------------
def unit_settings() -> dict[str, list[str]]:
    """The [Service] section of the unit: each key with its values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def installed_unit(directory: Path, text: str) -> Path:
    # The unit names /opt/ebpf-sticky/venv (scripts/setup's default); point it at the venv under test.
    path = directory / UNIT.name
    path.write_text(text.replace("/opt/ebpf-sticky/venv/", f"{sys.prefix}/"))
    return path


def verify(unit: Path) -> str:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    return f"{result.returncode}\n{result.stdout}{result.stderr}".strip()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    assert UNIT.read_text().startswith("# ")
    assert verify(installed_unit(tmp_path, UNIT.read_text())) == "0"


def test_systemd_verify_reports_a_misspelt_option(tmp_path: Path) -> None:
    # Negative control: systemd-analyze exits 0 on an option it ignores; its words are the verdict.
    text = UNIT.read_text().replace("Type=notify", "Type=notfy")
    assert "Failed to parse service type" in verify(installed_unit(tmp_path, text))


def test_systemd_timeouts_match_the_graceful_timeout() -> None:
    unit = unit_settings()
    env = dict(item.split("=", 1) for item in unit["Environment"])
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # TERM to the master only; the cgroup is killed only after the master had its graceful timeout.
    assert unit["KillMode"] == ["mixed"]
    assert int(unit["TimeoutStopSec"][0]) > float(env["EBPF_STICKY_GRACEFUL_TIMEOUT"])
    assert unit["NoNewPrivileges"] == ["yes"]
    assert (
        unit["AmbientCapabilities"]
        == unit["CapabilityBoundingSet"]
        == ["CAP_BPF CAP_SETUID CAP_SETGID CAP_KILL"]
    )


def capabilities(pid: int, field: str) -> set[int]:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+([0-9a-f]+)$", text, re.MULTILINE)
    assert match, text
    value = int(match.group(1), 16)
    return {bit for bit in range(64) if value >> bit & 1}


def unit_env() -> dict[str, str]:
    """The unit's Environment= lines as variables."""
    return dict(item.split("=", 1) for item in unit_settings()["Environment"])


CAP_KILL, CAP_SETGID, CAP_SETUID, CAP_NET_ADMIN, CAP_BPF = 5, 6, 7, 12, 39


@contextlib.contextmanager
def unit_user(name: str) -> Iterator[pwd.struct_passwd]:
    """The unit's User=, or one made for the test (and always removed after) if the machine lacks
    it. A default worker user's name is not made: while an ebpf-sticky user exists, every root
    master on the machine runs its workers as it. A user of the test's own stands in for it."""
    try:
        yield pwd.getpwnam(name)
        return
    except KeyError:
        pass
    if name in DEFAULT_WORKER_USERS:
        name = f"{name}-t{os.getpid()}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
    )
    entry = pwd.getpwnam(name)
    try:
        yield entry
    finally:
        try:
            kill_processes_of(entry.pw_uid)  # userdel refuses a user with processes (exit 8)
        finally:
            subprocess.run(["userdel", "--force", name], check=True)


def kill_processes_of(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (a user made for this test: its processes
    are the test's), and wait until none is left."""

    def running() -> list[int]:
        pids = []
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                if re.search(rf"^Uid:\s+{uid}\s", status.read_text(), re.MULTILINE):
                    pids.append(int(status.parent.name))
        return pids

    for pid in running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not running(), 30, f"the processes of uid {uid} to end")


@contextlib.contextmanager
def launched_as_unit() -> Iterator[tuple[Instance, socket.socket]]:
    """ExecStart run as systemd would: the unit's user, ambient capabilities, bounding set,
    no_new_privs, environment and working directory (a copy of the test app), NOTIFY_SOCKET."""
    unit = unit_settings()
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in unit["AmbientCapabilities"][0].split())
    binary, *args = unit["ExecStart"][0].split()
    env = unit_env()
    with (
        unit_user(unit["User"][0]) as entry,
        unit_user(env["EBPF_STICKY_USER"]),
        tempfile.TemporaryDirectory(prefix="ebpf-sticky-unit-") as tmp,
    ):
        workdir = Path(tmp)
        workdir.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        shutil.copy(ROOT / "tests/e2e/apps/asgi_app.py", workdir / "app.py")
        # RuntimeDirectory=: a directory of the user's, mode 0700 (here under the test's tmp, not /run).
        runtime = workdir / "run"
        (runtime / "ebpf-sticky").mkdir(parents=True, mode=0o700)
        for path in (runtime, runtime / "ebpf-sticky"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"\0ebpf-sticky-unit-test-{os.getpid()}")
        notify.settimeout(30)
        env.update(
            EBPF_STICKY_BIND="127.0.0.1:0",
            EBPF_STICKY_METRICS="127.0.0.1:0",
            EBPF_STICKY_WORKERS="2",
            EBPF_STICKY_GRACEFUL_TIMEOUT="5",
            XDG_RUNTIME_DIR=str(runtime),
            NOTIFY_SOCKET=f"@ebpf-sticky-unit-test-{os.getpid()}",
        )
        setpriv = [
            "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set=-all,{caps}",
            "--no-new-privs", "--",
        ]  # fmt: skip
        argv = [binary.replace("/opt/ebpf-sticky/venv/", f"{sys.prefix}/"), *args]
        instance = Instance([], cwd=workdir, extra_env=env, prefix=setpriv, argv=argv)
        try:
            instance.wait_serving()
            yield instance, notify
        finally:
            instance.close()
            notify.close()


def test_systemd_launch_under_the_units_user_and_capabilities() -> None:
    from support.launcher import get

    with launched_as_unit() as (instance, notify):
        master = instance.proc.pid
        # The unit's bounding set, and the native router (CAP_BPF alone loads it).
        assert capabilities(master, "CapBnd") == {CAP_BPF, CAP_SETUID, CAP_SETGID, CAP_KILL}
        # Workers at a uid of their own, not the master's.
        app_uid = pwd.getpwnam(unit_env()["EBPF_STICKY_USER"]).pw_uid
        assert {os.stat(f"/proc/{pid}").st_uid for pid in children(master)} == {app_uid}
        assert "(native loader" in instance.output()
        # Type=notify: READY=1 from the main pid once every slot serves (after FDSTORE=1 messages:
        # FileDescriptorStoreMax=).
        messages = [notify.recv(4096).split(b"\n")]
        while messages[-1] != [b"READY=1"]:
            messages.append(notify.recv(4096).split(b"\n"))
        assert [b"FDSTORE=1", b"FDNAME=ebpf-sticky-key"] in messages
        served = {get(source, instance.port)[1] for source in ("127.0.8.1", "127.0.8.2", "127.0.8.3")}
        assert served <= set(children(master))
        # ExecReload: HUP replaces every worker.
        before = set(children(master))
        instance.signal(signal.SIGHUP)
        wait_for(lambda: len(set(children(master)) - before) == 2, 30, "both workers replaced")
        # USR2 (no capability left to the master): the same pid runs a new image on the same
        # group, its program and maps, and renews both workers. Only a settled group upgrades.
        wait_for(lambda: "reload complete" in instance.output(), 60, "the reload")
        before = set(children(master))
        instance.signal(signal.SIGUSR2)
        wait_for(lambda: len(set(children(master)) - before) == 2, 60, "both workers renewed")
        wait_for(lambda: instance.output().count("reload complete") == 2, 60, "the upgrade's renewal")
        assert "upgraded in place (generation 1)" in instance.output()
        assert {get(source, instance.port)[1] for source in ("127.0.8.1", "127.0.8.2")} <= set(
            children(master)
        )
        # Stop: TERM to the main pid, exit 0 well before TimeoutStopSec.
        instance.signal(signal.SIGTERM)
        assert instance.finish(timeout=int(unit_settings()["TimeoutStopSec"][0])) == 0


def test_systemd_launch_workers_hold_no_bpf_capability() -> None:
    with launched_as_unit() as (instance, _):
        workers = children(instance.proc.pid)
        assert len(workers) == 2
        for pid in workers:
            for field in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
                assert not capabilities(pid, field) & {CAP_BPF, CAP_NET_ADMIN}, (pid, field)
