"""PNG plots of a results JSON. Workloads describe their charts as data (``BarChart``); this
module alone touches matplotlib, imported only when plots are written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    names: list[str]  # one group of bars per name (a router)
    series: dict[str, list[float | None]]  # legend label -> one value per name


@dataclass(frozen=True)
class BarChart:
    name: str  # the file is <stamp>-<name>.png
    panels: list[Panel]


def _bars(ax: Any, panel: Panel) -> None:
    width = 0.8 / len(panel.series)
    for i, (label, values) in enumerate(panel.series.items()):
        xs = [x + i * width for x in range(len(panel.names))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label)
    middle = width * (len(panel.series) - 1) / 2
    ax.set_xticks([x + middle for x in range(len(panel.names))], panel.names, rotation=30, ha="right")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
    if len(panel.series) > 1:
        ax.legend(fontsize=8)


def render(charts: list[BarChart], remap: list[dict[str, Any]], out_dir: Path, stamp: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> Path:
        path = out_dir / f"{stamp}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    written = []
    for chart in charts:
        fig, axes = plt.subplots(1, len(chart.panels), figsize=(6 * len(chart.panels), 4.2), squeeze=False)
        for ax, panel in zip(axes[0], chart.panels, strict=True):
            _bars(ax, panel)
        written.append(save(fig, chart.name))
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in remap]
    ax.plot(ns, [r["sticky_session_modulo"] for r in remap], "s-", label="sticky-session (hash % N)")
    ax.plot(ns, [r["ebpf_sticky"] for r in remap], "o-", label="ebpf-sticky (consistent table)")
    ax.plot(ns, [r["ideal"] for r in remap], "k--", label="ideal 1/(N+1)")
    ax.set_xlabel("workers N → N+1")
    ax.set_ylabel("fraction of clients moved")
    ax.set_ylim(0, 1)
    ax.legend()
    return [*written, save(fig, "remap")]
