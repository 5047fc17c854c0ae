"""uvicorn's options on launch: the option list against the installed uvicorn, parsing, validation,
what the worker receives, and the core's recycling decisions. No root needed."""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import uvicorn.config

from ebpf_sticky import options as uvicorn_options
from ebpf_sticky.cli import build_parser, launch_settings, main
from ebpf_sticky.errors import ConfigError
from ebpf_sticky.options import LEFT_OUT, Reload, WorkerOptions
from ebpf_sticky.supervisor import core
from ebpf_sticky.supervisor.core import (
    Core,
    Exited,
    Kill,
    Ready,
    Recycle,
    Signal,
    SignalName,
    Spawn,
    Spawned,
    Start,
)

APP = str(Path(__file__).parents[1] / "e2e" / "apps" / "asgi_app.py")


def help_of(*command: str) -> str:
    # Wide enough that no option name is wrapped (click and argparse both honour COLUMNS).
    env = {"COLUMNS": "250", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True,
                          check=True, env=env).stdout  # fmt: skip


def options_in(help_text: str) -> set[str]:
    """Option names where a help line starts, with their ``--no-`` forms (``--x / --no-x``)."""
    found: set[str] = set()
    for line in help_text.splitlines():
        match = re.match(r"\s+(?:-\w(?: [A-Z_]+)?, )?(--[\w-]+.*?)(?:\s{2,}|$)", line)
        if match:
            found |= set(re.findall(r"--[a-z0-9][\w-]*", match.group(1)))
    return found


def test_launch_has_every_option_of_the_installed_uvicorn_or_says_why_not() -> None:
    theirs = options_in(help_of("uvicorn")) - {"--help"}
    ours = options_in(help_of("ebpf_sticky", "launch"))
    assert {"--ssl-certfile", "--no-access-log", "--reload-exclude", "--workers"} <= theirs & ours
    missing = theirs - ours - set(LEFT_OUT)
    assert not missing, f"uvicorn options neither on launch nor in LEFT_OUT: {sorted(missing)}"
    assert not (set(LEFT_OUT) & ours), "an option both offered and listed as left out"
    assert set(LEFT_OUT) <= theirs, "LEFT_OUT names an option uvicorn no longer has"
    assert all(len(reason) > 20 for reason in LEFT_OUT.values())


def test_choices_are_those_of_the_installed_uvicorn() -> None:
    assert set(uvicorn_options.LOOPS) == set(uvicorn.config.LOOP_FACTORIES) - {"none"}
    assert set(uvicorn_options.HTTPS) == set(uvicorn.config.HTTP_PROTOCOLS)
    assert set(uvicorn_options.WSS) == set(uvicorn.config.WS_PROTOCOLS)


def parse(*argv: str) -> WorkerOptions:
    return uvicorn_options.parse(build_parser().parse_args(["launch", "app.py", *argv]))


def test_given_options_reach_uvicorn_config_and_only_those() -> None:
    assert parse().config == {}
    options = parse(
        "--loop", "asyncio", "--http", "h11", "--ws", "wsproto", "--ws-max-size", "1000",
        "--ws-per-message-deflate", "false", "--no-access-log", "--proxy-headers",
        "--header", "X-A: 1", "--header", "X-B:2", "--root-path", "/api", "--timeout-keep-alive", "7",
        "--limit-concurrency", "9", "--forwarded-allow-ips", "*",
    )  # fmt: skip
    assert options.config == {
        "loop": "asyncio", "http": "h11", "ws": "wsproto", "ws_max_size": 1000,
        "ws_per_message_deflate": False, "access_log": False, "proxy_headers": True,
        "headers": [["X-A", "1"], ["X-B", "2"]], "root_path": "/api", "timeout_keep_alive": 7,
        "limit_concurrency": 9, "forwarded_allow_ips": "*",
    }  # fmt: skip
    # Every keyword we pass is one uvicorn.Config takes.
    uvicorn.config.Config(lambda: None, **options.config)


def test_worker_options_round_trip_through_the_environment() -> None:
    options = parse("--ssl-certfile", "c.pem", "--limit-max-requests", "100", "--reload",
                    "--reload-dir", "src", "--reload-include", "*.html", "--app-dir", "lib")  # fmt: skip
    assert WorkerOptions.from_json(options.to_json()) == options
    assert options.reload == Reload(dirs=("src",), includes=("*.html",), excludes=(), delay=0.25)
    assert options.limit_max_requests_jitter == 10  # a tenth by default, so slots spread out
    assert (
        parse("--limit-max-requests", "100", "--limit-max-requests-jitter", "0").limit_max_requests_jitter
        == 0
    )


