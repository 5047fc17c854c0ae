"""The metrics' families are a pure function of the figures: checked through the text format."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ebpf_sticky.kernel.router import Counters
from ebpf_sticky.sessions.master import SessionFigures
from ebpf_sticky.supervisor.core import Core, Ready, Reason, Spawned, Start
from ebpf_sticky.supervisor.metrics import State, families, state_of


def exposition(metrics: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    class Fixed(Collector):
        def collect(self) -> Iterable[Metric]:
            return metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_figure_has_its_sample() -> None:
    state = State(slots=3, workers_ready=2, restarts={(1, Reason.CRASH): 2, (0, Reason.SIGNAL): 1})
    samples = exposition(families("cbpf", Counters((5, 0, 7), 1), state))
    assert samples[("ebpf_sticky_connections_routed_total", (("slot", "0"),))] == 5
    assert samples[("ebpf_sticky_connections_routed_total", (("slot", "1"),))] == 0
    assert samples[("ebpf_sticky_connections_routed_total", (("slot", "2"),))] == 7
    assert samples[("ebpf_sticky_routing_failures_total", ())] == 1
    assert samples[("ebpf_sticky_worker_restarts_total", (("reason", "crash"), ("slot", "1")))] == 2
    assert samples[("ebpf_sticky_worker_restarts_total", (("reason", "signal"), ("slot", "0")))] == 1
    assert samples[("ebpf_sticky_workers_ready", ())] == 2
    assert samples[("ebpf_sticky_slots", ())] == 3
    assert samples[("ebpf_sticky_router_info", (("loader", "cbpf"),))] == 1


def test_state_counts_ready_workers_only() -> None:
    sup_core = Core(slots=2)
    sup_core.handle(Start(0.0))
    for slot, pid in ((0, 10), (1, 11)):
        sup_core.handle(Spawned(slot, pid, 0.0))
    sup_core.handle(Ready(10, 0.1))
    assert state_of(sup_core) == State(slots=2, workers_ready=1, restarts={})


def test_session_figures_have_their_samples() -> None:
    row = {"moved_out": 4, "moved_in": 3, "unknown": 2}
    sessions = SessionFigures((row, {**row, "moved_out": 0}), concentration=0.98)
    samples = exposition(families("native", Counters((1, 1), 0), State(slots=2), sessions))
    assert samples[("ebpf_sticky_session_moves_total", (("direction", "out"), ("slot", "0")))] == 4
    assert samples[("ebpf_sticky_session_moves_total", (("direction", "in"), ("slot", "1")))] == 3
    assert samples[("ebpf_sticky_session_moves_total", (("direction", "out"), ("slot", "1")))] == 0
    assert samples[("ebpf_sticky_session_unknown_keys_total", (("slot", "0"),))] == 2
    assert samples[("ebpf_sticky_top_sources_share", ())] == 0.98
    assert sessions.concentrated and not SessionFigures((row,), 0.98, forwarded=True).concentrated
    plain = exposition(families("native", Counters((1, 1), 0), State(slots=2)))
    assert not any(name.startswith("ebpf_sticky_session") for name, _ in plain)
