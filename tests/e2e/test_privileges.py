"""Least privilege as deployed: what every worker and the master hold, read from /proc/PID/status,
in each deployment shape; the workers' seccomp filter attacked through every ABI; a platform that
refuses the lock-down; bpf(2) filtered while the capabilities are held."""

from __future__ import annotations

import errno
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.launcher import (
    APPS,
    KEY,
    Instance,
    default_worker,
    get,
    launched,
    run_bad,
    tagged_processes,
    wait_for,
)
from support.netlab import v4_sources

from ebpf_sticky import HashSpec, Router, parse_address, parse_bind, slot_of
from ebpf_sticky.contract import EXIT_LOCKDOWN
from ebpf_sticky.kernel import capabilities as caps

SPEC = HashSpec(bytes.fromhex(KEY))
SOURCES = v4_sources(40)
BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "5"]
JAIL = [sys.executable, str(Path(__file__).parents[1] / "support" / "seccomp_jail.py")]
# What the issue requires no worker to hold, in any set that reaches the exec'd program.
BPF_CAPS = caps.mask(caps.CAP_BPF, caps.CAP_NET_ADMIN, caps.CAP_SYS_ADMIN, caps.CAP_PERFMON)
ONLY_BPF_NET = ["--bounding-set=-all,+bpf,+net_admin", "--inh-caps=-all,+bpf,+net_admin"]
AS_NOBODY = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def sets(pid: int) -> caps.CapSets:
    return caps.parse_status(caps.read_status(pid))


def show(who: str, found: caps.CapSets) -> str:
    """One line per process for the test log (`pytest -s` prints the measured sets)."""
    return " ".join(
        f"{name}={value:016x}({caps.names(value)})"
        for name, value in (
            ("Eff", found.effective),
            ("Prm", found.permitted),
            ("Inh", found.inheritable),
            ("Amb", found.ambient),
            ("Bnd", found.bounding),
        )
    ).join((f"{who}: ", ""))


def workers_of(instance: Instance, count: int) -> list[int]:
    """Every process of the launch but the master: the workers, as exec'd."""

    def found() -> list[int] | None:
        pids = [pid for pid in tagged_processes(instance.tag) if pid != instance.proc.pid]
        return pids if len(pids) == count else None

    return list(wait_for(found, 30.0, f"{count} workers"))


def assert_locked_down(instance: Instance, count: int, bounding_dropped: bool) -> list[caps.CapSets]:
    found = []
    for pid in workers_of(instance, count):
        status = caps.read_status(pid)
        worker = caps.parse_status(status)
        print(show(f"worker {pid}", worker))
        assert worker.holding(caps.ALL) == 0, show("worker", worker)  # BPF_CAPS above all
        assert caps.status_field(status, "NoNewPrivs") == "1"
        assert caps.status_field(status, "Seccomp") == "2"
        assert not (bounding_dropped and worker.bounding & BPF_CAPS)
        found.append(worker)
    return found


def assert_sticky(port: int, slots: int) -> None:
    for source in SOURCES[:16]:
        slot, _, _ = get(source, port)
        assert slot == slot_of(parse_address(source), SPEC, slots), source


# 1. Every deployment shape --------------------------------------------------------------------------
def test_root_with_every_capability_and_user_root() -> None:
    """Workers at uid 0, asked for: the master needs nothing once the group is built."""
    with launched(["asgi_app.py", "-w", "2", *BASE, "--user", "root"]) as instance:
        assert_locked_down(instance, 2, bounding_dropped=True)
        master = sets(instance.proc.pid)
        print(show("master", master))
        assert master.permitted == master.effective == 0 and master.ambient == 0
        assert_sticky(instance.port, 2)
        assert get(SOURCES[0], instance.port)[2] == 0


