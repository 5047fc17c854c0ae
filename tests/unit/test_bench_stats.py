"""The benchmark's arithmetic (bench/stats.py): ratios are taken round by round, side
by side, before any median; unknown figures never count as zeros."""

from __future__ import annotations

import pytest

from bench.stats import (
    Runs,
    balance,
    median,
    paired_ratios,
    per_thousand,
    percentile,
    ratios,
    spread,
    summarize,
)


def rows(*values: float | None) -> list[dict[str, float | None]]:
    return [{"rate": v} for v in values]


def test_median_ignores_unknown_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None, None]) is None
    assert median([]) is None


def test_ratios_are_per_round_then_median() -> None:
    # Round 2 is slow for everyone (another job on the machine): per-round ratios stay 2.0,
    # whereas the ratio of the medians (4/3 = 1.33) would not.
    runs: Runs = {"ours": {"c": rows(4.0, 1.0, 4.0)}, "base": {"c": rows(2.0, 0.5, 3.0)}}
    got = ratios(runs, "rate", "ours", ["base"])
    assert got == {"base": {"median": 2.0, "min": 1.333, "max": 2.0, "n": 3}}


def test_ratios_pool_the_chosen_settings_only() -> None:
    runs: Runs = {
        "ours": {"a": rows(2.0), "b": rows(9.0)},
        "base": {"a": rows(1.0), "b": rows(1.0)},
    }
    assert ratios(runs, "rate", "ours", ["base"], ["a"])["base"]["median"] == 2.0
    assert ratios(runs, "rate", "ours", ["base"])["base"] == {"median": 5.5, "min": 2.0, "max": 9.0, "n": 2}


def test_ratios_skip_missing_bases_and_unknown_rounds() -> None:
    runs: Runs = {"ours": {"c": rows(2.0, None, 3.0)}, "base": {"c": rows(1.0, 1.0, 0.0)}}
    # Round 2: ours unknown; round 3: base zero. Only round 1 is a ratio.
    assert ratios(runs, "rate", "ours", ["base", "absent", "ours"]) == {
        "base": {"median": 2.0, "min": 2.0, "max": 2.0, "n": 1}
    }
    assert ratios({"ours": {"c": rows(None)}, "base": {"c": rows(1.0)}}, "rate", "ours", ["base"]) == {}


def test_paired_ratios_need_the_same_rounds() -> None:
    with pytest.raises(ValueError):
        paired_ratios(rows(1.0, 2.0), rows(1.0), "rate")


def test_spread_of_nothing_is_none() -> None:
    assert spread([]) is None


def test_summarize_takes_each_figures_median() -> None:
    runs: Runs = {
        "r": {"64": [{"rate": 1.0, "p99": None}, {"rate": 3.0, "p99": 5.0}, {"rate": 2.0, "p99": 7.0}]}
    }
    assert summarize(runs) == {"r": {"64": {"rate": 2.0, "p99": 6.0}}}


def test_percentile_balance_per_thousand() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([], 0.99) == 0.0
    assert balance([30, 10, 10, 10], 4) == 2.0
    assert balance([0, 0], 2) is None
    assert per_thousand(2.0, 4000) == 0.5
    assert per_thousand(1.0, 0) is None
