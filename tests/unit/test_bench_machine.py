"""What a result says about where it was measured (bench/machine.py): the tree's changes from
`git status --porcelain`, the load from /proc."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.machine import changed_paths, parse_loadavg, parse_runnable, tree

PORCELAIN = """ M ebpf_sticky/kernel/router.py
R  scripts/bench.d/stats.py -> bench/stats.py
?? bench/results/2026-12-01.json
?? notes.txt
"""


def test_changed_paths_name_the_new_side_of_a_rename_and_skip_the_results() -> None:
    assert changed_paths(PORCELAIN, Path("bench/results")) == [
        "ebpf_sticky/kernel/router.py",
        "bench/stats.py",
        "notes.txt",
    ]


def test_a_clean_status_has_no_changes() -> None:
    assert changed_paths("", Path("bench/results")) == []


def test_the_tree_of_a_fresh_repository_is_its_commit_and_turns_dirty_with_an_edit(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True
        ).stdout

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = git("rev-parse", "HEAD").strip()
    assert tree(tmp_path) == {"commit": head, "dirty": False, "changed": []}
    (tmp_path / "a.txt").write_text("b\n")
    assert tree(tmp_path) == {"commit": head, "dirty": True, "changed": ["a.txt"]}


def test_loadavg_and_runnable_parse_the_proc_files() -> None:
    assert parse_loadavg("3.50 1.28 0.50 12/162 21300\n") == 3.5
    assert parse_runnable("cpu  1 2 3\nctxt 99\nprocs_running 7\nprocs_blocked 0\n") == 7
    with pytest.raises(ValueError, match="procs_running"):
        parse_runnable("cpu 1 2 3\n")


@given(
    st.floats(min_value=0, max_value=1e4, allow_nan=False).map(lambda x: round(x, 2)), st.integers(0, 10**6)
)
def test_loadavg_round_trips(load1: float, running: int) -> None:
    assert parse_loadavg(f"{load1:.2f} 0.00 0.00 {running}/900 1\n") == load1
    assert parse_runnable(f"procs_running {running}\n") == running


def test_this_machine_reports_a_load() -> None:
    assert parse_loadavg(Path("/proc/loadavg").read_text()) >= 0
    assert parse_runnable(Path("/proc/stat").read_text()) >= 1  # this process is running