@pytest.mark.parametrize("user", [[], ["--user", "nobody"]])
def test_root_with_every_capability_runs_workers_unprivileged(
    world_readable_apps: Path, user: list[str]
) -> None:
    """A root master's default user (ebpf-sticky if it exists, else nobody), and --user's."""
    uid = pwd.getpwnam(user[1]).pw_uid if user else default_worker().pw_uid
    with launched(["-w", "2", *BASE, *user, "--", "sleep", "600"], cwd=world_readable_apps) as instance:
        for worker in assert_locked_down(instance, 2, bounding_dropped=True):
            assert worker.permitted == worker.effective == 0
        master = sets(instance.proc.pid)
        print(show("master", master))
        # Spawning as another user takes setuid/setgid, signalling its processes kill: nothing else.
        assert master.permitted == caps.mask(caps.CAP_KILL, caps.CAP_SETUID, caps.CAP_SETGID)
        assert all(os.stat(f"/proc/{pid}").st_uid == uid for pid in workers_of(instance, 2))


def test_root_without_setuid_refuses_root_workers_it_was_not_asked_for() -> None:
    prefix = ["setpriv", *ONLY_BPF_NET, "--ambient-caps=-all,+bpf,+net_admin", "--"]
    line = refused(["asgi_app.py", "-w", "2", *BASE], prefix=prefix)
    who = default_worker()
    assert f"cannot start workers as {who.pw_name} (uid {who.pw_uid}, the default for a root master)" in line
    assert "grant them, or pass --user root" in line


def test_root_with_only_bpf_and_net_admin() -> None:
    """No CAP_SETPCAP: the bounding set cannot shrink, yet no worker gets the two back. The master
    drops both once the group is built and still adds a slot (TTIN) through the fds it holds.
    Workers at uid 0, asked for: without CAP_SETUID the master cannot drop them to another uid."""
    prefix = ["setpriv", *ONLY_BPF_NET, "--ambient-caps=-all,+bpf,+net_admin", "--"]
    with launched(["asgi_app.py", "-w", "2", *BASE, "--user", "root"], prefix=prefix) as instance:
        assert_locked_down(instance, 2, bounding_dropped=False)
        master = sets(instance.proc.pid)
        print(show("master", master))
        assert master.permitted == master.effective == master.inheritable == master.ambient == 0
        instance.signal(signal.SIGTTIN)
        wait_for(lambda: re.search(r"slot 2: worker \d+ ready", instance.output()), 60, "slot 2 ready")
        assert_locked_down(instance, 3, bounding_dropped=False)
        assert_sticky(instance.port, 3)


def test_root_with_bpf_net_admin_and_user_switching(world_readable_apps: Path) -> None:
    prefix = [
        "setpriv",
        "--bounding-set=-all,+bpf,+net_admin,+setuid,+setgid,+kill",
        "--inh-caps=-all,+bpf,+net_admin,+setuid,+setgid,+kill",
        "--",
    ]
    with launched(
        ["asgi_app.py", "-w", "2", *BASE, "--user", "nobody"], prefix=prefix, cwd=world_readable_apps
    ) as instance:
        assert_locked_down(instance, 2, bounding_dropped=False)
        assert sets(instance.proc.pid).permitted == caps.mask(caps.CAP_KILL, caps.CAP_SETUID, caps.CAP_SETGID)
        _, _, uid = get(SOURCES[0], instance.port)
        assert uid == 65534


def test_non_root_with_ambient_capabilities(world_readable_apps: Path) -> None:
    """systemd's User= with AmbientCapabilities=CAP_BPF CAP_NET_ADMIN."""
    prefix = [
        "setpriv",
        *AS_NOBODY,
        "--inh-caps=-all,+bpf,+net_admin",
        "--ambient-caps=-all,+bpf,+net_admin",
        "--",
    ]
    with launched(["asgi_app.py", "-w", "2", *BASE], prefix=prefix, cwd=world_readable_apps) as instance:
        assert_locked_down(instance, 2, bounding_dropped=False)
        master = sets(instance.proc.pid)
        print(show("master", master))
        assert master.permitted == master.ambient == 0
        assert_sticky(instance.port, 2)


