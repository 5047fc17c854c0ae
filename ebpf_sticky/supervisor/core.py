"""The supervisor's decisions: events in, actions out. No OS calls, no clock: time comes in events.

Design rules:

* A slot is a listening socket the master owns for the life of the group; workers come and go on
  it. A crashed worker is replaced on the same slot, so connections queued meanwhile are served.
* A reload (HUP) renews one slot at a time: the new worker starts beside the old one on the same
  socket, and only when it is ready is the old one asked to stop.
* Retiring a slot (TTOU) first routes its buckets away (the router's table flip), waits until
  nothing is pending on it (its accept queue, and without the kernel's migration the handshakes
  in flight: the router counts them), then stops its worker, and only then closes the socket.
* Restart policy: a worker that became ready and then dies is replaced at once (it served: an OOM
  kill or an operator's kill is not a crash loop). A worker that dies before it is ready is a boot
  failure: its slot is respawned after a backoff that doubles from ``BACKOFF_FIRST`` to
  ``BACKOFF_MAX`` and is forgotten once a worker of the slot has served ``STABLE_AFTER`` seconds.
  Meanwhile the slot's connections wait in its queue and every other slot keeps serving.
* Only an app that can never be loaded stops the launch: before any worker of any slot was ever
  ready, a worker exits with the load-error status, or one slot fails to boot ``STARTUP_ATTEMPTS``
  times in a row. The other workers then get TERM and the graceful timeout.
* An upgrade (USR2) replaces the master in place: the core hands the loop its workers
  (``Upgrade``), and the new image starts from them (``Resumed``) and renews every slot as HUP
  does. Only a settled group upgrades: not while starting, stopping, reloading or retiring.
* An action the loop could not carry out (a fork that failed, a slot the kernel would not add)
  comes back as an event: the group keeps serving and the log says what failed.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

if sys.version_info >= (3, 11):
    from typing import assert_never
else:
    from typing_extensions import assert_never

from ..contract import APP_LOAD_ERROR
from ..hashing import MAX_SLOTS

SIGINT = 2  # the same numbers on every Linux architecture
SIGTERM = 15
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
STABLE_AFTER = 60.0
# Before any worker was ever ready, this many boot failures in a row on one slot mean the app
# cannot start at all (a command that always exits at once): stop instead of retrying forever.
STARTUP_ATTEMPTS = 3
# After a retired slot's table flip, a SYN the old table sent there may still be on its way to
# becoming a handshake the router can see: wait this long before trusting an empty drain.
DRAIN_SETTLE = 0.2


# After this many distinct load-error reports, the oldest is forgotten (shown again if it recurs):
# each may be 64 KiB, and a worker whose error text varies (a timestamp, a pid) must not grow the
# master without bound.
SHOWN_ERRORS = 16


class _Name(str, Enum):
    """A closed set of names that print as themselves (enum.StrEnum, which 3.10 lacks)."""

    def __str__(self) -> str:
        return str(self.value)


class SignalName(_Name):
    """The signals the master acts on, by the name the log prints after "SIG"."""

    TERM = "TERM"
    INT = "INT"
    QUIT = "QUIT"
    HUP = "HUP"
    TTIN = "TTIN"
    TTOU = "TTOU"
    USR2 = "USR2"


class Reason(_Name):
    """Why a slot got a new worker (the label of the restarts metric)."""

    CRASH = "crash"  # a ready worker exited
    SIGNAL = "signal"  # a ready worker was killed
    BOOT_FAILURE = "boot-failure"  # it died before it was ready
    SPAWN_FAILURE = "spawn-failure"  # fork/exec failed
    RECYCLE = "recycle"  # it served its --limit-max-requests (planned)


class Level(_Name):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


KillSignal = Literal["TERM", "KILL"]


# Events ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    now: float


@dataclass(frozen=True)
class Spawned:
    slot: int
    pid: int
    now: float


@dataclass(frozen=True)
class Exited:
    pid: int
    code: int  # exit status, or -signal when killed by a signal
    now: float


@dataclass(frozen=True)
class Ready:
    pid: int
    now: float


@dataclass(frozen=True)
class Recycle:
    pid: int  # a worker that served its --limit-max-requests: replace it as HUP would its slot
    now: float


@dataclass(frozen=True)
class Signal:
    name: SignalName
    now: float


@dataclass(frozen=True)
class Carried:
    """A worker as the master that exec'd this image left it."""

    pid: int
    slot: int
    ready: bool
    stopping: bool = False


