"""Prometheus metrics of a running group: `launch --metrics HOST:PORT` serves /metrics.

The figures come from two owners: the kernel's counters (read from the router when scraped) and
the supervisor's state (published by the master's loop after every turn). Turning figures into
families is pure.

The endpoint is served from the master's own select loop, with no thread: non-blocking sockets, at
most ``MAX_CONNECTIONS`` open (a newcomer beyond that evicts the oldest), each given
``REQUEST_TIMEOUT`` to send its request head and take the answer. A slow or idle client therefore
holds one fd for a few seconds at most, and a crowd of them never more than ``MAX_CONNECTIONS``
fds: the master's fds (which forks need) and threads stay flat however the port is abused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import platform
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .._version import __version__
from ..addresses import Bind
from ..errors import ConfigError
from ..kernel.router import Counters, Router
from ..sessions.master import MasterSessions, SessionFigures
from .core import Core, Reason

log = logging.getLogger("ebpf_sticky")


@dataclass(frozen=True)
class State:
    """What the supervisor knows that the kernel does not."""

    slots: int
    workers_ready: int = 0
    restarts: Mapping[tuple[int, Reason], int] = field(default_factory=dict)  # (slot, reason) -> count


def state_of(core: Core) -> State:
    snapshot = core.snapshot()
    return State(snapshot.slots, snapshot.ready, snapshot.restarts)


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
            value={"version": __version__, "python": platform.python_version()},
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
                "Share of the open connections from the top 3 source addresses "
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
        figures = (
            self.sessions.figures(self.router.slots, self.router.port) if self.sessions is not None else None
        )
        return families(self.router.loader, self.router.counters(), self.state, figures)


REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
MAX_HEAD = 8192


@dataclass
class _Scrape:
    sock: socket.socket
    opened: float
    inbox: bytes = b""
    outbox: bytes | None = None  # the whole answer, once the request head is complete


def response(head: bytes, registry: CollectorRegistry) -> bytes:
    """The HTTP/1.0 answer to one request head: the format its Accept header asks for, as
    prometheus_client's own server chooses it."""
    request_line, *header_lines = head.decode("latin-1").splitlines()
    method, _, rest = request_line.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    accept = next(
        (line.partition(":")[2].strip() for line in header_lines if line.lower().startswith("accept:")), ""
    )
    if method not in ("GET", "HEAD") or path not in ("/", "/metrics"):
        status, content, payload = "404 Not Found", "text/plain", b"not found: try /metrics\n"
    else:
        encoder, content = choose_encoder(accept)
        status, payload = "200 OK", encoder(registry)
    headers = f"HTTP/1.0 {status}\r\nContent-Type: {content}\r\nContent-Length: {len(payload)}\r\n"
    return (headers + "Connection: close\r\n\r\n").encode() + (payload if method == "GET" else b"")


class MetricsServer:
    """/metrics from the master's loop (see the module's docstring)."""

    def __init__(self, listener: socket.socket, exporter: Exporter) -> None:
        self.listener = listener
        self.exporter = exporter
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(exporter)
        self.scrapes: dict[socket.socket, _Scrape] = {}

    def publish(self, core: Core) -> None:
        self.exporter.publish(core)

    def readers(self) -> list[socket.socket]:
        return [self.listener, *(s for s, c in self.scrapes.items() if c.outbox is None)]

    def writers(self) -> list[socket.socket]:
        return [s for s, c in self.scrapes.items() if c.outbox is not None]

    def serve(self, readable: list[Any], writable: list[Any], now: float) -> None:
        if self.listener in readable:
            self._accept(now)
        for sock in [s for s in readable if s in self.scrapes]:
            self._read(self.scrapes[sock])
        for sock in [s for s in writable if s in self.scrapes]:
            self._write(self.scrapes[sock])
        for sock, scrape in list(self.scrapes.items()):
            if now - scrape.opened > REQUEST_TIMEOUT:
                self._close(sock)

    def _accept(self, now: float) -> None:
        for _ in range(MAX_CONNECTIONS):  # a bounded batch per turn: the loop has other work
            try:
                sock, _ = self.listener.accept()
            except OSError:  # nothing pending, or EMFILE and the like: the next turn may do better
                return
            sock.setblocking(False)
            if len(self.scrapes) >= MAX_CONNECTIONS:
                self._close(min(self.scrapes, key=lambda s: self.scrapes[s].opened))
            self.scrapes[sock] = _Scrape(sock, now)

    def _read(self, scrape: _Scrape) -> None:
        try:
            chunk = scrape.sock.recv(MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        scrape.inbox += chunk
        if not chunk or len(scrape.inbox) > MAX_HEAD:
            self._close(scrape.sock)
        elif b"\r\n\r\n" in scrape.inbox or b"\n\n" in scrape.inbox:
            scrape.outbox = response(scrape.inbox, self.registry)

    def _write(self, scrape: _Scrape) -> None:
        assert scrape.outbox is not None
        try:
            sent = scrape.sock.send(scrape.outbox)
        except BlockingIOError:
            return
        except OSError:
            sent = len(scrape.outbox)
        scrape.outbox = scrape.outbox[sent:]
        if not scrape.outbox:
            self._close(scrape.sock)

    def _close(self, sock: socket.socket) -> None:
        self.scrapes.pop(sock, None)
        sock.close()


def _listen(bind: Bind) -> socket.socket:
    listener = socket.socket(bind.family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind.host, bind.port))
        listener.listen(64)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--metrics {bind}: the port is in use: choose another one") from None
        raise ConfigError(f"--metrics {bind}: cannot listen there ({exc.strerror or exc})") from None
    return listener


@contextlib.contextmanager
def serve(bind: Bind, router: Router, listener: socket.socket | None = None) -> Iterator[MetricsServer]:
    """Listen for scrapes on ``bind`` (or on ``listener``, already bound there: the one an upgraded
    master carried over) until the block ends; the loop serves them."""
    listener = listener or _listen(bind)
    listener.setblocking(False)
    server = MetricsServer(listener, Exporter(router))
    log.info("metrics on http://%s/metrics", bind.with_port(listener.getsockname()[1]))
    try:
        yield server
    finally:
        for sock in list(server.scrapes):
            server._close(sock)
        listener.close()
