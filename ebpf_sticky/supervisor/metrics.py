"""Prometheus metrics of a running group: `launch --metrics HOST:PORT` serves /metrics.

The figures come from two owners: the kernel's counters (read from the router when scraped) and
the supervisor's state (published by the master's loop after every turn, so the HTTP thread never
reads the core while the loop changes it). Turning figures into families is pure.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .._version import __version__
from ..addresses import Bind
from ..errors import ConfigError
from ..kernel.router import Counters, Router
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


def families(loader: str, counters: Counters, state: State) -> list[Metric]:
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
        GaugeMetricFamily("ebpf_sticky_workers_ready", "Workers that said READY", value=state.workers_ready),
        GaugeMetricFamily("ebpf_sticky_slots", "Slots (listening sockets) in the group", value=state.slots),
        InfoMetricFamily("ebpf_sticky_router", "The router in use", value={"loader": loader}),
        InfoMetricFamily(
            "ebpf_sticky_build",
            "Version of ebpf-sticky and of the Python running it",
            value={"version": __version__, "python": platform.python_version()},
        ),
    ]


class Exporter(Collector):
    """The live source a scrape reads: the router's counters now, the loop's latest state."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.state = State(router.slots)

    def publish(self, core: Core) -> None:
        self.state = state_of(core)  # one reference swap: a scrape sees the old state or the new

    def collect(self) -> Iterable[Metric]:
        return families(self.router.loader, self.router.counters(), self.state)


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