def test_non_root_with_file_capabilities(world_readable_apps: Path) -> None:
    """A copy of the interpreter with cap_bpf,cap_net_admin+ep: workers exec that very binary, and
    no_new_privs keeps its file capabilities from applying to them."""
    if shutil.which("setcap") is None:
        pytest.skip("setcap is absent (scripts/setup installs libcap2-bin)")
    python = world_readable_apps / "python3"
    shutil.copy(os.path.realpath(sys.executable), python)
    subprocess.run(["setcap", "cap_bpf,cap_net_admin+ep", str(python)], check=True)
    # The copy is not in the venv: the venv's packages (this tree installed, uvicorn) by path.
    site = sysconfig.get_paths()["purelib"]
    with launched(
        [],
        argv=[str(python), "-m", "ebpf_sticky", "launch", "asgi_app.py", "-w", "2", *BASE],
        prefix=["setpriv", *AS_NOBODY, "--"],
        cwd=world_readable_apps,
        extra_env={"PYTHONPATH": site},
    ) as instance:
        assert sets(instance.proc.pid).permitted == 0  # held them at start, dropped them after the build
        assert_locked_down(instance, 2, bounding_dropped=False)
        assert_sticky(instance.port, 2)


def test_user_without_setuid_is_refused() -> None:
    output = refused(
        ["-w", "2", *BASE, "--user", "nobody", "--", "sleep", "600"],
        prefix=["setpriv", *ONLY_BPF_NET, "--"],
    )
    assert "cannot start workers as nobody (uid 65534): Operation not permitted" in output
    assert "needs CAP_SETUID and CAP_SETGID for that, and was started with cap_net_admin,cap_bpf" in output


# 2. The seccomp filter against every ABI --------------------------------------------------------------
@pytest.fixture(scope="module")
def detach_binary() -> Iterator[Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is absent (scripts/setup installs it): cannot build the i386/x32 attacker")
    if os.uname().machine != "x86_64":
        pytest.skip("the i386 and x32 ABIs exist on x86_64 only")
    # Outside pytest's private tmp: the workers (nobody) run it.
    directory = Path(tempfile.mkdtemp(prefix="ebpf-sticky-detach-"))
    directory.chmod(0o755)
    binary = directory / "detach"
    try:
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(APPS / "detach.c")], check=True)
        yield binary
    finally:
        shutil.rmtree(directory)


