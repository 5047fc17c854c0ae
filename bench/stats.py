"""The benchmark's arithmetic, pure: medians over rounds and side-by-side ratios.

``Runs`` holds what one workload measured: for each contender, for each setting (a concurrency
level, a scenario), one row of figures per round, in round order. Rows of the same round were
measured back to back, so a ratio is taken within a round first ("side by side"), and only then
summarised over rounds: load from elsewhere on the machine then cancels out of each ratio.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import TypedDict

Row = dict[str, float | None]
Runs = dict[str, dict[str, list[Row]]]


class Spread(TypedDict):
    median: float
    min: float
    max: float
    n: int


def median(values: Iterable[float | None]) -> float | None:
    """The median of the known values (None: not observed in that round), None if there are none."""
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 4) if known else None


def summarize(runs: Runs) -> dict[str, dict[str, Row]]:
    """Per contender and setting: each figure's median over rounds."""
    return {
        name: {
            setting: {key: median(r[key] for r in rows) for key in rows[0]}
            for setting, rows in settings.items()
        }
        for name, settings in runs.items()
    }


def paired_ratios(ours: Sequence[Row], theirs: Sequence[Row], key: str) -> list[float]:
    """Round by round: our figure over theirs, skipping rounds where either is unknown or zero."""
    out = []
    for a, b in zip(ours, theirs, strict=True):
        x, y = a[key], b[key]
        if x is not None and y:
            out.append(x / y)
    return out


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def ratios(
    runs: Runs, key: str, ours: str, bases: Iterable[str], settings: Iterable[str] | None = None
) -> dict[str, Spread]:
    """``ours``' figure over each base's, per round and setting (pooled over ``settings``, all of
    them by default), then the median and range. Bases not in ``runs`` are left out."""
    out: dict[str, Spread] = {}
    for base in bases:
        if base == ours or base not in runs or ours not in runs:
            continue
        chosen = list(runs[ours]) if settings is None else list(settings)
        values = [v for s in chosen for v in paired_ratios(runs[ours][s], runs[base][s], key)]
        if (result := spread(values)) is not None:
            out[base] = result
    return out


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the (sorted) values lie; 0 for no values."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(int(len(sorted_values) * fraction), len(sorted_values) - 1)]


def per_thousand(cpu_seconds: float, count: float) -> float | None:
    """CPU seconds per 1000 units of work (connections, sessions, messages); None for no work."""
    return 1000 * cpu_seconds / count if count else None


def balance(per_worker: Sequence[float], workers: int) -> float | None:
    """The busiest worker's share over the mean share (1.0: perfectly even)."""
    total = sum(per_worker)
    return max(per_worker) / (total / workers) if total else None
