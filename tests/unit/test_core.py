"""The supervisor's decisions, without processes: events in, actions out."""

from __future__ import annotations

from ebpf_sticky.contract import APP_LOAD_ERROR
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
    SignalName,
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


def boot(c: Core, slot: int, pid: int, now: float) -> None:
    c.handle(Spawned(slot, pid, now))


def test_a_ready_worker_that_dies_is_always_replaced_at_once() -> None:
    c = started()
    pid = 200
    for i in range(20):  # an operator or the OOM killer, again and again: never a reason to stop
        victim = next(w.pid for w in c.workers.values() if w.slot == 1)
        now = 1.0 + i
        actions = c.handle(Exited(victim, -9, now))
        assert kinds(actions, Spawn) == [Spawn(1)] and not kinds(actions, Exit) and not kinds(actions, Kill)
        boot(c, 1, pid, now)
        c.handle(Ready(pid, now + 0.3))
        pid += 1
    assert c.restarts == {(1, "signal"): 20}
    c.handle(Exited(pid - 1, 1, 30.0))
    assert c.restarts[(1, core.Reason.CRASH)] == 1


def test_boot_failures_back_off_exponentially_up_to_the_cap() -> None:
    c = started()
    assert kinds(c.handle(Exited(101, -9, 10.0)), Spawn) == [Spawn(1)]
    boot(c, 1, 199, 10.0)
    now, pid, delays = 10.2, 200, []
    victim = 199
    for _ in range(10):
        actions = c.handle(Exited(victim, 1, now))
        assert not kinds(actions, Spawn) and not kinds(actions, Exit)  # waits out the backoff
        assert "respawning in" in actions[-1].message  # type: ignore[union-attr]
        respawn_at = c.health[1].respawn_at
        assert respawn_at is not None
        delays.append(round(respawn_at - now, 3))
        assert not kinds(c.handle(Tick(respawn_at - 0.01)), Spawn)
        assert kinds(c.handle(Tick(respawn_at)), Spawn) == [Spawn(1)]
        now = respawn_at
        boot(c, 1, pid, now)
        victim, pid = pid, pid + 1
        now += 0.2  # dies while booting
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
    assert c.restarts == {(1, "signal"): 1, (1, "boot-failure"): 10}
    assert c.phase is core.Phase.RUNNING  # slot 0 served throughout
    assert 100 in c.workers


def test_backoff_is_forgotten_after_a_minute_of_service() -> None:
    c = started()
    c.handle(Exited(101, 1, 1.0))  # ready: replaced at once
    boot(c, 1, 199, 1.0)
    c.handle(Exited(199, 1, 1.05))  # first boot failure: 0.1 s
    c.handle(Tick(1.1))
    boot(c, 1, 200, 1.1)
    c.handle(Exited(200, 1, 1.2))  # second: 0.2 s
    c.handle(Tick(1.4))
    boot(c, 1, 201, 1.4)
    c.handle(Ready(201, 2.0))
    c.handle(Tick(61.0))
    assert c.health[1].streak == 2  # 59 s of service: not yet
    c.handle(Tick(62.0))
    assert 1 not in c.health
    c.handle(Exited(201, -9, 70.0))  # ready worker: at once
    boot(c, 1, 202, 70.0)
    c.handle(Exited(202, 1, 70.1))
    assert c.health[1].respawn_at == 70.1 + 0.1  # the backoff starts over


def test_backoff_in_one_slot_never_stops_the_others() -> None:
    c = started(slots=3)
    c.handle(Exited(101, 1, 1.0))
    actions = c.handle(Exited(100, -9, 1.05))  # slot 0 still replaced at once meanwhile
    assert kinds(actions, Spawn) == [Spawn(0)]
    assert c.phase is core.Phase.RUNNING and 102 in c.workers


def test_an_app_that_never_loads_stops_with_term_not_kill() -> None:
    c = Core(slots=2, graceful_timeout=10.0)
    c.handle(Start(0.0))
    boot(c, 0, 10, 0.0)
    boot(c, 1, 11, 0.0)
    c.handle(
        core.LoadFailed(10, "slot 0: importing app.py raised RuntimeError: boom", "Traceback ...\n", 0.2)
    )
    actions = c.handle(Exited(10, APP_LOAD_ERROR, 0.3))
    assert kinds(actions, Kill) == [Kill(11, "TERM")]
    assert c.exit_message == "the app cannot be loaded: slot 0: importing app.py raised RuntimeError: boom"
    assert kinds(c.handle(Tick(5.0)), Kill) == []  # the graceful timeout, not SIGKILL
    assert kinds(c.handle(Tick(10.5)), Kill) == [Kill(11, "KILL")]
    assert kinds(c.handle(Exited(11, -9, 10.6)), Exit) == [Exit(4, c.exit_message)]


