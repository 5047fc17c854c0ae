"""``strace -c``'s summary table read into syscalls per connection (bench/strace.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.strace import Calls, parse_summary, per_connection

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 30.45    0.049891          20      2481           close
 22.88    0.037493          15      2481           writev
 14.08    0.023070           3      7347      2385 epoll_ctl
  8.60    0.014086           5      2491        10 accept4
  0.11    0.000188           3        58           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.163854           5     14858      2395 total
"""


def test_rows_with_and_without_errors() -> None:
    rows = parse_summary(SUMMARY)
    assert set(rows) == {"close", "writev", "epoll_ctl", "accept4", "getpid"}
    assert rows["epoll_ctl"] == {"calls": 7347, "errors": 2385}
    assert rows["close"] == {"calls": 2481, "errors": 0}


def test_counts_are_per_successful_accept_and_failures_apart() -> None:
    calls = per_connection(parse_summary(SUMMARY))
    assert calls["accept4"] == 1.0
    assert calls["accept4!"] == 10 / 2481
    assert calls["epoll_ctl"] == (7347 - 2385) / 2481
    assert calls["epoll_ctl!"] == 2385 / 2481
    assert calls["getpid"] == 58 / 2481


def test_nothing_accepted_gives_no_figures() -> None:
    assert per_connection({"read": {"calls": 5, "errors": 0}}) == {}


names = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True).filter(lambda n: n != "total")
rows = st.dictionaries(
    names,
    st.tuples(st.integers(1, 10**9), st.integers(0, 10**9)).map(
        lambda t: Calls(calls=max(t), errors=min(t) if min(t) < max(t) else 0)
    ),
    max_size=20,
)


@given(rows)
def test_any_table_strace_prints_reads_back(table: dict[str, Calls]) -> None:
    lines = ["% time     seconds  usecs/call     calls    errors syscall", "------ ----------- -----------"]
    for name, row in table.items():
        errors = str(row["errors"]) if row["errors"] else ""
        lines.append(f"  1.00    0.000100           1 {row['calls']:>9} {errors:>9} {name}")
    lines.append("100.00    0.000100           1         1           total")
    assert parse_summary("\n".join(lines)) == table