def run_unfiltered(binary: Path, abi: str) -> tuple[str, int]:
    """The negative control: the same program on a group's socket, with no filter. Returns its
    verdict and how many of 10 connections the program then counted (0: detached)."""
    with Router.open(parse_bind("127.0.0.1:0"), SPEC, 2, loader="native") as router:
        fd = router.sockets[0].fileno()
        verdict = subprocess.run(
            # bash: dash redirects single-digit fds only.
            ["bash", "-c", f'exec "$@" 3<&{fd}', "bash", str(binary), abi],
            pass_fds=[fd],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for source in SOURCES[:10]:
            socket.create_connection(("127.0.0.1", router.port), source_address=(source, 0)).close()
        return verdict, sum(n or 0 for n in router.counters().per_slot)


def test_without_the_filter_any_abi_detaches(detach_binary: Path) -> None:
    assert run_unfiltered(detach_binary, "i386") == ("0", 0)
    assert run_unfiltered(detach_binary, "64") == ("0", 0)
    assert run_unfiltered(detach_binary, "uring") == ("0", 0)  # no setsockopt call at all
    # This kernel may lack x32 (CONFIG_X86_X32_ABI): then ENOSYS, and the filter must still catch it.
    verdict, counted = run_unfiltered(detach_binary, "x32")
    assert (verdict, counted) in {("0", 0), ("errno:38", 10)}


def test_workers_cannot_detach_through_any_abi(detach_binary: Path) -> None:
    attempts = ["i386", "x32", "64", "uring"]
    with launched(["-w", "3", *BASE, "--", str(detach_binary), "serve", *attempts]) as instance:
        for source in SOURCES:
            with socket.create_connection(("127.0.0.1", instance.port), source_address=(source, 0)) as client:
                client.settimeout(10)
                answer = client.makefile().readline().split()
            # Killed (SIGSYS) through i386 and x32, EPERM natively and from io_uring_setup; the
            # group stays sticky.
            assert answer[1:] == [f"signal:{signal.SIGSYS}", f"signal:{signal.SIGSYS}", "errno:1", "errno:1"]
            assert int(answer[0]) == slot_of(parse_address(source), SPEC, 3), source
        assert sum(row["routed"] for row in instance.status()["slots"]) == len(SOURCES)


def test_workers_cannot_reach_the_masters_map_fds() -> None:
    """Workers of the master's uid and a master without capabilities: the ptrace check alone would
    let a worker take the master's fds (map updates through them need no capability). The master
    is non-dumpable and bpf(2) is filtered. The control: the same program under an ordinary parent
    without capabilities takes its fds, and bpf(2) reaches the kernel."""
    script = str(APPS / "reach_master.py")
    control = subprocess.run(
        [
            *["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", sys.executable, "-c"],
            f"import subprocess, sys; subprocess.run([sys.executable, {script!r}], check=True)",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert int(control[0]) > 0 and int(control[1]) != errno.EPERM
    with launched(["-w", "2", *BASE, "--", sys.executable, script, "serve"]) as instance:
        for source in SOURCES[:8]:
            with socket.create_connection(("127.0.0.1", instance.port), source_address=(source, 0)) as client:
                client.settimeout(10)
                assert client.recv(64) == f"0 {errno.EPERM}".encode()


# 3. Fail closed -----------------------------------------------------------------------------------
def refused(args: list[str], prefix: list[str], argv: list[str] | None = None) -> str:
    """A launch the platform refuses (exactly one error line, exit 3, nothing left): that line."""
    output = run_bad(args, "", code=3, prefix=prefix, argv=argv)
    return next(line for line in output.splitlines() if line.startswith("ebpf-sticky: error:"))


def test_platform_refusing_seccomp_starts_no_worker() -> None:
    line = refused(["-w", "2", *BASE, "--", "sleep", "600"], prefix=[*JAIL, "seccomp", "prctl:22", "--"])
    assert "cannot lock down the workers (installing the seccomp filter: Operation not permitted)" in line
    assert "refusing to start them" in line


def test_child_setup_never_execs_when_the_filter_is_refused(tmp_path: Path) -> None:
    """The worker side itself: under the same platform, the child exits before exec, saying why."""
    marker = tmp_path / "exec'd"
    script = (
        "import os, socket, subprocess\n"
        "from ebpf_sticky.supervisor.loop import _child_setup\n"
        "sock = socket.socket()\n"
        "from ebpf_sticky.kernel.seccomp import Listener\n"
        "setup = _child_setup({3: sock.fileno()}, os.getpid(), Listener.SEALED)\n"
        f"proc = subprocess.Popen(['touch', {str(marker)!r}], preexec_fn=setup)\n"
        "raise SystemExit(proc.wait())\n"
    )
    proc = subprocess.run(
        [*JAIL, "seccomp", "prctl:22", "--", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_LOCKDOWN, proc.stderr
    assert "worker not started: cannot lock down the workers" in proc.stderr
    assert not marker.exists()


# 4. Errors that name the real cause -----------------------------------------------------------------
def test_bpf_filtered_while_the_capabilities_are_held() -> None:
    line = refused(
        ["-w", "2", *BASE, "--loader", "native", "--", "sleep", "600"], prefix=[*JAIL, "bpf", "--"]
    )
    assert "although this process holds CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN" in line
    assert "bpf(2) is denied by a seccomp filter or an LSM, not for lack of capabilities" in line
    assert "--loader cbpf" in line and "CAP_SYS_ADMIN" in line and "seccomp profile that allows bpf" in line
    assert "--privileged" not in line


def test_doctor_names_the_filter() -> None:
    proc = subprocess.run(
        [*JAIL, "bpf", "--", sys.executable, "-m", "ebpf_sticky", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The diagnosis is a warning: --loader auto runs the classic-BPF router there, so launch works.
    assert proc.returncode == 0, proc.stdout
    assert "router cbpf" in proc.stdout
    privileges = re.search(r"^warn privileges: (.*)\n\s+fix: (.*)$", proc.stdout, re.M)
    assert privileges, proc.stdout
    assert "seccomp filter yes" in privileges.group(1)
    assert "denied by a seccomp filter or an LSM" in privileges.group(1)
    assert "--loader cbpf" in privileges.group(2)


def test_missing_capability_is_named() -> None:
    line = refused(
        ["-w", "2", *BASE, "--loader", "native", "--", "sleep", "600"],
        prefix=["setpriv", "--bounding-set=-all,+net_admin", "--inh-caps=-all,+net_admin", "--"],
    )
    assert "this process lacks CAP_BPF (or CAP_SYS_ADMIN): run as root, or grant CAP_BPF" in line
    assert "--privileged" not in line


def test_cap_bpf_alone_is_enough() -> None:
    """The kernel checks CAP_BPF only for SK_REUSEPORT programs: CAP_NET_ADMIN is never missing."""
    prefix = ["setpriv", "--bounding-set=-all,+bpf", "--inh-caps=-all,+bpf", "--"]
    args = ["-w", "2", *BASE, "--loader", "native", "--user", "root", "--", "sleep", "600"]
    with launched(args, prefix=prefix) as instance:
        assert_locked_down(instance, 2, bounding_dropped=False)


def test_user_namespace_capabilities_are_named_as_such() -> None:
    """Rootless containers: every capability, of a user namespace, which bpf(2) ignores."""
    line = refused(["-w", "2", *BASE, "--loader", "native", "--", "sleep", "600"], prefix=["unshare", "-Ur"])
    assert "they are a user namespace's (rootless container), which bpf(2) does not honour" in line
    assert "seccomp" not in line


def test_pid_file_in_a_directory_only_privilege_can_write(tmp_path: Path) -> None:
    """The master removes its pid file at exit: where its uid alone may not, it keeps
    CAP_DAC_OVERRIDE for that, and nothing else."""
    directory = tmp_path / "nobodys"
    directory.mkdir(mode=0o755)
    os.chown(directory, 65534, 65534)
    pid_file = directory / "master.pid"
    args = ["-w", "1", *BASE, "--user", "root", "--pid-file", str(pid_file), "--", "sleep", "600"]
    with launched(args) as instance:
        assert sets(instance.proc.pid).permitted == caps.mask(caps.CAP_DAC_OVERRIDE)
        instance.signal(signal.SIGTERM)
        assert instance.finish() == 0, instance.output()
        assert not pid_file.exists()


def test_a_thread_started_before_the_drop_is_refused() -> None:
    """Capabilities are per thread: an embedding that starts one first gets an error, not a master
    that only looks unprivileged from its main thread's /proc status."""
    script = (
        "import sys, threading, time\n"
        "from ebpf_sticky.cli import main\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        f"sys.exit(main(['launch', *{[*BASE, '-w', '1', '--', 'sleep', '600']!r}]))\n"
    )
    line = refused([], prefix=[], argv=[sys.executable, "-c", script])
    assert "2 threads run in the master and only this one dropped its capabilities" in line


def test_an_app_the_default_user_cannot_read_is_one_clear_line(tmp_path: Path) -> None:
    """pytest's tmp dirs are root's alone (0700), as /root is: the workers' default user cannot
    import from there, and the launch says so before any worker starts."""
    shutil.copy(APPS / "asgi_app.py", tmp_path)
    worker = default_worker()
    who = f"{worker.pw_name} (uid {worker.pw_uid}, the default for a root master)"
    expected = f"workers run as {who} and cannot list {tmp_path}: make"
    run_bad(["asgi_app.py", "-w", "2", *BASE], expected, cwd=tmp_path)
