"""One way in: `ebpf-sticky launch` and ``ebpf_sticky.run()`` build the same `Launch` through one
function, and ``run()`` reports bad input as ``ConfigError``, never argparse's SystemExit. No root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ebpf_sticky
from ebpf_sticky import api
from ebpf_sticky.cli import build_parser, launch_settings
from ebpf_sticky.config import Launch
from ebpf_sticky.errors import ConfigError

APP = str(Path(__file__).parents[1] / "e2e" / "apps" / "asgi_app.py")
KEY = "00112233445566778899aabbccddeeff"


def run_settings(monkeypatch: pytest.MonkeyPatch, **keywords: Any) -> Launch:
    """The `Launch` that ``run()`` would serve (``serve`` is where it would start the group)."""
    seen: list[Launch] = []

    def serve(launch: Launch) -> int:
        seen.append(launch)
        return 0

    monkeypatch.setattr(api, "serve", serve)
    assert ebpf_sticky.run(APP, hash_key=KEY, **keywords) == 0
    return seen[0]


def cli_settings(*flags: str) -> Launch:
    return launch_settings(build_parser().parse_args(["launch", APP, "--hash-key", KEY, *flags]), ())


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"loader": "ebpf"}, "--loader must be one of native, bcc, cbpf, auto"),
        ({"log_level": "loud"}, "--log-level must be one of"),
        ({"workers": "4"}, "--workers must be a whole number"),
        ({"workers": 0}, "--workers must be 1..256"),
        ({"graceful_timeout": "5"}, "--graceful-timeout must be a number"),
        ({"prefix4": 33}, "--prefix4 must be 0..32"),
        ({"bind": "localhost:80"}, "a numeric address"),
        ({"workerz": 3}, r"run\(\) got workerz=: not a uvicorn option"),
        ({"port": 8001}, r"run\(\) got port=: not a uvicorn option"),
        ({"access_log": "yes"}, r"run\(\) got access_log='yes': expected bool"),
        ({"limit_max_requests": True}, r"run\(\) got limit_max_requests=True: expected int"),
        ({"loop": "tokio"}, r"run\(\) got loop='tokio': expected one of auto, asyncio"),
        ({"ssl_keyfile": "key.pem"}, "--ssl-keyfile needs --ssl-certfile"),
        ({"user": "no-such-user-here"}, "no such user"),
    ],
)
def test_bad_run_arguments_raise_config_error(
    keywords: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_settings(monkeypatch, **keywords)


def test_a_bad_environment_twin_raises_config_error_from_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value, message in [
        ("WORKERS", "many", "EBPF_STICKY_WORKERS: expected a whole number, got 'many'"),
        ("ACCESS_LOG", "maybe", "EBPF_STICKY_ACCESS_LOG: expected true or false"),
        ("LOOP", "tokio", "EBPF_STICKY_LOOP: expected one of auto"),
    ]:
        with monkeypatch.context() as env:
            env.setenv(f"EBPF_STICKY_{name}", value)
            with pytest.raises(ConfigError, match=message):
                run_settings(monkeypatch)


def test_run_falls_back_to_the_environment_twins_as_launch_does(monkeypatch: pytest.MonkeyPatch) -> None:
    twins = {"WORKERS": "3", "TIMEOUT_KEEP_ALIVE": "7", "HEADER": "X-A: 1\nX-B: 2", "PROXY_HEADERS": "0"}
    for name, value in twins.items():
        monkeypatch.setenv(f"EBPF_STICKY_{name}", value)
    ours = run_settings(monkeypatch)
    assert ours == cli_settings()
    assert ours.workers == 3
    assert ours.uvicorn.config == {
        "timeout_keep_alive": 7,
        "headers": [["X-A", "1"], ["X-B", "2"]],
        "proxy_headers": False,
    }
    assert run_settings(monkeypatch, workers=2, timeout_keep_alive=1).workers == 2  # keywords win


# Options given both ways: (run() keyword, its value, the same as flags).
OPTIONS: dict[str, st.SearchStrategy[tuple[str, Any, list[str]]]] = {
    "workers": st.integers(1, 256).map(lambda n: ("workers", n, ["--workers", str(n)])),
    "loader": st.sampled_from(["auto", "native", "cbpf"]).map(lambda v: ("loader", v, ["--loader", v])),
    "prefix4": st.integers(0, 32).map(lambda n: ("prefix4", n, ["--prefix4", str(n)])),
    "prefix6": st.integers(0, 128).map(lambda n: ("prefix6", n, ["--prefix6", str(n)])),
    "graceful_timeout": st.floats(0, 1e6).map(
        lambda t: ("graceful_timeout", t, ["--graceful-timeout", repr(t)])
    ),
    "bind": st.sampled_from(["127.0.0.1:0", "[::]:8000", "0.0.0.0:443"]).map(
        lambda b: ("bind", b, ["--bind", b])
    ),
    "access_log": st.booleans().map(
        lambda b: ("access_log", b, ["--access-log" if b else "--no-access-log"])
    ),
    "timeout_keep_alive": st.integers(0, 100).map(
        lambda n: ("timeout_keep_alive", n, ["--timeout-keep-alive", str(n)])
    ),
    "loop": st.sampled_from(["auto", "asyncio"]).map(lambda v: ("loop", v, ["--loop", v])),
    "headers": st.lists(st.sampled_from([("X-A", "1"), ("X-B", "two")]), min_size=1).map(
        lambda hs: ("headers", hs, [f for h in hs for f in ("--header", f"{h[0]}:{h[1]}")])
    ),
    "limit_max_requests": st.integers(1, 10**6).map(
        lambda n: ("limit_max_requests", n, ["--limit-max-requests", str(n)])
    ),
}


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional=OPTIONS))
def test_run_and_launch_build_the_same_settings_or_the_same_error(
    given_options: dict[str, tuple[str, Any, list[str]]],
) -> None:
    keywords = {name: value for name, value, _ in given_options.values()}
    flags = [flag for _, _, option_flags in given_options.values() for flag in option_flags]
    with pytest.MonkeyPatch.context() as monkeypatch:
        if "workers" not in keywords:
            monkeypatch.setenv("EBPF_STICKY_WORKERS", "2")  # the CPU count may differ from cbpf's most
        assert outcome(lambda: run_settings(monkeypatch, **keywords)) == outcome(lambda: cli_settings(*flags))


def outcome(build: Callable[[], Launch]) -> Launch | str:
    """The settings, or the error's message: both ways in must agree on each."""
    try:
        return build()
    except ConfigError as exc:
        return str(exc)
