"""Beyond one host: clients → nftables balancer (jhash of the client address) → two ebpf-sticky hosts.

The lab (lab/multihost.py) runs everything in network namespaces of its own: 200 clients (and
100 IPv6 ones), each from its own address, keep their Socket.IO session on one host and one
worker; a room broadcast crosses hosts through Redis exactly once; draining a host moves its
clients and nobody else's.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.launcher import KEY
from support.sio_clients import Member, SwarmResult, node_swarm, python_swarm, wait_async

from ebpf_sticky.hashing import HashSpec, parse_address, slot_of
from lab import multihost
from lab.multihost import NETNS_DIR, SERVICE, Lab, client_sources, main

SPEC = HashSpec(bytes.fromhex(KEY))
SOURCES = client_sources(200)
SOURCES6 = client_sources(100, 6)
URL = SERVICE.url()
WORKERS = 4


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # A name of its own: other runs of this test may be building their labs at the same time.
    args = ["--hash-key", KEY, "--graceful-timeout", "5"]
    with Lab.running(f"sticky-{uuid.uuid4().hex[:6]}", WORKERS, args) as running:
        yield running


def test_down_cleans_up_a_half_built_lab() -> None:
    # As if `scripts/lab up` had died after Redis: `scripts/lab down` finds what it left by name.
    lab = Lab(f"sticky-{uuid.uuid4().hex[:6]}")
    try:
        lab.build()
        lab.start_redis()
    finally:
        assert main(["--name", lab.name, "down"]) == 0
    assert lab.started[0].wait(10) is not None
    assert not [node for node in lab.topology.nodes if (NETNS_DIR / lab.netns(node)).exists()]
    assert not lab.logs.exists()


def test_the_lab_command_refuses_bad_input(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        ("--name", lab.name, "up"): f"a lab named {lab.name!r} exists: `scripts/lab down` first",
        ("--name", "sticky-none", "drain", "host-a"): "no lab named 'sticky-none': `scripts/lab up` first",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2
        assert capsys.readouterr().err == f"scripts/lab: error: {message}\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["drain", "host-c"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'host-c'" in capsys.readouterr().err
    nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
    script = Path(multihost.__file__)
    proc = subprocess.run(
        [*nobody, sys.executable, str(script), "up"], capture_output=True, text=True, cwd="/"
    )
    assert (proc.returncode, proc.stderr) == (
        3,
        "scripts/lab: error: the lab needs root (network namespaces, nftables): run it with sudo\n",
    )


def percentiles(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (
        f"p50 {statistics.median(ms):.1f} ms, p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms"
    )


def test_every_session_stays_on_one_host_and_one_worker(lab: Lab) -> None:
    runs: dict[str, SwarmResult] = {}
    for name, swarm in (("python-socketio", python_swarm), ("node socket.io-client", node_swarm)):
        for transports in (["polling"], ["polling", "websocket"]):
            label = f"{name} {'→'.join(transports)}"
            runs[label] = lab.run_in(SERVICE.clients, functools.partial(swarm, URL, SOURCES, transports))
            assert (runs[label].ok, runs[label].failed) == (len(SOURCES), 0), (label, runs[label].errors[:5])
    print(f"sessions kept: {sum(r.ok for r in runs.values())}/{len(runs) * len(SOURCES)} ({', '.join(runs)})")
    # Every session, whatever the client and transport, lands on the same host and worker: the
    # balancer hashed the address and kept it, and the host's program hashed it again.
    first = next(iter(runs.values()))
    for label, result in runs.items():
        assert result.hosts == first.hosts, label
        assert result.workers == first.workers, label
    for source in SOURCES:
        assert int(first.workers[source]) == slot_of(parse_address(source), SPEC, WORKERS), source
    per_host = Counter(first.hosts.values())
    print(f"clients per host: {dict(per_host)}")
    assert set(per_host) == set(SERVICE.hosts)
    for host in SERVICE.hosts:
        assert {first.workers[s] for s in SOURCES if first.hosts[s] == host} == {
            str(w) for w in range(WORKERS)
        }


def test_ipv6_clients_keep_their_sessions_too(lab: Lab) -> None:
    # The hosts listen on [::]:8000, dual-stack; IPv6 clients come through the balancer's ip6 rule.
    runs = [
        lab.run_in(SERVICE.clients, functools.partial(swarm, SERVICE.url(6), SOURCES6, transports))
        for swarm, transports in ((python_swarm, ["polling", "websocket"]), (node_swarm, ["polling"]))
    ]
    for result in runs:
        assert (result.ok, result.failed) == (len(SOURCES6), 0), result.errors[:5]
    print(f"IPv6 sessions kept: {sum(r.ok for r in runs)}/{2 * len(SOURCES6)}")
    assert runs[0].hosts == runs[1].hosts and runs[0].workers == runs[1].workers
    assert set(runs[0].hosts.values()) == set(SERVICE.hosts)
    for source in SOURCES6:
        assert int(runs[0].workers[source]) == slot_of(parse_address(source), SPEC, WORKERS), source


def test_room_broadcast_reaches_every_client_once_across_hosts(lab: Lab) -> None:
    rounds = 5

    async def scenario() -> None:
        members = [Member(source) for source in SOURCES]
        await asyncio.gather(*(m.start(URL) for m in members))
        try:
            by_host = {host: [m for m in members if m.home["host"] == host] for host in SERVICE.hosts}
            assert all(by_host.values()), {host: len(ms) for host, ms in by_host.items()}
            latency: dict[str, list[float]] = {"same host": [], "other host": []}
            for k in range(rounds):
                sender = by_host[SERVICE.hosts[k % len(SERVICE.hosts)]][k]
                sent = time.monotonic()
                await sender.client.call("say", {"room": "all", "text": f"m{k}"}, timeout=15)
                await wait_async(lambda k=k: all(len(m.heard) > k for m in members), 30, f"m{k} everywhere")
                for member in members:
                    where = "same host" if member.home["host"] == sender.home["host"] else "other host"
                    latency[where].append(member.heard_at[k] - sent)
            # Once everyone has the sentinel, each earlier message had every chance to come twice.
            await members[0].client.call("say", {"room": "all", "text": "sentinel"}, timeout=15)
            await wait_async(
                lambda: all(len(m.heard) > rounds for m in members), 30, "the sentinel everywhere"
            )
            expected = [f"m{k}" for k in range(rounds)] + ["sentinel"]
            for member in members:
                assert [m["text"] for m in member.heard] == expected, member.source
            for where, values in latency.items():
                print(f"broadcast fan-out to 200 clients, {where} as the sender: {percentiles(values)}")
        finally:
            await asyncio.gather(*(m.stop() for m in members))

    lab.run_in(SERVICE.clients, lambda: asyncio.run(scenario()))


@pytest.mark.parametrize("breakage", ["random balancer", "snat"])
def test_negative_controls_what_breaks_it(lab: Lab, breakage: str) -> None:
    # The lab can tell: a balancer that ignores the client address splits long-polling sessions
    # across hosts; SNAT at the balancer keeps sessions but puts every client of a host on one worker.
    sources = SOURCES[:60]
    try:
        if breakage == "random balancer":
            lab.balance(random=True)
            result = lab.run_in(SERVICE.clients, lambda: python_swarm(URL, sources, ["polling"], timeout=3))
            print(f"random balancer: {result.failed}/{len(sources)} sessions failed")
            assert result.failed > 0
        else:
            lab.balance(snat=True)
            result = lab.run_in(SERVICE.clients, lambda: python_swarm(URL, sources, ["polling"]))
            assert (result.ok, result.failed) == (len(sources), 0), result.errors[:5]
            workers = {
                host: {result.workers[s] for s in sources if result.hosts[s] == host}
                for host in SERVICE.hosts
            }
            print(f"SNAT: every session kept, workers used per host {workers}")
            assert all(len(used) == 1 for used in workers.values() if used)
    finally:
        lab.balance()


def test_draining_a_host_moves_its_clients_and_nobody_else(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    # Last in this module: host-a does not come back.
    drained_host, other_host = SERVICE.hosts

    async def scenario() -> None:
        members = [Member(source) for source in SOURCES]
        await asyncio.gather(*(m.start(URL, reconnection=True) for m in members))
        try:
            movers = [m for m in members if m.home["host"] == drained_host]
            stayers = [m for m in members if m.home["host"] == other_host]
            before = {m: m.home["pid"] for m in stayers}
            reconnected: dict[Member, float] = {}
            for member in movers:
                member.client.on(
                    "connect",
                    functools.partial(lambda m: reconnected.setdefault(m, time.monotonic()), member),
                )
            start = time.monotonic()
            await asyncio.to_thread(lab.drain, drained_host)
            await asyncio.to_thread(lab.stop, drained_host)
            await wait_async(
                lambda: len(reconnected) == len(movers), 60, f"{drained_host}'s clients to reconnect"
            )
            moved_in = max(reconnected.values()) - start
            answers = await asyncio.gather(*(m.client.call("whoami", timeout=15) for m in movers))
            assert {answer["host"] for answer in answers} == {other_host}
            await asyncio.to_thread(lab.masters[drained_host].wait, 30)
            stopped_in = time.monotonic() - start
            print(
                f"drain {drained_host}: its {len(movers)} clients reconnected to {other_host} within "
                f"{moved_in:.2f} s (its master exited after {stopped_in:.2f} s); "
                f"{len(stayers)} others unmoved"
            )
            for member in stayers:
                assert member.disconnects == 0, member.source
                assert (await member.client.call("whoami", timeout=15))["pid"] == before[member]
            assert all(m.disconnects >= 1 for m in movers)
            # They carry on: back in the room, a broadcast reaches all 200 exactly once.
            await asyncio.gather(*(m.client.call("join", {"room": "all"}, timeout=15) for m in movers))
            await movers[0].client.call("say", {"room": "all", "text": "after the drain"}, timeout=15)
            await wait_async(lambda: all(m.heard for m in members), 30, "the message everywhere")
            await stayers[0].client.call("say", {"room": "all", "text": "sentinel"}, timeout=15)
            await wait_async(lambda: all(len(m.heard) >= 2 for m in members), 30, "the sentinel everywhere")
            for member in members:
                assert [m["text"] for m in member.heard] == ["after the drain", "sentinel"], member.source
        finally:
            await asyncio.gather(*(m.stop() for m in members))

    lab.run_in(SERVICE.clients, lambda: asyncio.run(scenario()))


def test_the_last_host_cannot_be_drained(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    # After the drain above, the balancer has one host left: `scripts/lab drain` refuses it.
    assert lab.current_owners() == [SERVICE.hosts[1]] * SERVICE.buckets
    assert main(["--name", lab.name, "drain", SERVICE.hosts[1]]) == 2
    assert (
        capsys.readouterr().err
        == f"scripts/lab: error: cannot drain {SERVICE.hosts[1]}: it is the only host\n"
    )
