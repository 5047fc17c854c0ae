"""Markdown for a results JSON: table and ratio helpers the workloads use, and the sections on the
kernel and the hash that every run has."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .stats import Spread


def cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def ratio_line(spreads: Mapping[str, Spread]) -> str:
    """ "vs nginx-ip-hash **1.2×** (0.9–1.4, 9)": median of per-round ratios, range, how many."""
    return ", ".join(
        f"vs {base} **{s['median']}×** ({s['min']}–{s['max']}, n={s['n']})" for base, s in spreads.items()
    )


def kernel_section(kernel: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            name,
            cell(k.get("launch_to_serving_s"), 3),
            cell(k.get("loader")),
            cell(k.get("master_rss_kib")),
            cell(k.get("run_cnt")),
            cell(k.get("ns_per_selection"), 1),
        ]
        for name, k in kernel.items()
        if name not in ("floor", "instructions")
    ]
    lines = [
        "## Kernel",
        "",
        *table(
            [
                "router/worker",
                "launch to serving s",
                "loader",
                "master RSS KiB",
                "selections",
                "ns per selection",
            ],
            rows,
        ),
        "",
    ]
    if sizes := kernel.get("instructions"):
        lines += [
            "Program size: " + ", ".join(f"{loader} {n} instructions" for loader, n in sizes.items()),
            "",
        ]
    if floor := kernel.get("floor"):
        lines += [
            "Same connections, same machine, one after another: an empty program "
            f"{floor['empty_program_ns']} ns, reading the address and selecting a socket only "
            f"{floor['load_and_select_ns']} ns, the full program {floor['full_program_ns']} ns "
            "per selection.",
            "",
        ]
    return lines


def hash_section(h: Mapping[str, Any]) -> list[str]:
    balance = ", ".join(
        f"{n} ({b['addresses']} addresses) max/mean {b['max_over_mean']}" for n, b in h["balance"].items()
    )
    cbpf = "ebpf_sticky_cbpf" in h["remap"][0]
    rows = [
        [
            f"{r['n']}→{r['n'] + 1}",
            str(r["ideal"]),
            str(r["ebpf_sticky"]),
            *([str(r["ebpf_sticky_cbpf"])] if cbpf else []),
            str(r["sticky_session_modulo"]),
        ]
        for r in h["remap"]
    ]
    header = [
        "N→N+1",
        "ideal",
        "ebpf-sticky moved",
        *(["cbpf moved"] if cbpf else []),
        "sticky-session modulo moved",
    ]
    return [
        "## Hash",
        "",
        f"{h['buckets']} buckets, 8 slots: {balance}",
        "",
        *table(header, rows),
        "",
        "sticky-session's hash over 10 workers: the busiest got "
        f"{h['sticky_session_max_share_10_workers']:.1%} of 100k random IPv4 (ideal 10%)",
        "",
    ]


def load_line(blocks: Sequence[Mapping[str, Any]]) -> str:
    """How loaded the machine was around each block: 1-min load average before→after and the
    processes runnable at those instants, against the number of cores."""
    if not blocks:
        return ""
    if "block" not in blocks[0]:  # results from before the load was recorded around each block
        return "Machine load before each block: " + ", ".join(f"{b['before']} ({b['load']})" for b in blocks)
    cores = blocks[0]["before"]["cores"]
    parts = [
        f"{b['block']} {b['before']['load1']:.1f}→{b['after']['load1']:.1f} "
        f"(runnable {b['before']['runnable']}→{b['after']['runnable']})"
        for b in blocks
    ]
    return (
        f"Machine load ({cores} cores; 1-min load average before→after each block): " + ", ".join(parts) + "."
    )
