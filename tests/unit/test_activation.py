"""Fds handed in at start (LISTEN_FDS): what each is for, from the environment alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebpf_sticky.activation import (
    KEY_NAME,
    MAP_ROLES,
    SESSIONS_NAME,
    HandedProgram,
    SessionFds,
    handoff_name,
    listen_fds,
    map_name,
    program_name,
    slot_name,
    sort_handed,
)
from ebpf_sticky.errors import ConfigError


def test_fds_start_at_3_and_take_their_names() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env, 42) == [(3, "a"), (4, "b"), (5, "unknown")]


@pytest.mark.parametrize("env", [{}, {"LISTEN_PID": "41", "LISTEN_FDS": "2"}, {"LISTEN_PID": "42"}])
def test_fds_meant_for_another_process_or_none_are_ignored(env: dict[str, str]) -> None:
    assert listen_fds(env, 42) == []


def test_a_malformed_count_says_so() -> None:
    with pytest.raises(ConfigError, match="LISTEN_FDS"):
        listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "x"}, 1)


@given(st.integers(0, 20), st.booleans(), st.booleans(), st.integers(0, 20), st.randoms())
def test_a_stored_group_is_sorted_back_in_any_order(
    slots: int, key: bool, program: bool, channels: int, rnd: object
) -> None:
    names = [slot_name(i) for i in range(slots)]
    names += [KEY_NAME] if key else []
    names += [program_name("native", 292), *map(map_name, MAP_ROLES)] if program else []
    ends = [handoff_name(i, end) for i in range(channels) for end in ("receive", "send")]
    names += [SESSIONS_NAME, *ends] if channels else []
    fds = list(zip(range(3, 3 + len(names)), names, strict=True))
    rnd.shuffle(fds)  # type: ignore[attr-defined]
    handed = sort_handed(fds)
    by_name = {name: fd for fd, name in fds}
    assert handed.slots == [by_name[slot_name(i)] for i in range(slots)]
    assert handed.key == (by_name[KEY_NAME] if key else None)
    assert handed.foreign == []
    expected = None
    if program:
        socks, table, live, counters = (by_name[map_name(role)] for role in MAP_ROLES)
        expected = HandedProgram(
            "native", 292, by_name[program_name("native", 292)], (socks, table, live, counters)
        )
    assert handed.program == expected
    assert handed.sessions == (
        SessionFds(
            by_name[SESSIONS_NAME],
            tuple(
                (by_name[handoff_name(i, "receive")], by_name[handoff_name(i, "send")])
                for i in range(channels)
            ),
        )
        if channels
        else None
    )


def test_a_socket_units_fds_are_foreign_in_their_order() -> None:
    assert sort_handed([(3, "web.socket"), (4, "unknown")]).foreign == [3, 4]


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ([slot_name(0), slot_name(2)], "not 0..1"),
        ([slot_name(0), "web.socket"], "one or the other"),
        ([slot_name(0), program_name("native", 292), map_name("socks")], "without all its maps"),
        ([slot_name(0), SESSIONS_NAME, handoff_name(0, "receive")], "without every handoff socket"),
        ([slot_name(0), SESSIONS_NAME, handoff_name(1, "receive"), handoff_name(1, "send")], "handoff"),
        ([slot_name(0), handoff_name(0, "receive"), handoff_name(0, "send")], "handoff"),
    ],
)
def test_an_incomplete_store_is_refused_with_the_fix(names: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sort_handed(list(enumerate(names, start=3)))
