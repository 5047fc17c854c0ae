"""Parsing and validation: pure, no root."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from ebpf_sticky.addresses import parse_bind
from ebpf_sticky.cli import main
from ebpf_sticky.config import parse_key
from ebpf_sticky.errors import ConfigError
from ebpf_sticky.hashing import HashSpec, parse_address, slot_of
from ebpf_sticky.hashing import cbpf as hashing_cbpf
from ebpf_sticky.targets import Target, is_asgi, parse_target

KEY = "00112233445566778899aabbccddeeff"


@pytest.mark.parametrize(
    ("text", "host", "port", "family", "dual"),
    [
        ("127.0.0.1:8000", "127.0.0.1", 8000, socket.AF_INET, False),
        (":9000", "0.0.0.0", 9000, socket.AF_INET, False),
        ("[::]:80", "::", 80, socket.AF_INET6, True),
        ("[::1]:0", "::1", 0, socket.AF_INET6, False),
    ],
)
def test_bind(text: str, host: str, port: int, family: int, dual: bool) -> None:
    bind = parse_bind(text)
    assert (bind.host, bind.port, bind.family, bind.dual_stack) == (host, port, family, dual)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost:80", "a numeric address"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:70000", "port must be 0..65535"),
        ("::1:80", "in brackets"),
    ],
)
def test_bad_bind(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_bind(text)


def test_key() -> None:
    assert parse_key(KEY) == bytes.fromhex(KEY)
    for bad in ("", "zz" * 16, KEY[:-2]):
        with pytest.raises(ConfigError, match="32 hex digits"):
            parse_key(bad)


def test_targets() -> None:
    assert parse_target("app.py") == Target("app.py", None, True)
    assert parse_target("dir/app.py:api") == Target("dir/app.py", "api", True)
    assert parse_target("pkg.mod:app") == Target("pkg.mod", "app", False)
    with pytest.raises(ConfigError, match="name the attribute"):
        parse_target("pkg.mod")
    with pytest.raises(ConfigError, match="nothing after ':'"):
        parse_target("app.py:")


def test_asgi_or_wsgi() -> None:
    async def asgi(scope: object, receive: object, send: object) -> None: ...

    def wsgi(environ: object, start_response: object) -> list[bytes]:
        return []

    class AsgiObject:
        async def __call__(self, scope: object, receive: object, send: object) -> None: ...

    assert is_asgi(asgi) and is_asgi(AsgiObject()) and not is_asgi(wsgi)


def test_route_offline_matches_the_mirror(capsys: pytest.CaptureFixture[str]) -> None:
    addresses = ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "[2001:db8::2]"]
    assert main(["route", "--workers", "5", "--hash-key", KEY, "--prefix6", "64", *addresses]) == 0
    lines = capsys.readouterr().out.split("\n")
    spec = HashSpec(bytes.fromhex(KEY))
    for line, address in zip(lines, addresses, strict=False):
        assert line == f"{address} {slot_of(parse_address(address), spec, 5)}"
    assert lines[0].split()[1] == lines[1].split()[1]  # IPv4-mapped is the IPv4 client


def test_route_offline_with_loader_cbpf_uses_its_mirror(capsys: pytest.CaptureFixture[str]) -> None:
    addresses = ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "127.0.0.9"]
    assert main(["route", "--loader", "cbpf", "--workers", "7", "--hash-key", KEY, *addresses]) == 0
    lines = capsys.readouterr().out.splitlines()
    spec = HashSpec(bytes.fromhex(KEY))
    assert lines == [f"{a} {hashing_cbpf.slot_of(parse_address(a), spec, 7)}" for a in addresses]
    native = [slot_of(parse_address(a), spec, 7) for a in addresses]
    assert [int(line.split()[1]) for line in lines] != native  # a different hash: --loader matters


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["route", "--hash-key", KEY, "10.0.0.1"], "needs --workers"),
        (["route", "--workers", "3", "10.0.0.1"], "needs --hash-key"),
        (["route", "--workers", "3", "--hash-key", KEY, "not-an-ip"], "is not an IP address"),
        (["route", "--workers", "0", "--hash-key", KEY, "10.0.0.1"], "--workers must be 1..256"),
        (
            ["route", "--loader", "cbpf", "--workers", "72", "--hash-key", KEY, "10.0.0.1"],
            "--workers must be 1..71 with --loader cbpf, got 72",
        ),
        (
            ["launch", "--loader", "cbpf", "-w", "100", "--", "true"],
            "--workers must be 1..71 with --loader cbpf",
        ),
        (["status", "--", "x"], "goes with launch only"),
        (["launch"], "either a TARGET"),
        (["launch", "app.py", "--", "node", "x.js"], "either a TARGET"),
    ],
)
def test_bad_cli_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebpf-sticky: error: ") and message in err and err.count("\n") == 1


def test_bad_environment_twin_is_reported_like_a_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EBPF_STICKY_WORKERS", "many")
    with pytest.raises(SystemExit) as info:
        main(["launch", "app.py"])
    assert info.value.code == 2
    assert "expected a whole number, got 'many'" in capsys.readouterr().err


def test_environment_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    from ebpf_sticky.cli import build_parser

    twins = {
        "WORKERS": "3",
        "BIND": "[::]:9000",
        "UDP": "1",
        "LOADER": "bcc",
        "HASH_KEY": KEY,
        "PREFIX4": "24",
        "PREFIX6": "48",
        "GRACEFUL_TIMEOUT": "2.5",
        "USER": "nobody",
        "PID_FILE": "/tmp/x.pid",
        "LOG_LEVEL": "warning",
        "FACTORY": "1",
    }
    for name, value in twins.items():
        monkeypatch.setenv(f"EBPF_STICKY_{name}", value)
    args = build_parser().parse_args(["launch", "app.py"])
    assert (args.workers, args.bind, args.udp, args.loader, args.hash_key) == (
        3,
        "[::]:9000",
        True,
        "bcc",
        KEY,
    )
    assert (args.prefix4, args.prefix6, args.graceful_timeout, args.user) == (24, 48, 2.5, "nobody")
    assert (args.pid_file, args.log_level, args.factory) == ("/tmp/x.pid", "warning", True)
    assert build_parser().parse_args(["launch", "app.py", "-w", "5"]).workers == 5  # the flag wins


def test_session_options_and_their_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    from ebpf_sticky.cli import _session_keys, build_parser
    from ebpf_sticky.settings import launch_settings

    monkeypatch.setenv("EBPF_STICKY_SESSION_KEY", "engineio\n cookie:sid \n\nmcp")
    monkeypatch.setenv("EBPF_STICKY_PROXY_PROTOCOL", "1")
    args = build_parser().parse_args(["launch", "app.py"])
    assert _session_keys(args) == ("engineio", "cookie:sid", "mcp") and args.proxy_protocol
    flags = build_parser().parse_args(
        ["launch", "app.py", "--session-key", "query:s", "--session-key", "forwarded"]
    )
    assert _session_keys(flags) == ("query:s", "forwarded")  # the flags win, all of them
    with pytest.raises(ConfigError, match="expected engineio"):
        launch_settings(target=None, command=["true"], session_keys=("sid",))


def test_output_into_a_closed_pipe_is_quiet() -> None:
    # `ebpf-sticky route ... | head -1`: the reader leaves early; no BrokenPipeError traceback.
    addresses = [f"10.0.{i // 256}.{i % 256}" for i in range(20000)]
    argv = [sys.executable, "-m", "ebpf_sticky", "route", "--hash-key", "00" * 16, "-w", "4", *addresses]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        code = proc.wait(60)
    assert "Traceback" not in stderr, stderr
    assert code == 1


def test_a_root_master_runs_workers_as_an_unprivileged_user_unless_asked() -> None:
    from ebpf_sticky.config import worker_user

    assert worker_user(None, 0, {"nobody"}.__contains__) == ("nobody", True)
    assert worker_user("", 0, {"ebpf-sticky", "nobody"}.__contains__) == ("ebpf-sticky", True)
    assert worker_user("root", 0, {"nobody"}.__contains__) == ("root", False)
    assert worker_user(None, 1000, {"nobody"}.__contains__) == (None, False)
    with pytest.raises(ConfigError, match="neither ebpf-sticky nor nobody exists here"):
        worker_user(None, 0, set().__contains__)
