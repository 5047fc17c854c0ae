"""`launch --metrics`: a real Prometheus scrape of a launched group, checked against the traffic sent."""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.launcher import KEY, Instance, Load, launched, predicted, run_bad, wait_for
from support.netlab import v4_sources

from ebpf_sticky.supervisor import metrics

SOURCES = v4_sources(48, start=3000)
BASE = ["asgi_app.py", "-w", "3", "--bind", "127.0.0.1:0", "--hash-key", KEY, "--graceful-timeout", "5"]


def metrics_url(instance: Instance) -> str:
    match = re.search(r"metrics on (http://\S+/metrics)", instance.output())
    assert match, instance.output()
    return match.group(1)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by name and labels."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def routed(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], slots: int) -> list[float]:
    return [samples[("ebpf_sticky_connections_routed_total", (("slot", str(s)),))] for s in range(slots)]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_scrape_while_traffic_flows_matches_what_was_sent(how: str) -> None:
    env = {"EBPF_STICKY_METRICS": "127.0.0.1:0"} if how == "env" else {}
    with launched(BASE + (["--metrics", "127.0.0.1:0"] if how == "flag" else []), extra_env=env) as instance:
        url = metrics_url(instance)
        idle = scrape(url)
        assert routed(idle, 3) == [0, 0, 0]
        assert idle[("ebpf_sticky_slots", ())] == 3
        assert idle[("ebpf_sticky_workers_ready", ())] == 3
        assert idle[("ebpf_sticky_router_info", (("loader", "native"),))] == 1
        build = (("python", platform.python_version()), ("version", "0.1.0"))
        assert idle[("ebpf_sticky_build_info", build)] == 1
        with Load(instance.port, SOURCES) as load:
            load.wait_requests(100)
            during = scrape(url)  # the kernel counts at the SYN: never behind what was answered
            assert sum(routed(during, 3)) >= 100
        assert load.failures == []
        # Every request was a new connection from a known source, so the per-slot figures follow
        # from the Python mirror of the hash: one selection per connection, two for one that went
        # through SYN cookies (the program runs again on its ACK; a loaded machine turns them on).
        sent = Counter(predicted(source, 3) for source, hits in load.seen.items() for _ in hits)
        after = routed(scrape(url), 3)
        assert all(sent[slot] <= after[slot] <= 2 * sent[slot] for slot in range(3)), (after, sent)
        assert scrape(url)[("ebpf_sticky_routing_failures_total", ())] == 0


def test_restart_is_counted_by_slot_and_reason() -> None:
    with launched([*BASE, "--metrics", "127.0.0.1:0"]) as instance:
        url = metrics_url(instance)
        (victim,) = instance.slot_pids()[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: instance.slot_pids()[1] not in ([], [victim]), 30, "slot 1's new worker")
        wait_for(lambda: scrape(url)[("ebpf_sticky_workers_ready", ())] == 3, 30, "3 workers ready again")
        restarts = {
            labels: value for (name, labels), value in scrape(url).items()
            if name == "ebpf_sticky_worker_restarts_total"
        }  # fmt: skip
        assert restarts == {(("reason", "signal"), ("slot", "1")): 1}


def test_metrics_port_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run_bad([*BASE, "--metrics", f"127.0.0.1:{port}"], f"--metrics 127.0.0.1:{port}: the port is in use")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:9100", "--metrics 'localhost:9100': expected HOST:PORT"),
        ("127.0.0.1:99999", "--metrics '127.0.0.1:99999': port must be 0..65535"),
        ("::1:9100", "--metrics '::1:9100': write an IPv6 address in brackets"),
        # A well-formed address this machine does not have (TEST-NET-2, never routed).
        ("198.51.100.1:9100", "--metrics 198.51.100.1:9100: cannot listen there"),
    ],
    ids=["name", "port-range", "v6-brackets", "not-local"],
)
def test_metrics_bad_address(address: str, expected: str) -> None:
    run_bad([*BASE, "--metrics", address], expected)


def master_counts(pid: int) -> tuple[int, int]:
    """The master's open fds and threads."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = re.search(r"^Threads:\s+(\d+)$", status, re.M)
    assert threads
    return len(os.listdir(f"/proc/{pid}/fd")), int(threads.group(1))


def test_a_slow_loris_on_metrics_leaves_the_master_flat() -> None:
    """200 clients that send half a request head and wait: the master's fds grow by at most
    MAX_CONNECTIONS, its threads not at all, and a scrape meanwhile is still answered."""
    with launched([*BASE, "--metrics", "127.0.0.1:0"]) as instance:
        url = metrics_url(instance)
        port = int(url.split(":")[2].split("/")[0])
        scrape(url)
        before = master_counts(instance.proc.pid)
        lorises = []
        try:
            for _ in range(200):
                loris = socket.create_connection(("127.0.0.1", port), timeout=10)
                loris.sendall(b"GET /metrics HTTP/1.1\r\nHost: victim\r\n")  # never the blank line
                lorises.append(loris)
            during = [master_counts(instance.proc.pid)]
            assert routed(scrape(url), 3) == [0, 0, 0]  # answered in the crowd
            end = time.monotonic() + 2 * metrics.REQUEST_TIMEOUT
            while time.monotonic() < end:  # sample across a whole timeout, not one instant
                during.append(master_counts(instance.proc.pid))
                time.sleep(0.1)
        finally:
            for loris in lorises:
                loris.close()
        print(f"master fds/threads before {before}, during the slow-loris {max(during)}")
        assert max(fds for fds, _ in during) <= before[0] + metrics.MAX_CONNECTIONS + 1
        assert {threads for _, threads in during} == {before[1]}
        wait_for(lambda: master_counts(instance.proc.pid)[0] <= before[0], 30, "the lorises' fds closed")
