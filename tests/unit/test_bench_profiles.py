"""py-spy's collapsed stacks summarised into a "top" table (bench/profiles.py)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from bench.profiles import is_idle, parse_collapsed, summarize

RAW = """\
<module> (worker.py:1);run (asyncio/runners.py:118);select (selectors.py:468) 60
<module> (worker.py:1);run (asyncio/runners.py:118);_accept_connection (asyncio/selector_events.py:170) 10
<module> (worker.py:1);run (asyncio/runners.py:118);data_received (httptools_impl.py:140);send (app.py:9) 25
<module> (worker.py:1);run (asyncio/runners.py:118);data_received (httptools_impl.py:140) 15
not a stack line
"""


def test_collapsed_stacks_parse_outermost_first_with_their_counts() -> None:
    stacks = parse_collapsed(RAW)
    assert sum(stacks.values()) == 110
    assert (
        stacks[("<module> (worker.py:1)", "run (asyncio/runners.py:118)", "select (selectors.py:468)")] == 60
    )


def test_idle_samples_are_left_out_and_shares_are_of_busy_samples() -> None:
    summary = summarize(parse_collapsed(RAW))
    assert summary["samples"] == 50
    assert summary["idle_pct"] == round(100 * 60 / 110, 1)
    top = {line["function"]: line for line in summary["top"]}
    assert top["send (app.py:9)"]["self_pct"] == 50.0
    assert top["data_received (httptools_impl.py:140)"] == {
        "function": "data_received (httptools_impl.py:140)",
        "self_pct": 30.0,
        "total_pct": 80.0,
    }
    assert [line["function"] for line in summary["top"]][0] == "send (app.py:9)"


def test_uvloops_native_poll_is_idle_and_a_syscall_that_does_work_is_not() -> None:
    loop = ("run_forever (loop.c:33192)", "uv_run (core.c:464)")
    assert is_idle((*loop, "epoll_pwait (libc.so.6)"))
    assert not is_idle((*loop, "write (libc.so.6)"))
    assert not is_idle((*loop, "epoll_ctl (libc.so.6)"))


def test_no_samples_summarise_to_zeros() -> None:
    assert summarize(Counter()) == {"samples": 0, "idle_pct": 0.0, "top": []}


frames = st.sampled_from(["a (x.py:1)", "b (y.py:2)", "c (z.py:3)", "select (selectors.py:468)"])
stacks = st.dictionaries(
    st.lists(frames, min_size=1, max_size=5).map(tuple), st.integers(1, 1000), max_size=12
)


@given(stacks)
def test_shares_are_bounded_and_self_never_exceeds_total(raw: dict[tuple[str, ...], int]) -> None:
    text = "".join(f"{';'.join(stack)} {n}\n" for stack, n in raw.items())
    assert parse_collapsed(text) == Counter(raw)
    summary = summarize(Counter(raw), keep=100)
    busy = sum(n for stack, n in raw.items() if not is_idle(stack))
    assert summary["samples"] == busy
    assert 0 <= summary["idle_pct"] <= 100
    for line in summary["top"]:
        assert 0 <= line["self_pct"] <= line["total_pct"] <= 100
    if busy:
        assert abs(sum(line["self_pct"] for line in summary["top"]) - 100) < 0.1 * len(summary["top"]) + 0.1