def test_host_and_port_are_spellings_of_bind() -> None:
    def bind(*argv: str) -> str:
        return str(build_parser().parse_args(["launch", "app.py", *argv]).bind)

    assert bind("--host", "0.0.0.0", "--port", "9000") == "0.0.0.0:9000"
    assert bind("--port", "9001") == "127.0.0.1:9001"
    assert bind("--host", "::") == "[::]:8000"
    assert bind("--bind", "10.0.0.1:1", "--port", "2") == "10.0.0.1:2"


def test_host_and_port_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBPF_STICKY_HOST", "0.0.0.0")
    monkeypatch.setenv("EBPF_STICKY_PORT", "9002")
    assert build_parser().parse_args(["launch", "app.py"]).bind == "0.0.0.0:9002"
    assert build_parser().parse_args(["launch", "app.py", "--port", "1"]).bind == "0.0.0.0:1"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ssl-keyfile", "k.pem"], "--ssl-keyfile needs --ssl-certfile"),
        (["--ssl-ciphers", "ALL"], "--ssl-ciphers takes effect only with --ssl-certfile"),
        (["--header", "no-colon"], "expected NAME:VALUE"),
        (["--limit-max-requests", "0"], "--limit-max-requests must be >= 1"),
        (["--backlog", "0"], "--backlog must be >= 1"),
        (["--ws-ping-interval", "-1"], "--ws-ping-interval must be >= 0"),
        (["--reload-dir", "src"], "need --reload"),
        (["--http2"], "--http2 needs --http zttp"),
    ],
)
def test_bad_options(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(*argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env-file", "/nonexistent.env"], "--env-file '/nonexistent.env': no such file"),
        (["--log-config", "/nonexistent.ini"], "--log-config '/nonexistent.ini': no such file"),
        (["--app-dir", "/nonexistent"], "--app-dir '/nonexistent': no such directory"),
        (["--reload", "--reload-dir", "/nonexistent"], "--reload-dir '/nonexistent': no such directory"),
        (["--ssl-certfile", "/nonexistent.pem"], "--ssl-certfile '/nonexistent.pem': no such file"),
        (["--ssl-certfile", APP], "no PEM certificate in it"),
        (["--loop", "zuvloop"], "--loop zuvloop: zuvloop is not installed"),
        (["--limit-max-requests", "5", "--", "sleep", "1"], "apply to a Python TARGET"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["launch", APP, *argv] if "--" not in argv else ["launch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebpf-sticky: error: ") and message in err and err.count("\n") == 1


def test_tls_version_and_client_certificate_constants(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    base = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    uvicorn_options.check_tls(
        {**base, "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_version": ssl.PROTOCOL_TLS_SERVER}
    )
    with pytest.raises(ConfigError, match="--ssl-cert-reqs 7: expected 0"):
        uvicorn_options.check_tls({**base, "ssl_cert_reqs": 7})
    with pytest.raises(ConfigError, match="--ssl-version 99: not a protocol"):
        uvicorn_options.check_tls({**base, "ssl_version": 99})
    with pytest.raises(ConfigError, match="--ssl-ca-certs .*: no PEM certificate"):
        uvicorn_options.check_tls({**base, "ssl_ca_certs": str(key)})


def test_environment_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    twins = {
        "SSL_CERTFILE": "c.pem",
        "LOOP": "asyncio",
        "ACCESS_LOG": "0",
        "WS_MAX_SIZE": "1234",
        "HEADER": "X-A: 1\nX-B: 2",
        "LIMIT_MAX_REQUESTS": "50",
        "BACKLOG": "99",
        "TIMEOUT_GRACEFUL_SHUTDOWN": "3",
    }
    for name, value in twins.items():
        monkeypatch.setenv(f"EBPF_STICKY_{name}", value)
    args = build_parser().parse_args(["launch", "app.py"])
    options = uvicorn_options.parse(args)
    assert options.config == {"ssl_certfile": "c.pem", "loop": "asyncio", "access_log": False,
                              "ws_max_size": 1234, "headers": [["X-A", "1"], ["X-B", "2"]]}  # fmt: skip
    assert (options.limit_max_requests, options.backlog) == (50, 99)
    assert args.graceful_timeout == 3.0  # uvicorn's name for --graceful-timeout, and its twin
    flagged = build_parser().parse_args(["launch", "app.py", "--header", "X-C: 3", "--access-log"])
    assert uvicorn_options.parse(flagged).config["headers"] == [["X-C", "3"]]  # the flag wins
    assert uvicorn_options.parse(flagged).config["access_log"] is True


def test_bad_boolean_twin_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EBPF_STICKY_PROXY_HEADERS", "maybe")
    with pytest.raises(SystemExit) as info:
        build_parser()
    assert info.value.code == 2
    assert "EBPF_STICKY_PROXY_HEADERS: expected true or false, got 'maybe'" in capsys.readouterr().err


def test_timeout_graceful_shutdown_is_the_graceful_timeout() -> None:
    args = build_parser().parse_args(["launch", APP, "--timeout-graceful-shutdown", "4"])
    assert launch_settings(args, []).graceful_timeout == 4.0


# The core's side of recycling --------------------------------------------------------------------
def running(slots: int = 2) -> Core:
    c = Core(slots=slots)
    c.handle(Start(0.0))
    for slot in range(slots):
        c.handle(Spawned(slot, 100 + slot, 0.0))
        c.handle(Ready(100 + slot, 0.5))
    assert c.phase is core.Phase.RUNNING
    return c


def test_recycle_starts_the_successor_before_stopping_the_worker() -> None:
    c = running()
    assert Spawn(0) in c.handle(Recycle(100, 10.0))
    assert not any(isinstance(a, Kill) for a in c.handle(Spawned(0, 200, 10.0)))
    assert Kill(100, "TERM") in c.handle(Ready(200, 10.5))
    assert c.handle(Exited(100, 0, 11.0)) == [core.Log("slot 0: worker 100 stopped")]  # no respawn
    assert c.restarts == {(0, "recycle"): 1}  # counted once, as a recycle and not as a crash


def test_recycles_queue_up_one_slot_at_a_time() -> None:
    c = running()
    assert Spawn(0) in c.handle(Recycle(100, 10.0))
    c.handle(Spawned(0, 200, 10.0))
    assert not any(isinstance(a, Spawn) for a in c.handle(Recycle(101, 10.1)))  # waits its turn
    assert c.handle(Recycle(101, 10.2)) == []  # asked twice: still once
    actions = c.handle(Ready(200, 10.5))
    assert Kill(100, "TERM") in actions and Spawn(1) in actions


def test_recycle_is_ignored_while_stopping_or_for_unknown_workers() -> None:
    c = running()
    assert c.handle(Recycle(999, 1.0)) == []
    c.handle(Signal(SignalName.TERM, 2.0))
    assert c.handle(Recycle(100, 2.1)) == []


def test_a_successor_that_fails_to_boot_leaves_the_worker_serving() -> None:
    c = running()
    c.handle(Recycle(100, 10.0))
    c.handle(Spawned(0, 200, 10.0))
    actions = c.handle(Exited(200, 1, 10.2))
    assert not any(isinstance(a, Kill) for a in actions)
    assert 100 in c.workers and c.workers[100].stop_sent is None


@pytest.mark.parametrize("page", ["README.md", "docs/how-to/uvicorn-migration.md"])
def test_the_migration_line_means_what_uvicorn_means(page: str) -> None:
    text = (Path(__file__).parents[2] / page).read_text()
    theirs, ours = re.search(r"```sh\n(uvicorn app:app .*)\n(ebpf-sticky launch .*)\n```", text).groups()  # type: ignore[union-attr]
    assert ours.split()[2:] == theirs.split()[1:]  # the same words after the command
    args = build_parser().parse_args(ours.split()[1:])
    options = uvicorn_options.parse(args)
    assert (args.bind, args.workers) == ("0.0.0.0:443", 4)
    assert options.config == {"ssl_certfile": "cert.pem", "ssl_keyfile": "key.pem"}


def test_run_takes_uvicorn_run_keywords() -> None:
    keywords = {"access_log": True, "proxy_headers": False, "headers": [("X-A", "1"), "X-B: 2"],
                "reload": True, "reload_dirs": ["."], "limit_max_requests": 100}  # fmt: skip
    options = uvicorn_options.from_keywords(keywords, lambda name: None)
    headers = [["X-A", "1"], ["X-B", "2"]]
    assert options.config == {"access_log": True, "proxy_headers": False, "headers": headers}
    assert options.limit_max_requests == 100 and options.reload == Reload(dirs=(".",))
    with pytest.raises(ConfigError, match="run\\(\\) got workerz=: not a uvicorn option"):
        uvicorn_options.from_keywords({"workerz": 3}, lambda name: None)
