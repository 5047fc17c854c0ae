"""What an upgrading master hands its next image: the round trip through JSON loses nothing."""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.activation import SessionFds
from ebpf_sticky.addresses import Bind
from ebpf_sticky.config import Launch
from ebpf_sticky.errors import ConfigError
from ebpf_sticky.handover import Handover, Routing, launch_from_dict, launch_to_dict
from ebpf_sticky.hashing import HashSpec
from ebpf_sticky.options import WorkerOptions
from ebpf_sticky.options.model import Reload
from ebpf_sticky.supervisor.core import Carried

binds = st.one_of(
    st.builds(Bind, st.just("127.0.0.1"), st.integers(0, 65535), st.just(socket.AF_INET)),
    st.builds(Bind, st.just("::"), st.integers(0, 65535), st.just(socket.AF_INET6), st.booleans()),
)
specs = st.builds(HashSpec, st.binary(min_size=16, max_size=16), st.integers(0, 32), st.integers(0, 128))
texts = st.text(min_size=1, max_size=20)
option_settings: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "config": st.dictionaries(st.sampled_from(["ssl_keyfile_password", "timeout_keep_alive"]), texts),
        "env_file": st.none() | texts,
        "app_dir": st.none() | texts,
        "interface": st.sampled_from(["auto", "asgi3", "wsgi"]),
        "limit_max_requests": st.none() | st.integers(1, 10**6),
        "limit_max_requests_jitter": st.integers(0, 1000),
        "backlog": st.integers(1, 4096),
        "reload": st.none()
        | st.builds(Reload, dirs=st.tuples(texts), includes=st.tuples(texts), delay=st.floats(0, 5)),
    }
)
options = option_settings.map(lambda settings: WorkerOptions(**settings))
session_keys = st.lists(st.sampled_from(["mcp", "engineio", "header:x-session", "cookie:sid", "query:sid"]))


@st.composite
def launch_settings(draw: st.DrawFn) -> dict[str, Any]:
    """A value for every field of Launch (the round trip only proves what the settings exercise)."""
    command = draw(st.tuples() | st.tuples(texts, texts))
    return {
        "bind": draw(binds),
        "workers": draw(st.integers(1, 256)),
        "spec": draw(specs),
        "target": None if command else draw(texts),
        "command": command,
        "factory": draw(st.booleans()),
        "udp": bool(command) and draw(st.booleans()),
        "loader": draw(st.sampled_from(["auto", "native", "bcc", "cbpf"])),
        "graceful_timeout": draw(st.floats(0, 1e6)),
        "uid": draw(st.none() | st.integers(0, 65535)),
        "gid": draw(st.none() | st.integers(0, 65535)),
        "default_user": draw(st.booleans()),
        "pid_file": draw(st.none() | texts),
        "log_level": draw(st.sampled_from(["debug", "info", "warning"])),
        "uvicorn": draw(options) if not command else WorkerOptions(backlog=draw(st.integers(1, 4096))),
        "metrics": draw(st.none() | binds),
        "session_keys": () if command else tuple(draw(session_keys)),
        "proxy_protocol": not command and draw(st.booleans()),
    }


def launches() -> st.SearchStrategy[Launch]:
    return launch_settings().map(lambda settings: Launch(**settings))


@given(launch_settings())
def test_the_settings_drawn_cover_every_field_of_launch(settings: dict[str, Any]) -> None:
    # A field added to Launch fails here until the strategies set it, so the round trips below
    # cover it too (a field that travels but comes back as another type would otherwise pass).
    assert set(settings) == {f.name for f in dataclasses.fields(Launch)}


@given(option_settings)
def test_the_settings_drawn_cover_every_field_of_the_worker_options(settings: dict[str, Any]) -> None:
    assert set(settings) == {f.name for f in dataclasses.fields(WorkerOptions)}


@given(launches())
def test_launch_settings_survive_the_round_trip(launch: Launch) -> None:
    assert launch_from_dict(launch_to_dict(launch)) == launch


@given(
    launches(),
    st.lists(st.builds(Carried, st.integers(1, 2**22), st.integers(0, 255), st.booleans(), st.booleans())),
    st.none() | st.tuples(*[st.integers(3, 1000)] * 4),
    st.none()
    | st.builds(
        SessionFds,
        st.integers(3, 1000),
        st.lists(st.tuples(st.integers(3, 1000), st.integers(3, 1000))).map(tuple),
    ),
)
def test_handover_survives_the_round_trip(
    launch: Launch,
    workers: list[Carried],
    maps: tuple[int, int, int, int] | None,
    sessions: SessionFds | None,
) -> None:
    routing = Routing("native" if maps else "cbpf", (3, 4, 5), 292, 9 if maps else None, maps, 1)
    handover = Handover(launch, routing, 2, 1234.5, 10, "/run/x.sock", 11, "@n", 12, tuple(workers), sessions)
    assert Handover.from_json(handover.to_json()) == handover


def test_a_handover_without_sessions_reads_as_none() -> None:
    """An image from before the session layer was carried writes no "sessions": a new table then."""
    launch = Launch(Bind("127.0.0.1", 0, socket.AF_INET), 2, HashSpec(b"k" * 16), target="a:b")
    handover = Handover(launch, Routing("cbpf", (3, 4), 20), 1, 0.0, 10, "p", 11, "@n")
    data = json.loads(handover.to_json())
    del data["sessions"]
    assert Handover.from_json(json.dumps(data)) == handover


def test_the_new_image_validates_the_settings_again() -> None:
    data = launch_to_dict(Launch(Bind("127.0.0.1", 0, socket.AF_INET), 2, HashSpec(b"k" * 16), target="a:b"))
    data["graceful_timeout"] = -1  # what a newer version might refuse
    with pytest.raises(ConfigError, match="graceful-timeout"):
        launch_from_dict(data)


def test_every_carried_fd_is_listed_for_inheritance() -> None:
    launch = Launch(Bind("127.0.0.1", 0, socket.AF_INET), 2, HashSpec(b"k" * 16), target="a:b")
    sessions = SessionFds(13, ((14, 15), (16, 17)))
    handover = Handover(
        launch,
        Routing("native", (3, 4), 292, 9, (5, 6, 7, 8), 0),
        1,
        0.0,
        10,
        "p",
        11,
        "@n",
        12,
        (),
        sessions,
    )
    assert sorted(handover.fds()) == list(range(3, 18))