def test_a_load_error_after_the_app_once_served_is_only_a_boot_failure() -> None:
    # e.g. HUP after a bad deploy, or a crash then a broken import: the healthy slots keep serving.
    c = started()
    c.handle(Exited(101, -9, 5.0))
    boot(c, 1, 200, 5.0)
    actions = c.handle(Exited(200, APP_LOAD_ERROR, 5.5))
    assert not kinds(actions, Kill) and not kinds(actions, Exit)
    assert c.health[1].respawn_at == 5.6


def test_load_error_shown_once_for_all_workers() -> None:
    c = Core(slots=3)
    c.handle(Start(0.0))
    for slot in range(3):
        boot(c, slot, 10 + slot, 0.0)
    logs = []
    for slot in range(3):
        logs += c.handle(
            core.LoadFailed(10 + slot, "raised X", "Traceback (most recent call last):\nX\n", 0.1)
        )
    tracebacks = [a for a in logs if isinstance(a, core.Log) and a.message.startswith("Traceback")]
    assert len(tracebacks) == 1 and tracebacks[0].level == "error"


def test_load_errors_kept_are_bounded() -> None:
    """A worker whose error text varies each time (a pid, a timestamp) must not grow the master."""
    c = started()
    for i in range(1000):
        c.handle(Spawned(0, 1000 + i, 1.0))
        c.handle(core.LoadFailed(1000 + i, f"raised X {i}", "x" * 60000 + str(i), 1.0))
        c.handle(Exited(1000 + i, APP_LOAD_ERROR, 1.0))
    assert len(c.shown_errors) == core.SHOWN_ERRORS
    again = c.handle(core.LoadFailed(100, "raised X 999", "x" * 60000 + "999", 2.0))
    assert again == [core.Log("slot 0: worker 100 failed the same way")]


def test_command_that_never_gets_ready_stops_after_a_few_attempts() -> None:
    c = Core(slots=2, load_error_status=None, assume_ready_after=1.0)
    c.handle(Start(0.0))
    boot(c, 0, 10, 0.0)
    boot(c, 1, 11, 0.0)
    now, pid = 0.0, 20
    for attempt in range(1, core.STARTUP_ATTEMPTS):
        now += 0.05
        actions = c.handle(Exited(10 if attempt == 1 else pid - 1, 4, now))  # 4 is not special here
        assert not kinds(actions, Exit) and not kinds(actions, Kill)
        now = c.health[0].respawn_at or now
        c.handle(Tick(now))
        boot(c, 0, pid, now)
        pid += 1
    actions = c.handle(Exited(pid - 1, 1, now + 0.05))
    assert kinds(actions, Kill) == [Kill(11, "TERM")]
    assert "3 times in a row" in c.exit_message and c.exit_code == 4


def test_failed_spawn_is_retried_with_backoff_and_the_group_keeps_serving() -> None:
    c = started()
    c.handle(Exited(101, -9, 1.0))
    actions = c.handle(core.ActionFailed(Spawn(1), "[Errno 11] Resource temporarily unavailable", 1.0))
    assert kinds(actions, Exit) == [] and kinds(actions, Kill) == []
    assert "starting a worker failed: [Errno 11]" in actions[0].message  # type: ignore[union-attr]
    assert c.restarts[(1, core.Reason.SPAWN_FAILURE)] == 1
    assert kinds(c.handle(Tick(1.1)), Spawn) == [Spawn(1)]


def test_failed_add_slot_keeps_the_slot_count() -> None:
    c = started()
    actions = c.handle(Signal(SignalName.TTIN, 1.0))
    assert kinds(actions, AddSlot) == [AddSlot(2)] and not kinds(actions, Spawn)
    actions = c.handle(core.ActionFailed(AddSlot(2), "the kernel refused", 1.0))
    assert c.slots == 2 and not kinds(actions, Spawn)
    assert kinds(c.handle(Signal(SignalName.TTIN, 2.0)), AddSlot) == [AddSlot(2)]  # and it can be tried again


def test_failed_retire_keeps_the_slot_serving() -> None:
    c = started(slots=3)
    c.handle(Signal(SignalName.TTOU, 1.0))
    c.handle(core.ActionFailed(RetireSlot(2), "the kernel refused", 1.0))
    assert c.retiring is None and c.slots == 3
    assert not kinds(c.handle(Tick(2.0, {2: 0})), Kill)


