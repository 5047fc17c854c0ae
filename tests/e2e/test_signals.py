"""Signals to a launched instance end to end, and the `status` command's own output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from support.launcher import KEY, Instance, get, launched, predicted, tagged_processes, wait_for, watch_ready
from support.netlab import v4_sources
from support.sio_clients import wait_async

BASE = ["--bind", "127.0.0.1:0", "--hash-key", KEY, "--loader", "native"]
# A `-- COMMAND` worker that ignores TERM: only SIGKILL ends it.
STUBBORN = (
    "import signal, socket; signal.signal(signal.SIGTERM, signal.SIG_IGN); s = socket.socket(fileno=3)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'x'); c.close()\n"
)


def test_int_stops_gracefully_with_status_0() -> None:
    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        workers = [pid for pids in instance.slot_pids().values() for pid in pids]
        instance.signal(signal.SIGINT)
        assert instance.finish() == 0
        output = instance.output()
        assert "SIGINT: graceful stop" in output
        assert all(f"worker {pid} stopped" in output for pid in workers), output
        assert tagged_processes(instance.tag) == []


def test_quit_stops_at_once_even_when_workers_ignore_term() -> None:
    with launched(
        ["-w", "2", *BASE, "--graceful-timeout", "60", "--", sys.executable, "-c", STUBBORN]
    ) as instance:
        start = time.monotonic()
        instance.signal(signal.SIGQUIT)
        assert instance.finish() == 0
        elapsed = time.monotonic() - start
        print(f"QUIT: exited in {elapsed:.2f} s")
        assert elapsed < 30  # the graceful timeout (60 s) was not waited out
        assert "SIGQUIT: stopping now" in instance.output()
        assert instance.output().count("killed by signal 9") == 2
        assert tagged_processes(instance.tag) == []


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_second_signal_during_a_graceful_stop_stops_at_once(second: signal.Signals) -> None:
    with launched(
        ["-w", "2", *BASE, "--graceful-timeout", "60", "--", sys.executable, "-c", STUBBORN]
    ) as instance:
        instance.signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: graceful stop" in instance.output(), 10, "the graceful stop")
        time.sleep(0.5)  # negative control: the stubborn workers are still there
        assert instance.proc.poll() is None
        start = time.monotonic()
        instance.signal(second)
        assert instance.finish() == 0
        elapsed = time.monotonic() - start
        print(f"second {second.name}: exited in {elapsed:.2f} s")
        assert elapsed < 30
        assert f"{second.name} again: stopping now" in instance.output()
        assert tagged_processes(instance.tag) == []


@pytest.mark.parametrize("when", ["serving", "booting"])
@pytest.mark.parametrize(
    "target",
    [
        ["asgi_app.py"],
        ["--", sys.executable, "-c", "import socket, time; s = socket.socket(fileno=3); time.sleep(60)"],
    ],
    ids=["uvicorn", "python-command"],
)
def test_ctrl_c_to_the_process_group_stops_without_worker_tracebacks(target: list[str], when: str) -> None:
    """A terminal's Ctrl-C sends SIGINT to every process of the foreground job, workers included."""
    from support.launcher import Instance

    args = [*target[:1], "-w", "3", *BASE, *target[1:]] if target[0] != "--" else ["-w", "3", *BASE, *target]
    instance = Instance(args, own_group=True)
    try:
        if when == "serving":
            instance.wait_serving()
        else:
            wait_for(lambda: instance.output().count(" started") >= 3, 30, "workers forked")
        os.killpg(instance.proc.pid, signal.SIGINT)
        code = instance.finish()
        output = instance.output()
        assert code == 0, output
        assert "SIGINT: graceful stop" in output
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
        assert tagged_processes(instance.tag) == []
    finally:
        instance.close()


