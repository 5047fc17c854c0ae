"""What an upgrading master hands its next image: the round trip through JSON loses nothing."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
options = st.builds(
    WorkerOptions,
    config=st.dictionaries(st.sampled_from(["ssl_keyfile_password", "timeout_keep_alive"]), texts),
    env_file=st.none() | texts,
    backlog=st.integers(1, 4096),
    reload=st.none() | st.builds(Reload, dirs=st.tuples(texts), delay=st.floats(0, 5)),
)


@st.composite
def launches(draw: st.DrawFn) -> Launch:
    command = draw(st.tuples() | st.tuples(texts, texts))
    return Launch(
        bind=draw(binds),
        workers=draw(st.integers(1, 256)),
        spec=draw(specs),
        target=None if command else draw(texts),
        command=command,
        udp=bool(command) and draw(st.booleans()),
        graceful_timeout=draw(st.floats(0, 1e6)),
        uid=draw(st.none() | st.integers(0, 65535)),
        pid_file=draw(st.none() | texts),
        uvicorn=draw(options) if not command else WorkerOptions(backlog=draw(st.integers(1, 4096))),
        metrics=draw(st.none() | binds),
    )


@given(launches())
def test_launch_settings_survive_the_round_trip(launch: Launch) -> None:
    assert launch_from_dict(launch_to_dict(launch)) == launch


@given(
    launches(),
    st.lists(st.builds(Carried, st.integers(1, 2**22), st.integers(0, 255), st.booleans(), st.booleans())),
    st.none() | st.tuples(*[st.integers(3, 1000)] * 4),
)
def test_handover_survives_the_round_trip(
    launch: Launch, workers: list[Carried], maps: tuple[int, int, int, int] | None
) -> None:
    routing = Routing("native" if maps else "cbpf", (3, 4, 5), 292, 9 if maps else None, maps, 1)
    handover = Handover(launch, routing, 2, 1234.5, 10, "/run/x.sock", 11, "@n", 12, tuple(workers))
    assert Handover.from_json(handover.to_json()) == handover


def test_the_new_image_validates_the_settings_again() -> None:
    data = launch_to_dict(Launch(Bind("127.0.0.1", 0, socket.AF_INET), 2, HashSpec(b"k" * 16), target="a:b"))
    data["graceful_timeout"] = -1  # what a newer version might refuse
    with pytest.raises(ConfigError, match="graceful-timeout"):
        launch_from_dict(data)


def test_every_carried_fd_is_listed_for_inheritance() -> None:
    launch = Launch(Bind("127.0.0.1", 0, socket.AF_INET), 2, HashSpec(b"k" * 16), target="a:b")
    handover = Handover(
        launch, Routing("native", (3, 4), 292, 9, (5, 6, 7, 8), 0), 1, 0.0, 10, "p", 11, "@n", 12
    )
    assert sorted(handover.fds()) == list(range(3, 13))