def test_second_term_during_a_graceful_stop_kills_at_once() -> None:
    c = started()
    c.handle(Signal(SignalName.TERM, 1.0))
    assert kinds(c.handle(Signal(SignalName.INT, 1.5)), Kill) == [Kill(100, "KILL"), Kill(101, "KILL")]


def test_workers_stopped_by_the_terminals_int_are_not_crashes() -> None:
    c = started()
    c.handle(Signal(SignalName.INT, 1.0))
    assert c.handle(Exited(100, -2, 1.1)) == [core.Log("slot 0: worker 100 stopped")]
    assert c.restarts == {}


def test_term_is_graceful_then_kills_after_the_timeout() -> None:
    c = started(graceful_timeout=10.0)
    assert kinds(c.handle(Signal(SignalName.TERM, 5.0)), Kill) == [Kill(100, "TERM"), Kill(101, "TERM")]
    assert not kinds(c.handle(Tick(14.0)), Kill)
    c.handle(Exited(100, 0, 6.0))
    assert kinds(c.handle(Tick(15.5)), Kill) == [Kill(101, "KILL")]
    assert kinds(c.handle(Exited(101, -9, 15.6)), Exit) == [Exit(0, "")]


def test_quit_kills_at_once() -> None:
    c = started()
    assert kinds(c.handle(Signal(SignalName.QUIT, 1.0)), Kill) == [Kill(100, "KILL"), Kill(101, "KILL")]


def test_hup_renews_slot_by_slot_old_stops_only_when_new_is_ready() -> None:
    c = started()
    assert kinds(c.handle(Signal(SignalName.HUP, 10.0)), Spawn) == [Spawn(0)]
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
    c.handle(Signal(SignalName.HUP, 10.0))
    c.handle(Spawned(0, 200, 10.0))
    actions = c.handle(Exited(200, 1, 10.5))
    assert not kinds(actions, Kill) and not kinds(actions, Spawn)
    assert set(c.workers) == {100, 101}


def test_a_successor_that_crashes_while_its_predecessor_stops_is_replaced() -> None:
    c = started()
    c.handle(Signal(SignalName.HUP, 10.0))
    c.handle(Spawned(0, 200, 10.0))
    assert kinds(c.handle(Ready(200, 11.0)), Kill) == [Kill(100, "TERM")]  # 100 in its graceful stop
    assert kinds(c.handle(Exited(200, -9, 12.0)), Spawn) == [Spawn(0)]  # 100 is leaving: not a worker


def test_hup_on_a_slot_in_backoff_then_a_failed_successor_still_respawns() -> None:
    c = started()
    c.handle(Exited(100, -9, 5.0))
    c.handle(Spawned(0, 150, 5.0))
    c.handle(Exited(150, 1, 5.5))  # boot failure: slot 0 waits out its backoff
    assert kinds(c.handle(Signal(SignalName.HUP, 5.55)), Spawn) == [Spawn(0)]
    c.handle(Spawned(0, 200, 5.55))
    c.handle(Exited(200, 1, 5.6))  # the reload's worker fails too
    assert c.reloading is None
    assert kinds(c.handle(Tick(20.0)), Spawn) == [Spawn(0)]


def test_old_worker_killed_during_a_reload_and_a_failed_successor_still_respawns() -> None:
    c = started()
    c.handle(Signal(SignalName.HUP, 10.0))
    c.handle(Spawned(0, 200, 10.0))
    assert not kinds(c.handle(Exited(100, -9, 10.2)), Spawn)  # the successor is on its way
    c.handle(Exited(200, 1, 10.5))
    assert kinds(c.handle(Tick(20.0)), Spawn) == [Spawn(0)]


def test_ttou_of_the_slot_being_reloaded_ends_the_reload() -> None:
    c = started()
    c.handle(core.Recycle(101, 10.0))  # slot 1, the last, is being renewed
    c.handle(Spawned(1, 201, 10.0))
    c.handle(Signal(SignalName.TTOU, 10.1))
    assert set(kinds(c.handle(Tick(10.5, {1: 0})), Kill)) == {Kill(101, "TERM"), Kill(201, "TERM")}
    assert c.reloading is None
    c.handle(Exited(201, -15, 10.6))
    c.handle(Exited(101, 0, 10.7))
    assert c.slots == 1
    assert kinds(c.handle(Signal(SignalName.HUP, 11.0)), Spawn) == [Spawn(0)]  # reloads work again


