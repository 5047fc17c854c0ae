"""The workloads: each module defines one ``Workload`` (what it runs, against which routers, how
it reports). A new workload is a new module here, listed in ``WORKLOADS``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..common import Contender, Settings
from ..plots import BarChart
from ..routers import Worker

Block = dict[str, Any]


@dataclass(frozen=True)
class Workload:
    name: str  # the results JSON's key
    workers: Callable[[Settings], list[Worker]]
    contenders: Callable[[Settings, Worker], list[Contender]]
    run: Callable[[Settings, Worker, list[Contender]], Block]
    report: Callable[[str, Block], list[str]]  # (worker label, block) -> markdown lines
    charts: Callable[[dict[str, Block]], list[BarChart]]  # every worker's block -> plots
