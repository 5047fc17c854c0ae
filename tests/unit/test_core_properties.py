"""The restart policy as invariants: any sequence of kills, boot failures, HUP, TTIN, TTOU, recycles,
failed actions, time passing and TERM, in any order, against the pure core.

The machine plays the loop: it carries out each action at once (a Spawn comes back as Spawned, or
as ActionFailed while forks fail), as ``Supervisor.execute`` does. After every step the slots must
be whole; at the end, a cooperative world (workers get ready, stopping ones exit) must finish every
reload and retirement, and TERM must end in Exit.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ebpf_sticky.contract import APP_LOAD_ERROR
from ebpf_sticky.supervisor.core import (
    BACKOFF_MAX,
    Action,
    ActionFailed,
    AddSlot,
    Core,
    Event,
    Exit,
    Exited,
    LoadFailed,
    Phase,
    Ready,
    Recycle,
    RetireSlot,
    Signal,
    SignalName,
    SlotAdded,
    Spawn,
    Spawned,
    Start,
    Tick,
)

EXIT_CODES = st.sampled_from([0, 1, APP_LOAD_ERROR, -9, -15, -2])


class Restarts(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = Core(slots=2, graceful_timeout=5.0, max_slots=4)
        self.now = 0.0
        self.next_pid = 100
        self.failing: set[type[Action]] = set()  # the next action of each kind is refused
        self.exit: Exit | None = None
        self.run(self.core.handle(Start(self.now)))

    # The loop -------------------------------------------------------------------------------------
    def run(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue and self.exit is None:
            action = queue.pop(0)
            for event in self.act(action):
                queue += self.core.handle(event)

    def act(self, action: Action) -> list[Event]:
        if isinstance(action, Exit):
            self.exit = action
            return []
        if type(action) in self.failing:
            self.failing.discard(type(action))
            return [ActionFailed(action, "refused", self.now)]
        if isinstance(action, Spawn):
            self.check_spawn(action.slot)
            self.next_pid += 1
            return [Spawned(action.slot, self.next_pid, self.now)]
        if isinstance(action, AddSlot):
            return [SlotAdded(action.slot, self.now)]
        return []

    def check_spawn(self, slot: int) -> None:
        """Nothing is spawned twice for one slot: a second live worker only as a reload's successor."""
        c = self.core
        assert slot < c.slots, (slot, c.slots)
        live = len(c.live_workers(slot))
        allowed = 1 if c.reloading == slot and c.successor is None else 0
        assert live <= allowed, f"slot {slot} spawned again with {live} live workers"

    def feed(self, event: Event) -> None:
        self.run(self.core.handle(event))

    def pid(self, index: int, *, ready: bool | None = None) -> int | None:
        pids = sorted(p for p, w in self.core.workers.items() if ready is None or w.ready == ready)
        return pids[index % len(pids)] if pids else None

    # Rules ----------------------------------------------------------------------------------------
    @initialize(slots=st.integers(1, 3), serving=st.booleans(), command=st.booleans())
    def begin(self, slots: int, serving: bool, command: bool) -> None:
        """1-3 slots, half the time already serving: most overlaps need a running group. Half the
        time a ``-- COMMAND`` group: workers are taken as ready after a while, exit codes are theirs."""
        self.core = Core(
            slots=slots,
            graceful_timeout=5.0,
            max_slots=4,
            assume_ready_after=1.0 if command else None,
            load_error_status=None if command else APP_LOAD_ERROR,
        )
        self.run(self.core.handle(Start(self.now)))
        if serving:
            for pid in sorted(self.core.workers):
                self.feed(Ready(pid, self.now))

    @precondition(lambda self: self.exit is None)
    @rule(index=st.integers(0, 20))
    def ready(self, index: int) -> None:
        pid = self.pid(index, ready=False)
        if pid is not None:
            self.feed(Ready(pid, self.now))

    @precondition(lambda self: self.exit is None)
    @rule(index=st.integers(0, 20), code=EXIT_CODES, report=st.booleans())
    def worker_exits(self, index: int, code: int, report: bool) -> None:
        pid = self.pid(index)
        if pid is not None:
            if report and code == APP_LOAD_ERROR:
                self.feed(LoadFailed(pid, f"error {pid % 3}", "", self.now))
            self.feed(Exited(pid, code, self.now))

    @precondition(lambda self: self.exit is None)
    @rule(index=st.integers(0, 20))
    def recycle(self, index: int) -> None:
        pid = self.pid(index, ready=True)
        if pid is not None:
            self.feed(Recycle(pid, self.now))

    @precondition(lambda self: self.exit is None)
    @rule(name=st.sampled_from([SignalName.HUP, SignalName.TTIN, SignalName.TTOU, SignalName.TERM]))
    def signal(self, name: SignalName) -> None:
        self.feed(Signal(name, self.now))

    @precondition(lambda self: self.exit is None)
    @rule(dt=st.sampled_from([0.0, 0.05, 0.3, 1.0, 6.0, 61.0]), pending=st.sampled_from([0, 0, 3]))
    def time_passes(self, dt: float, pending: int) -> None:
        self.now += dt
        draining = self.core.draining_slot()
        self.feed(Tick(self.now, {draining: pending} if draining is not None else {}))

    @rule(kind=st.sampled_from([Spawn, AddSlot, RetireSlot]))
    def kernel_refuses(self, kind: type[Action]) -> None:
        self.failing.add(kind)

    # Invariants -----------------------------------------------------------------------------------
    @invariant()
    def every_slot_has_its_worker_or_a_respawn(self) -> None:
        c = self.core
        if self.exit is not None or c.phase is Phase.STOPPING:
            return
        closing = c.retiring.slot if c.retiring and c.retiring.stopping else None
        for slot in range(c.slots):
            if slot == closing:
                continue
            live = len(c.live_workers(slot))
            health = c.health.get(slot)
            respawn = health is not None and health.respawn_at is not None
            expected = {1, 2} if slot == c.reloading else {1}
            assert live in expected or (live == 0 and respawn), (slot, live, respawn, c)

    @invariant()
    def a_reload_waits_on_a_live_successor(self) -> None:
        c = self.core
        if c.reloading is not None:
            successor = c.workers.get(c.successor) if c.successor is not None else None
            assert successor is not None and successor.live and successor.slot == c.reloading, c

    @invariant()
    def workers_only_on_slots_that_exist(self) -> None:
        assert all(w.slot < self.core.slots for w in self.core.workers.values()), self.core

    # The end: a cooperative world settles everything, and TERM exits ------------------------------
    def teardown(self) -> None:
        if self.exit is None:
            self.failing.clear()
            for _ in range(40):
                self.settle_once()
            c = self.core
            if c.phase is not Phase.STOPPING:
                assert c.reloading is None and not c.reload_queue, f"a reload never ended: {c}"
                assert c.retiring is None, f"a retirement never ended: {c}"
                for slot in range(c.slots):
                    assert len(c.slot_workers(slot)) == 1 and c.slot_workers(slot)[0].ready, (slot, c)
            self.feed(Signal(SignalName.TERM, self.now))
            for pid in list(c.workers):
                self.feed(Exited(pid, -15, self.now))
            assert self.exit is not None, f"TERM did not end in exit: {c}"

    def settle_once(self) -> None:
        for pid, worker in list(self.core.workers.items()):
            if self.exit is None and pid in self.core.workers:
                if not worker.live:
                    self.feed(Exited(pid, 0, self.now))
                elif not worker.ready:
                    self.feed(Ready(pid, self.now))
        self.now += BACKOFF_MAX
        draining = self.core.draining_slot()
        if self.exit is None:
            self.feed(Tick(self.now, {draining: 0} if draining is not None else {}))


