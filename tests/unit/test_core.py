"""The supervisor's decisions, without processes: events in, actions out."""

from __future__ import annotations

from ebpf_sticky.supervisor import core
from ebpf_sticky.supervisor.core import (
    AddSlot,
    Core,
    Exit,
    Exited,
    Kill,
    NotifyReady,
    Ready,
    ReleaseSlot,
    RetireSlot,
    Signal,
    Spawn,
    Spawned,
    Start,
    Tick,
)


def kinds(actions: list[core.Action], kind: type) -> list[core.Action]:
    return [a for a in actions if isinstance(a, kind)]


def started(slots: int = 2, **kwargs: float) -> Core:
    c = Core(slots=slots, **kwargs)  # type: ignore[arg-type]
    assert kinds(c.handle(Start(0.0)), Spawn) == [Spawn(i) for i in range(slots)]
    for slot in range(slots):
        c.handle(Spawned(slot, 100 + slot, 0.0))
    actions: list[core.Action] = []
    for slot in range(slots):
        actions += c.handle(Ready(100 + slot, 0.5))
    assert NotifyReady() in actions
    assert c.phase is core.Phase.RUNNING
    return c


def test_ready_only_when_every_slot_serves() -> None:
    c = Core(slots=2)
    c.handle(Start(0.0))
    c.handle(Spawned(0, 10, 0.0))
    c.handle(Spawned(1, 11, 0.0))
    assert NotifyReady() not in c.handle(Ready(10, 0.1))
    assert NotifyReady() in c.handle(Ready(11, 0.2))


def test_crash_respawns_on_the_same_slot() -> None:
    c = started()
    assert kinds(c.handle(Exited(101, -9, 60.0)), Spawn) == [Spawn(1)]


def test_second_boot_failure_stops_the_launch() -> None:
    c = started()
    assert kinds(c.handle(Exited(101, 1, 1.0)), Spawn) == [Spawn(1)]  # first: retry
    c.handle(Spawned(1, 102, 1.0))
    actions = c.handle(Exited(102, 1, 2.0))
    assert kinds(actions, Kill) == [Kill(100, "KILL")]
    assert not kinds(actions, Spawn)
    assert c.handle(Exited(100, -9, 2.1)) == [
        core.Log("slot 0: worker 100 killed by signal 9"),
        Exit(4, c.exit_message),
    ]
    assert "died 2 times within 5 s" in c.exit_message


def test_app_load_error_stops_at_once() -> None:
    c = Core(slots=2)
    c.handle(Start(0.0))
    c.handle(Spawned(0, 10, 0.0))
    c.handle(Spawned(1, 11, 0.0))
    actions = c.handle(Exited(10, core.APP_LOAD_ERROR, 0.3))
    assert kinds(actions, Kill) == [Kill(11, "KILL")]
    assert kinds(c.handle(Exited(11, -9, 0.4)), Exit) == [Exit(4, c.exit_message)]


def test_late_crash_resets_the_boot_failure_count() -> None:
    c = started()
    c.handle(Exited(101, 1, 1.0))
    c.handle(Spawned(1, 102, 1.0))
    c.handle(Ready(102, 1.5))
    assert kinds(c.handle(Exited(102, 1, 100.0)), Spawn) == [Spawn(1)]


def test_term_is_graceful_then_kills_after_the_timeout() -> None:
    c = started(graceful_timeout=10.0)
    assert kinds(c.handle(Signal("TERM", 5.0)), Kill) == [Kill(100, "TERM"), Kill(101, "TERM")]
    assert not kinds(c.handle(Tick(14.0)), Kill)
    c.handle(Exited(100, 0, 6.0))
    assert kinds(c.handle(Tick(15.5)), Kill) == [Kill(101, "KILL")]
    assert kinds(c.handle(Exited(101, -9, 15.6)), Exit) == [Exit(0, "")]


def test_quit_kills_at_once() -> None:
    c = started()
    assert kinds(c.handle(Signal("QUIT", 1.0)), Kill) == [Kill(100, "KILL"), Kill(101, "KILL")]


def test_hup_renews_slot_by_slot_old_stops_only_when_new_is_ready() -> None:
    c = started()
    assert kinds(c.handle(Signal("HUP", 10.0)), Spawn) == [Spawn(0)]
    c.handle(Spawned(0, 200, 10.0))
    assert not kinds(c.handle(Tick(11.0)), Kill)  # old keeps serving until the new one is ready
    actions = c.handle(Ready(200, 11.5))
    assert kinds(actions, Kill) == [Kill(100, "TERM")]
    assert kinds(actions, Spawn) == [Spawn(1)]
    assert not kinds(c.handle(Exited(100, 0, 12.0)), Spawn)  # a retired worker is not replaced
    c.handle(Spawned(1, 201, 12.0))
    actions = c.handle(Ready(201, 12.5))
    assert kinds(actions, Kill) == [Kill(101, "TERM")]
    assert core.Log("reload complete") in actions


def test_hup_with_a_broken_new_worker_keeps_the_old_ones() -> None:
    c = started()
    c.handle(Signal("HUP", 10.0))
    c.handle(Spawned(0, 200, 10.0))
    actions = c.handle(Exited(200, 1, 10.5))
    assert not kinds(actions, Kill) and not kinds(actions, Spawn)
    assert set(c.workers) == {100, 101}


def test_ttin_adds_a_slot() -> None:
    c = started()
    actions = c.handle(Signal("TTIN", 1.0))
    assert kinds(actions, AddSlot) == [AddSlot(2)] and kinds(actions, Spawn) == [Spawn(2)]
    assert c.slots == 3


def test_ttin_beyond_what_the_router_fits_is_refused_with_a_reason() -> None:
    c = started()
    c.max_slots = 2  # e.g. the classic-BPF router's limit
    actions = c.handle(Signal("TTIN", 1.0))
    assert not kinds(actions, AddSlot) and not kinds(actions, Spawn) and c.slots == 2
    assert kinds(actions, core.Log) == [core.Log("SIGTTIN ignored: 2 slots is the most this router fits")]


def test_ttou_remaps_drains_then_stops_then_releases() -> None:
    c = started(slots=3)
    assert kinds(c.handle(Signal("TTOU", 1.0)), RetireSlot) == [RetireSlot(2)]
    assert c.draining_slot() == 2
    assert not kinds(c.handle(Tick(1.1, {2: 0})), Kill)  # too soon after the flip
    assert not kinds(c.handle(Tick(1.3, {2: 5})), Kill)  # queue not empty yet
    assert kinds(c.handle(Tick(1.4, {2: 0})), Kill) == [Kill(102, "TERM")]
    assert c.draining_slot() is None
    actions = c.handle(Exited(102, 0, 1.6))
    assert kinds(actions, ReleaseSlot) == [ReleaseSlot(2)] and not kinds(actions, Spawn)
    assert c.slots == 2


def test_ttou_never_goes_below_one_slot() -> None:
    c = started(slots=1)
    assert not kinds(c.handle(Signal("TTOU", 1.0)), RetireSlot)


def test_commands_count_as_ready_after_a_delay() -> None:
    c = Core(slots=1, assume_ready_after=1.0)
    c.handle(Start(0.0))
    c.handle(Spawned(0, 10, 0.0))
    assert NotifyReady() not in c.handle(Tick(0.5))
    assert NotifyReady() in c.handle(Tick(1.1))
