"""Prometheus metrics of a running group: `launch --metrics HOST:PORT` serves /metrics.

The figures come from two owners: the kernel's counters (read from the router when scraped) and
the supervisor's state (published by the master's loop after every turn, so the HTTP thread never
reads the core while the loop changes it). Turning figures into families is pure.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from ..addresses import Bind
from ..errors import ConfigError
from ..kernel.router import Counters, Router
from ..sessions.master import MasterSessions, SessionFigures
from .core import Core

log = logging.getLogger("ebpf_sticky")


@dataclass(frozen=True)
class State:
    """What the supervisor knows that the kernel does not."""

    slots: int
    workers_ready: int = 0
    restarts: Mapping[tuple[int, str], int] = field(default_factory=dict)  # (slot, reason) -> count


def state_of(core: Core) -> State:
    return State(core.slots, sum(worker.ready for worker in core.workers.values()), dict(core.restarts))


@functools.cache  # the installed version does not change while the master runs: look it up once
def _build_version() -> str:
    try:
        return version("ebpf-sticky")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def families(
    loader: str, counters: Counters, state: State, sessions: SessionFigures | None = None
) -> list[Metric]:
    """Every metric of one scrape; pure."""
    routed = CounterMetricFamily(
        "ebpf_sticky_connections_routed",
        "Connections (datagrams with --udp) the kernel program sent to each slot",
        labels=["slot"],
    )
    for slot, count in enumerate(counters.per_slot):
        if count is not None:  # a router that cannot count a slot leaves it out
            routed.add_metric([str(slot)], count)
    failures = CounterMetricFamily(
        "ebpf_sticky_routing_failures",
        "Selections the program could not make (the kernel's own hash picked instead)",
        value=counters.failures,
    )
    restarts = CounterMetricFamily(
        "ebpf_sticky_worker_restarts", "Workers replaced, by slot and reason", labels=["slot", "reason"]
    )
    for (slot, reason), count in sorted(state.restarts.items()):
        restarts.add_metric([str(slot), reason], count)
    return [
        routed,
        failures,
        restarts,
        *(session_families(sessions) if sessions is not None else []),
        GaugeMetricFamily("ebpf_sticky_workers_ready", "Workers that said READY", value=state.workers_ready),
        GaugeMetricFamily("ebpf_sticky_slots", "Slots (listening sockets) in the group", value=state.slots),
        InfoMetricFamily("ebpf_sticky_router", "The router in use", value={"loader": loader}),
        InfoMetricFamily(
            "ebpf_sticky_build",
            "Version of ebpf-sticky and of the Python running it",
            value={"version": _build_version(), "python": platform.python_version()},
        ),
    ]


def session_families(sessions: SessionFigures) -> list[Metric]:
    moved = CounterMetricFamily(
        "ebpf_sticky_session_moves",
        "Requests handed to the slot owning their session, by slot and direction (out, in)",
        labels=["slot", "direction"],
    )
    unknown = CounterMetricFamily(
        "ebpf_sticky_session_unknown_keys",
        "Requests whose session key no worker issued (served where they landed)",
        labels=["slot"],
    )
    for slot, row in enumerate(sessions.per_slot):
        moved.add_metric([str(slot), "out"], row["moved_out"])
        moved.add_metric([str(slot), "in"], row["moved_in"])
        unknown.add_metric([str(slot)], row["unknown"])
    metrics: list[Metric] = [moved, unknown]
    if sessions.concentration is not None:
        metrics.append(
            GaugeMetricFamily(
                "ebpf_sticky_top_sources_share",
                "Share of recent connections from each worker's top 3 source addresses "
                "(near 1: a proxy in front hides the clients)",
                value=sessions.concentration,
            )
        )
    return metrics


class Exporter(Collector):
    """The live source a scrape reads: the router's counters now, the loop's latest state."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.state = State(router.slots)
        self.sessions: MasterSessions | None = None  # set by the loop when the layer is on

    def publish(self, core: Core) -> None:
        self.state = state_of(core)  # one reference swap: a scrape sees the old state or the new

    def collect(self) -> Iterable[Metric]:
        figures = self.sessions.figures(self.router.slots) if self.sessions is not None else None
        return families(self.router.loader, self.router.counters(), self.state, figures)


@contextlib.contextmanager
def serve(bind: Bind, router: Router) -> Iterator[Exporter]:
    """Serve /metrics on ``bind`` from a thread of the master until the block ends."""
    exporter = Exporter(router)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    try:
        server, thread = start_http_server(bind.port, bind.host, registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--metrics {bind}: the port is in use: choose another one") from None
        raise ConfigError(f"--metrics {bind}: cannot listen there ({exc.strerror or exc})") from None
    log.info("metrics on http://%s/metrics", bind.with_port(server.server_port))
    try:
        yield exporter
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