def test_ttin_adds_a_slot_then_its_worker() -> None:
    c = started()
    assert kinds(c.handle(Signal(SignalName.TTIN, 1.0)), AddSlot) == [AddSlot(2)]
    assert kinds(c.handle(core.SlotAdded(2, 1.0)), Spawn) == [Spawn(2)]
    assert c.slots == 3


def test_ttin_beyond_what_the_router_fits_is_refused_with_a_reason() -> None:
    c = started()
    c.max_slots = 2  # e.g. the classic-BPF router's limit
    actions = c.handle(Signal(SignalName.TTIN, 1.0))
    assert not kinds(actions, AddSlot) and not kinds(actions, Spawn) and c.slots == 2
    assert kinds(actions, core.Log) == [core.Log("SIGTTIN ignored: 2 slots is the most this router fits")]


def test_ttou_remaps_drains_then_stops_then_releases() -> None:
    c = started(slots=3)
    assert kinds(c.handle(Signal(SignalName.TTOU, 1.0)), RetireSlot) == [RetireSlot(2)]
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
    assert not kinds(c.handle(Signal(SignalName.TTOU, 1.0)), RetireSlot)


def test_commands_count_as_ready_after_a_delay() -> None:
    c = Core(slots=1, assume_ready_after=1.0)
    c.handle(Start(0.0))
    c.handle(Spawned(0, 10, 0.0))
    assert NotifyReady() not in c.handle(Tick(0.5))
    assert NotifyReady() in c.handle(Tick(1.1))


# In-place upgrades (USR2) -------------------------------------------------------------------------
def test_usr2_hands_the_workers_to_the_next_image() -> None:
    c = started(2)
    actions = c.handle(Signal(SignalName.USR2, 1.0))
    assert kinds(actions, core.Upgrade) == [
        core.Upgrade((core.Carried(100, 0, True), core.Carried(101, 1, True)))
    ]


def test_usr2_waits_for_a_settled_group() -> None:
    c = Core(slots=1)
    c.handle(Start(0.0))
    assert not kinds(c.handle(Signal(SignalName.USR2, 0.1)), core.Upgrade)  # still starting
    c = started(2)
    c.handle(Signal(SignalName.HUP, 1.0))
    assert not kinds(c.handle(Signal(SignalName.USR2, 1.1)), core.Upgrade)  # reloading


def test_a_refused_upgrade_is_logged_and_counted() -> None:
    c = started(1)
    (upgrade,) = kinds(c.handle(Signal(SignalName.USR2, 1.0)), core.Upgrade)
    actions = c.handle(
        core.ActionFailed(upgrade, "the installed ebpf-sticky cannot start (SyntaxError)", 1.1)
    )
    logs = [a for a in actions if isinstance(a, core.Log)]
    assert any("upgrade refused" in log.message and log.level == "error" for log in logs)
    assert (c.upgrades_refused, c.phase) == (1, core.Phase.RUNNING)


def test_resumed_core_renews_every_slot_one_at_a_time() -> None:
    c = Core(slots=3, generation=1)
    carried = (core.Carried(100, 0, True), core.Carried(101, 1, True), core.Carried(102, 2, True))
    actions = c.handle(core.Resumed(carried, 0.0))
    assert kinds(actions, Spawn) == [Spawn(0)]
    assert c.phase is core.Phase.RUNNING and not kinds(actions, NotifyReady)
    pid = 200
    for slot in range(3):
        c.handle(Spawned(slot, pid + slot, 0.1))
        actions = c.handle(Ready(pid + slot, 0.2))
        assert Kill(100 + slot, "TERM") in actions
        assert kinds(actions, Spawn) == ([Spawn(slot + 1)] if slot < 2 else [])
    assert sorted(w.pid for w in c.workers.values() if w.stop_sent is None) == [200, 201, 202]


def test_resumed_core_refills_a_slot_whose_worker_died_during_the_exec() -> None:
    c = Core(slots=2, generation=1)
    actions = c.handle(core.Resumed((core.Carried(100, 0, True),), 0.0))
    assert sorted(a.slot for a in actions if isinstance(a, Spawn)) == [0, 1]


def test_a_new_worker_that_fails_after_an_upgrade_leaves_the_old_one_serving() -> None:
    c = Core(slots=1, generation=1)
    c.handle(core.Resumed((core.Carried(100, 0, True),), 0.0))
    c.handle(Spawned(0, 200, 0.1))
    actions = c.handle(Exited(200, APP_LOAD_ERROR, 0.5))
    assert not kinds(actions, Kill) and not kinds(actions, Exit)
    assert list(c.workers) == [100]