def test_status_command_prints_text_and_json() -> None:
    sources = v4_sources(12, start=5000)
    with launched(["asgi_app.py", "-w", "2", *BASE]) as instance:
        for source in sources:
            get(source, instance.port)
        pids = instance.slot_pids()
        status = [sys.executable, "-m", "ebpf_sticky", "status", "--port", str(instance.port)]
        text = subprocess.run(status, capture_output=True, text=True, timeout=60, check=True).stdout
        lines = text.splitlines()
        assert re.fullmatch(
            rf"ebpf-sticky pid {instance.proc.pid}: tcp 127\.0\.0\.1:{instance.port}, native loader, "
            r"running, up \d+ s, 0 routing failures",
            lines[0],
        ), text
        assert lines[1].split() == ["slot", "pids", "routed"]
        rows = [line.split() for line in lines[2:]]
        assert [row[0] for row in rows] == ["0", "1"], text
        assert [row[1] for row in rows] == [str(pids[0][0]), str(pids[1][0])], text
        assert sum(int(row[2]) for row in rows) == len(sources), text

        raw = subprocess.run(
            [*status, "--json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        answer = json.loads(raw)
        assert answer["pid"] == instance.proc.pid and answer["phase"] == "running"
        assert answer["bind"] == f"127.0.0.1:{instance.port}" and answer["protocol"] == "tcp"
        assert answer["loader"] == "native" and answer["failures"] == 0
        assert [(row["slot"], row["pids"]) for row in answer["slots"]] == [(0, pids[0]), (1, pids[1])]
        assert sum(row["routed"] for row in answer["slots"]) == len(sources)


def test_keep_alive_long_polls_released_by_a_stop_hook_stop_promptly() -> None:
    """A client that keeps its connection alive sends its next poll at once, on that connection:
    the stopping worker must close it after answering, or it holds that poll too (25 s here). On
    HUP each client's next poll reaches its slot's new worker; TERM exits without the wait."""
    sources = v4_sources(12, start=3000)
    with launched(["longpoll_app.py", "-w", "2", *BASE, "--graceful-timeout", "30"]) as instance:
        per_slot, term = asyncio.run(polls_through_hup_and_term(instance, sources))
    print(
        f"{len(sources)} keep-alive long-polling clients: on HUP back on the slot's new worker within "
        f"{max(per_slot.values()):.2f} s of it being ready; TERM exit in {term:.2f} s"
    )
    assert term < 10  # far above the figure, far below the 25 s a held poll would take
    assert max(per_slot.values()) < 10


async def polls_through_hup_and_term(
    instance: Instance, sources: list[str]
) -> tuple[dict[str, float], float]:
    url = f"http://127.0.0.1:{instance.port}/poll"
    first = {slot: pids[0] for slot, pids in instance.slot_pids().items()}
    served_by: dict[str, int] = {}  # source -> the pid that answered its last poll
    back_at: dict[str, float] = {}  # source -> when a new worker of its slot first answered

    async def poll(source: str) -> None:
        # aiohttp's default connector keeps connections alive, as browsers do.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as http:
            while True:
                try:
                    async with http.get(url, params={"session": served_by.get(source, 0)}) as response:
                        slot, pid = (await response.text()).split()
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)  # stopping: refused, or reset
                    continue
                assert int(slot) == predicted(source, 2)
                served_by[source] = int(pid)
                if int(pid) != first[int(slot)]:
                    back_at.setdefault(source, time.monotonic())

    clients = [asyncio.create_task(poll(source)) for source in sources]
    try:
        await wait_async(lambda: len(served_by) == len(sources), 60, "every client's first answer")
        mark, ready_at = len(instance.output()), dict[str, float]()
        watcher = asyncio.create_task(watch_ready(instance, mark, ready_at))
        instance.signal(signal.SIGHUP)
        await wait_async(lambda: len(back_at) == len(sources), 60, "every client on its slot's new worker")
        watcher.cancel()
        in_order = sorted(back_at.items(), key=lambda item: item[1])
        last_back = {str(predicted(source, 2)): at for source, at in in_order}
        per_slot = {slot: last_back[slot] - ready_at[slot] for slot in ready_at}
        await wait_async(lambda: "reload complete" in instance.output(), 30, "the reload")
        start = time.monotonic()
        instance.signal(signal.SIGTERM)
        assert await asyncio.to_thread(instance.finish) == 0
        return per_slot, time.monotonic() - start
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