@dataclass(frozen=True)
class Resumed:
    """This image replaced the master in place (in place of ``Start``): its workers run on."""

    workers: tuple[Carried, ...]
    now: float


@dataclass(frozen=True)
class LoadFailed:
    """A worker reported why it cannot load the app, before exiting with ``APP_LOAD_ERROR``."""

    pid: int
    summary: str  # one line
    detail: str  # the traceback, or ""
    now: float


@dataclass(frozen=True)
class SlotAdded:
    slot: int
    now: float


@dataclass(frozen=True)
class ActionFailed:
    action: Action
    error: str
    now: float


@dataclass(frozen=True)
class Tick:
    now: float
    pending: dict[int, int] = field(default_factory=dict)  # accept-queue length per draining slot


# Actions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    slot: int


@dataclass(frozen=True)
class Kill:
    pid: int
    signal: KillSignal


@dataclass(frozen=True)
class AddSlot:
    slot: int


@dataclass(frozen=True)
class RetireSlot:
    slot: int


@dataclass(frozen=True)
class ReleaseSlot:
    slot: int


@dataclass(frozen=True)
class NotifyReady:
    pass


@dataclass(frozen=True)
class Log:
    message: str
    level: Level = Level.INFO


@dataclass(frozen=True)
class Upgrade:
    """Exec the installed master in place of this one, handing it these workers."""

    workers: tuple[Carried, ...]


@dataclass(frozen=True)
class Exit:
    code: int
    message: str = ""


Action = Spawn | Kill | AddSlot | RetireSlot | ReleaseSlot | NotifyReady | Log | Upgrade | Exit
Event = (
    Start
    | Resumed
    | Spawned
    | Exited
    | Ready
    | LoadFailed
    | Recycle
    | Signal
    | SlotAdded
    | ActionFailed
    | Tick
)