TestRestarts = Restarts.TestCase
TestRestarts.settings = settings(max_examples=400, stateful_step_count=40, deadline=None)


def test_a_reload_and_a_due_respawn_in_one_tick_start_one_worker() -> None:
    """Found by the machine above: one tick ends a retirement, whose reload moves on to a slot
    that also has a respawn due. Both asked for a worker in the same batch of actions."""
    machine = Restarts()
    machine.begin(slots=2, serving=True, command=False)
    machine.worker_exits(index=0, code=0, report=False)  # slot 0's worker: a replacement starts
    machine.signal(SignalName.HUP)  # reload slot 0 (beside that replacement), then slot 1
    machine.worker_exits(index=1, code=0, report=False)  # slot 0's older one, before it was ready
    machine.ready(index=0)  # the reload's worker on slot 0: on to slot 1
    machine.recycle(index=1)  # slot 0 queues for another renewal
    machine.signal(SignalName.TTOU)  # slot 1 retires, with its reload under way
    machine.worker_exits(index=1, code=0, report=False)  # slot 0's worker: replaced at once
    machine.worker_exits(index=8, code=0, report=False)  # that one fails to boot: respawn in 0.1 s
    machine.time_passes(dt=0.3, pending=0)  # slot 1 drained: the reload moves to slot 0
    machine.teardown()
