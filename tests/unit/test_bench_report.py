"""What the bench prints about the machine and the levers (bench/report.py, bench/levers.py)."""

from __future__ import annotations

from typing import Any

from bench.levers import markdown
from bench.report import load_line

BEFORE = {"load1": 4.2, "runnable": 6, "cores": 2}
AFTER = {"load1": 7.05, "runnable": 3, "cores": 2}


def test_the_load_line_shows_each_block_before_and_after() -> None:
    line = load_line([{"block": "http/python (fast)", "before": BEFORE, "after": AFTER}])
    assert line == (
        "Machine load (2 cores; 1-min load average before→after each block): "
        "http/python (fast) 4.2→7.0 (runnable 6→3)."
    )


def test_results_from_before_the_load_was_recorded_still_read() -> None:
    assert (
        load_line([{"before": "http/node", "load": 5.1}]) == "Machine load before each block: http/node (5.1)"
    )


def test_the_levers_table_has_both_sides_and_the_ratios_with_ranges() -> None:
    spread = {"median": 100.0, "min": 90.0, "max": 120.0, "n": 4}
    result: dict[str, Any] = {
        "date": "2026-12-01 17:00 UTC",
        "setup": "tree abc",
        "levers": {
            "access-log": {
                "describe": "--access-log (B)",
                "load": {"before": BEFORE, "after": AFTER},
                "cpu_us_per_conn": {"access-log:A": spread, "access-log:B": None},
                "cpu_ratio": {"median": 1.8, "min": 1.5, "max": 1.9, "n": 4},
                "rate_ratio": None,
            }
        },
    }
    row = markdown(result).splitlines()[-1]
    cells = ["access-log", "--access-log (B)", "100 (90–120)", "n/a", "1.800 (1.500–1.900)", "n/a", "4.2→7.0"]
    assert row == "| " + " | ".join(cells) + " |"