class Phase(Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass
class Worker:
    pid: int
    slot: int
    started: float
    ready_at: float | None = None
    stop_sent: float | None = None  # when TERM was sent
    load_error: str = ""  # the one-line reason it reported, if it could not load the app

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    @property
    def live(self) -> bool:
        """Not asked to stop: the worker the slot counts on (a stopping one is on its way out)."""
        return self.stop_sent is None


@dataclass
class SlotHealth:
    """A slot's restart state: its run of boot failures and the respawn that waits out a backoff."""

    streak: int = 0
    respawn_at: float | None = None


@dataclass
class Retiring:
    slot: int
    since: float
    stopping: bool = False


@dataclass(frozen=True)
class WorkerView:
    pid: int
    slot: int
    ready: bool
    stopping: bool


@dataclass(frozen=True)
class Snapshot:
    """A read-only copy of what the core knows, for the control socket and the metrics."""

    phase: Phase
    slots: int
    workers: tuple[WorkerView, ...]
    restarts: dict[tuple[int, Reason], int]
    generation: int = 0  # in-place upgrades since launch
    upgrades_refused: int = 0
    upgrade_refusal: str = ""

    def pids(self, slot: int) -> list[int]:
        return sorted(w.pid for w in self.workers if w.slot == slot)

    @property
    def ready(self) -> int:
        return sum(w.ready for w in self.workers)


def backoff(streak: int) -> float:
    """The wait before respawning a slot after its ``streak``-th boot failure in a row."""
    return float(min(BACKOFF_FIRST * 2 ** (streak - 1), BACKOFF_MAX))


@dataclass
class Core:
    """The restart policy. Invariants (tested as properties over any sequence of events):

    * outside a stop, every slot that is not being closed has exactly one live worker (not asked
      to stop), or two while it is the slot being reloaded, or none and a respawn scheduled;
    * a reload always ends: its successor becomes ready, fails, or its slot goes away;
    * a slot never gets a second live worker except the reload's successor;
    * after TERM, once the workers exit (or the graceful timeout kills them), the core exits.
    """

    slots: int
    graceful_timeout: float = 30.0
    max_slots: int = MAX_SLOTS  # what the router fits (the classic-BPF program has a size limit)
    assume_ready_after: float | None = None  # for commands that never send READY=1
    # The exit status meaning "cannot load the app"; None for commands, whose statuses are their own.
    load_error_status: int | None = APP_LOAD_ERROR
    phase: Phase = Phase.STARTING
    workers: dict[int, Worker] = field(default_factory=dict)
    health: dict[int, SlotHealth] = field(default_factory=dict)
    restarts: dict[tuple[int, Reason], int] = field(default_factory=dict)  # per (slot, reason)
    ever_ready: bool = False
    # The last SHOWN_ERRORS distinct load-error texts, oldest first.
    shown_errors: OrderedDict[str, None] = field(default_factory=OrderedDict)
    reload_queue: list[int] = field(default_factory=list)
    reloading: int | None = None  # slot whose new worker we wait for
    successor: int | None = None  # that new worker's pid
    retiring: Retiring | None = None
    exit_code: int = 0
    exit_message: str = ""
    stop_deadline: float | None = None
    generation: int = 0  # in-place upgrades since launch
    upgrades_refused: int = 0  # by this image (a refused upgrade keeps the image)
    upgrade_refusal: str = ""  # why the last one was refused

    # Queries -------------------------------------------------------------------------------------
    def slot_workers(self, slot: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.slot == slot]

    def live_workers(self, slot: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.slot == slot and w.live]

    def draining_slot(self) -> int | None:
        return self.retiring.slot if self.retiring and not self.retiring.stopping else None

    def snapshot(self) -> Snapshot:
        workers = tuple(
            WorkerView(w.pid, w.slot, w.ready, not w.live) for w in sorted(self.workers.values(), key=_pid)
        )
        return Snapshot(
            self.phase,
            self.slots,
            workers,
            dict(self.restarts),
            self.generation,
            self.upgrades_refused,
            self.upgrade_refusal,
        )

    # Transitions ---------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        match event:
            case Start():
                return [self._spawn(slot) for slot in range(self.slots)]
            case Resumed():
                return self._resumed(event)
            case Spawned():
                return self._spawned(event)
            case Ready():
                return self._ready(event)
            case LoadFailed():
                return self._load_failed(event)
            case Exited():
                return self._exited(event)
            case Signal():
                return self._signal(event)
            case SlotAdded():
                self.slots = max(self.slots, event.slot + 1)
                return [Log(f"slot {event.slot} added; {self.slots} slots"), self._spawn(event.slot)]
            case ActionFailed():
                return self._action_failed(event)
            case Recycle():
                return self._recycle(event)
            case Tick():
                return self._tick(event)
            case _:
                assert_never(event)

    def _spawn(self, slot: int) -> Spawn:
        """Every worker is started here. A respawn the slot waits for is this worker, whatever asked
        for it (a reload, a crash): one batch of actions may hold both a reload's next slot and that
        slot's due respawn, and the loop carries out the whole batch before the core sees a worker."""
        health = self.health.get(slot)
        if health is not None:
            health.respawn_at = None
        return Spawn(slot)

    def _spawned(self, event: Spawned) -> list[Action]:
        self.workers[event.pid] = Worker(event.pid, event.slot, event.now)
        if event.slot == self.reloading and self.successor is None:
            self.successor = event.pid
        return [Log(f"slot {event.slot}: worker {event.pid} started")]

    def _resumed(self, event: Resumed) -> list[Action]:
        """Adopt the workers of the image before, then renew every slot as HUP does. A slot whose
        worker is gone (it died during the exec) gets one at once."""
        for carried in event.workers:
            worker = Worker(
                carried.pid, carried.slot, event.now, ready_at=event.now if carried.ready else None
            )
            worker.stop_sent = event.now if carried.stopping else None
            self.workers[carried.pid] = worker
        self.ever_ready = True  # the group served before: a failing new worker is no launch failure
        live = {w.slot for w in self.workers.values() if w.stop_sent is None}
        if all(any(w.ready for w in self.slot_workers(slot)) for slot in range(self.slots)):
            self.phase = Phase.RUNNING
        self.reload_queue = [slot for slot in range(self.slots) if slot in live]
        actions: list[Action] = [
            Log(f"upgraded in place (generation {self.generation}): {len(live)} slots adopted, renewing them")
        ]
        spawns = [self._spawn(slot) for slot in range(self.slots) if slot not in live]
        return actions + spawns + self._next_reload()

    def _upgrade_blocked(self) -> str:
        """Why the group is not settled enough to upgrade, or ""."""
        if self.phase is Phase.STARTING:
            return "still starting"
        if self.reloading is not None or self.reload_queue:
            return "a reload is under way"
        if self.retiring is not None:
            return "a slot is retiring"
        return ""

    def _upgrade(self) -> list[Action]:
        busy = self._upgrade_blocked()
        if busy:
            return [Log(f"SIGUSR2 ignored: {busy}; send it again once that is done", Level.WARNING)]
        workers = tuple(
            Carried(w.pid, w.slot, w.ready, w.stop_sent is not None) for w in self.workers.values()
        )
        return [Log("SIGUSR2: upgrading the master in place"), Upgrade(workers)]

    def _recycle(self, event: Recycle) -> list[Action]:
        """The HUP path for one slot: its successor starts on the socket, the worker stops once the
        successor is ready. Slots queue up, so they are replaced one at a time."""
        worker = self.workers.get(event.pid)
        if worker is None or not worker.live or self.phase is Phase.STOPPING:
            return []
        if worker.slot == self.reloading or worker.slot in self.reload_queue:
            return []
        self.reload_queue.append(worker.slot)
        self._count(worker.slot, Reason.RECYCLE)
        actions: list[Action] = [Log(f"slot {worker.slot}: worker {worker.pid} reached --limit-max-requests")]
        return actions + (self._next_reload() if self.reloading is None else [])

    def _ready(self, event: Ready) -> list[Action]:
        worker = self.workers.get(event.pid)
        if worker is None or worker.ready:
            return []
        worker.ready_at = event.now
        self.ever_ready = True
        actions: list[Action] = [Log(f"slot {worker.slot}: worker {worker.pid} ready")]
        if worker.pid == self.successor:
            for old in self.live_workers(worker.slot):
                if old is not worker:
                    actions += self._stop(old, event.now)
            actions += self._end_reload()
        if self.phase is Phase.STARTING and all(
            any(w.ready for w in self.slot_workers(slot)) for slot in range(self.slots)
        ):
            self.phase = Phase.RUNNING
            actions += [Log(f"all {self.slots} slots serving"), NotifyReady()]
        return actions

    def _load_failed(self, event: LoadFailed) -> list[Action]:
        """Show each distinct load error once, however many workers hit it."""
        worker = self.workers.get(event.pid)
        if worker is None:
            return []
        worker.load_error = event.summary
        text = event.detail or event.summary
        if text in self.shown_errors:
            self.shown_errors.move_to_end(text)
            return [Log(f"slot {worker.slot}: worker {worker.pid} failed the same way")]
        self.shown_errors[text] = None
        while len(self.shown_errors) > SHOWN_ERRORS:
            self.shown_errors.popitem(last=False)
        return [Log(text.rstrip("\n"), Level.ERROR)]

    def _stop(self, worker: Worker, now: float) -> list[Action]:
        worker.stop_sent = now
        return [Kill(worker.pid, "TERM")]

    def _end_reload(self) -> list[Action]:
        """The slot being reloaded is done with (renewed, failed or gone): on to the next one."""
        self.reloading = None
        self.successor = None
        return self._next_reload()

    def _abort_reload(self) -> None:
        self.reloading = None
        self.successor = None
        self.reload_queue.clear()

    def _next_reload(self) -> list[Action]:
        while self.reload_queue:
            slot = self.reload_queue.pop(0)
            if slot < self.slots and (self.retiring is None or self.retiring.slot != slot):
                self.reloading = slot
                return [self._spawn(slot)]
        return [Log("reload complete")]

    def _exited(self, event: Exited) -> list[Action]:
        worker = self.workers.pop(event.pid, None)
        if worker is None:
            return []
        how = f"exited with {event.code}" if event.code >= 0 else f"killed by signal {-event.code}"
        asked = not worker.live or self.phase is Phase.STOPPING
        if asked and event.code in (0, -SIGTERM, -SIGINT):
            how = "stopped"  # as asked: servers re-raise the TERM (or the terminal's INT) they handled
        log = Log(f"slot {worker.slot}: worker {worker.pid} {how}")
        if self.phase is Phase.STOPPING:
            return [log, *self._exit_if_done()]
        if not worker.live:
            if self.retiring and self.retiring.slot == worker.slot and not self.slot_workers(worker.slot):
                return [log, *self._release_retired()]
            return [log]
        if not worker.ready:
            return self._boot_failed(worker, event, how)
        self._count(worker.slot, Reason.SIGNAL if event.code < 0 else Reason.CRASH)
        served = event.now - (worker.ready_at or worker.started)
        actions: list[Action] = [
            Log(
                f"slot {worker.slot}: worker {worker.pid} {how} after serving {served:.1f} s; replacing it",
                Level.WARNING,
            )
        ]
        # Only live workers count: a predecessor in its graceful stop is leaving too.
        if not self.live_workers(worker.slot):
            actions.append(self._spawn(worker.slot))
        return actions

    def _boot_failed(self, worker: Worker, event: Exited, how: str) -> list[Action]:
        slot = worker.slot
        died = f"slot {slot}: worker {worker.pid} {how} before it was ready"
        actions: list[Action] = []
        if worker.pid == self.successor:
            self._abort_reload()
            if self.live_workers(slot):
                return [
                    Log(died, Level.WARNING),
                    Log(
                        f"reload aborted: the new worker for slot {slot} failed; the old ones keep serving",
                        Level.ERROR,
                    ),
                ]
            # The worker it was to replace is gone as well: the slot waits out a backoff like any other.
            actions.append(Log(f"reload aborted: the new worker for slot {slot} failed", Level.ERROR))
        elif self.live_workers(slot):
            return [Log(died, Level.WARNING)]  # an older worker of a slot being reloaded: the successor stays
        self._count(slot, Reason.BOOT_FAILURE)
        health = self.health.setdefault(slot, SlotHealth())
        health.streak += 1
        if not self.ever_ready:
            if self.load_error_status is not None and event.code == self.load_error_status:
                reason = (
                    worker.load_error
                    or f"slot {slot}: the worker could not load the app (its error is above)"
                )
                return self._fail(f"the app cannot be loaded: {reason}", event.now)
            if health.streak >= STARTUP_ATTEMPTS:
                return self._fail(
                    f"slot {slot}: the worker {how} before it was ready, {health.streak} times in a row, "
                    "and no worker ever became ready: the app cannot start",
                    event.now,
                )
        delay = backoff(health.streak)
        health.respawn_at = event.now + delay
        streak = f"({health.streak} in a row); respawning in {delay:g} s"
        return [Log(f"{died} {streak}", Level.WARNING), *actions]

    def _count(self, slot: int, reason: Reason) -> None:
        self.restarts[(slot, reason)] = self.restarts.get((slot, reason), 0) + 1

    def _action_failed(self, event: ActionFailed) -> list[Action]:
        action = event.action
        match action:
            case Spawn():
                return self._spawn_failed(action.slot, event)
            case AddSlot():
                return [
                    Log(
                        f"SIGTTIN: adding slot {action.slot} failed: {event.error}; still {self.slots} slots",
                        Level.ERROR,
                    )
                ]
            case RetireSlot():
                self.retiring = None
                return [
                    Log(
                        f"SIGTTOU: retiring slot {action.slot} failed: {event.error}; it keeps serving",
                        Level.ERROR,
                    )
                ]
            case ReleaseSlot():
                return [Log(f"closing retired slot {action.slot} failed: {event.error}", Level.ERROR)]
            case Upgrade():
                self.upgrades_refused += 1
                self.upgrade_refusal = event.error
                return [Log(f"upgrade refused: {event.error}; this master keeps serving", Level.ERROR)]
            case Kill():
                return [
                    Log(
                        f"sending SIG{action.signal} to worker {action.pid} failed: {event.error}",
                        Level.ERROR,
                    )
                ]
        return [Log(f"{action} failed: {event.error}", Level.ERROR)]

    def _spawn_failed(self, slot: int, event: ActionFailed) -> list[Action]:
        if self.phase is Phase.STOPPING:
            return [Log(f"slot {slot}: starting a worker failed: {event.error}", Level.ERROR)]
        if self.reloading == slot and self.successor is None:
            self._abort_reload()
            message = f"reload aborted: starting a worker for slot {slot} failed: {event.error}"
            if self.live_workers(slot):
                return [Log(message, Level.ERROR)]
            return [Log(message, Level.ERROR), *self._respawn_later(slot, event)]
        return self._respawn_later(slot, event)

    def _respawn_later(self, slot: int, event: ActionFailed) -> list[Action]:
        self._count(slot, Reason.SPAWN_FAILURE)
        health = self.health.setdefault(slot, SlotHealth())
        health.streak += 1
        delay = backoff(health.streak)
        health.respawn_at = event.now + delay
        return [
            Log(f"slot {slot}: starting a worker failed: {event.error}; retrying in {delay:g} s", Level.ERROR)
        ]

    def _fail(self, message: str, now: float) -> list[Action]:
        self.exit_code = APP_LOAD_ERROR
        self.exit_message = message  # printed last, as the launch's one error line
        return [Log("stopping: the app cannot start"), *self._stop_all(now, graceful=True)]

    def _exit_if_done(self) -> list[Action]:
        return [] if self.workers else [Exit(self.exit_code, self.exit_message)]

    def _stop_all(self, now: float, *, graceful: bool) -> list[Action]:
        self.phase = Phase.STOPPING
        self._abort_reload()
        if not self.workers:
            return [Exit(self.exit_code, self.exit_message)]
        if not graceful:
            return [Kill(pid, "KILL") for pid in self.workers]
        self.stop_deadline = now + self.graceful_timeout
        actions: list[Action] = []
        for worker in self.workers.values():
            actions += self._stop(worker, now)
        return actions

    def _signal(self, event: Signal) -> list[Action]:
        name = event.name
        if self.phase is Phase.STOPPING:
            # A second TERM/INT, or QUIT, while stopping: stop waiting.
            if name in (SignalName.TERM, SignalName.INT, SignalName.QUIT):
                return [Log(f"SIG{name} again: stopping now"), *(Kill(pid, "KILL") for pid in self.workers)]
            return []
        match name:
            case SignalName.TERM | SignalName.INT:
                return [
                    Log(f"SIG{name}: graceful stop (up to {self.graceful_timeout:g} s)"),
                    *self._stop_all(event.now, graceful=True),
                ]
            case SignalName.QUIT:
                return [Log("SIGQUIT: stopping now"), *self._stop_all(event.now, graceful=False)]
            case SignalName.HUP:
                self.reload_queue = list(range(self.slots))
                if self.reloading is not None:
                    return [Log("SIGHUP: reload restarted")]
                return [Log("SIGHUP: reloading slot by slot"), *self._next_reload()]
            case SignalName.TTIN:
                return self._ttin()
            case SignalName.TTOU:
                return self._ttou(event.now)
            case SignalName.USR2:
                return self._upgrade()
            case _:
                assert_never(name)

    def _ttin(self) -> list[Action]:
        if self.retiring is not None:
            return [Log("SIGTTIN ignored: a slot is still retiring")]
        if self.slots >= self.max_slots:
            return [Log(f"SIGTTIN ignored: {self.max_slots} slots is the most this router fits")]
        return [Log(f"SIGTTIN: adding slot {self.slots}"), AddSlot(self.slots)]

    def _ttou(self, now: float) -> list[Action]:
        if self.slots <= 1:
            return [Log("SIGTTOU ignored: one slot is the minimum")]
        if self.retiring is not None:
            return [Log("SIGTTOU ignored: a slot is still retiring")]
        slot = self.slots - 1
        self.retiring = Retiring(slot, now)
        return [Log(f"SIGTTOU: retiring slot {slot}"), RetireSlot(slot)]

    def _tick(self, event: Tick) -> list[Action]:
        now = event.now
        actions = self._assume_ready(now) + self._watch_stops(now)
        if self.phase is Phase.STOPPING:
            if self.stop_deadline is not None and now > self.stop_deadline:
                self.stop_deadline = None
                actions += [
                    Log("graceful timeout: killing the rest", Level.WARNING),
                    *(Kill(p, "KILL") for p in self.workers),
                ]
            return actions
        return actions + self._drain(event) + self._respawn_due(now)

    def _assume_ready(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self.assume_ready_after is not None:
            for worker in list(self.workers.values()):
                if not worker.ready and now - worker.started >= self.assume_ready_after:
                    actions += self._ready(Ready(worker.pid, now))
        return actions

    def _watch_stops(self, now: float) -> list[Action]:
        """Forget the failures of slots that served a minute; kill workers that ignore TERM."""
        actions: list[Action] = []
        for worker in self.workers.values():
            stable = worker.live and worker.ready_at is not None and now - worker.ready_at >= STABLE_AFTER
            health = self.health.get(worker.slot)
            if stable and health is not None and health.respawn_at is None:
                del self.health[worker.slot]
            late = worker.stop_sent is not None and now - worker.stop_sent > self.graceful_timeout
            if late and self.phase is not Phase.STOPPING:
                actions += [
                    Log(f"slot {worker.slot}: worker {worker.pid} ignored TERM; killing", Level.WARNING),
                    Kill(worker.pid, "KILL"),
                ]
                worker.stop_sent = now  # once per timeout
        return actions

    def _respawn_due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for slot, health in self.health.items():
            due = health.respawn_at is not None and now >= health.respawn_at
            if due and slot < self.slots and not self.live_workers(slot):
                actions.append(self._spawn(slot))
        return actions

    def _drain(self, event: Tick) -> list[Action]:
        """A retiring slot's queue and handshakes are done (or the timeout passed): stop its worker."""
        retiring = self.retiring
        if retiring is None or retiring.stopping:
            return []
        now = event.now
        settled = now - retiring.since >= DRAIN_SETTLE
        drained = event.pending.get(retiring.slot, 0) == 0
        if not (settled and (drained or now - retiring.since > self.graceful_timeout)):
            return []
        retiring.stopping = True
        self.health.pop(retiring.slot, None)  # no respawn for a slot that is closing
        actions: list[Action] = []
        workers = self.live_workers(retiring.slot)
        for worker in workers:
            actions += self._stop(worker, now)
        if self.reloading == retiring.slot:
            actions += self._end_reload()
        if not self.slot_workers(retiring.slot):
            actions += self._release_retired()
        return actions

    def _release_retired(self) -> list[Action]:
        """The retiring slot has no worker left: close its socket."""
        assert self.retiring is not None
        slot = self.retiring.slot
        self.retiring = None
        self.slots -= 1
        self.health.pop(slot, None)
        return [ReleaseSlot(slot), Log(f"slot {slot} retired; {self.slots} slots")]


def _pid(worker: Worker) -> int:
    return worker.pid
