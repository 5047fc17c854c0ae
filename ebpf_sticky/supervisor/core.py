"""The supervisor's decisions: events in, actions out. No OS calls, no clock: time comes in events.

Design rules:

* A slot is a listening socket the master owns for the life of the group; workers come and go on
  it. A crashed worker is replaced on the same slot, so connections queued meanwhile are served.
* A reload (HUP) renews one slot at a time: the new worker starts beside the old one on the same
  socket, and only when it is ready is the old one asked to stop.
* Retiring a slot (TTOU) first routes its buckets away (the router's table flip), waits until its
  accept queue is empty, then stops its worker, and only then closes the socket.
* A worker that dies within ``boot_window`` of starting is a boot failure; the second one in a row
  on a slot (or an app that cannot be loaded at all) stops the launch instead of looping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

# The worker's exit code when it cannot load the app: deterministic, so never worth retrying.
APP_LOAD_ERROR = 4
SIGTERM = 15  # the same number on every Linux architecture
# After a retired slot's table flip, handshakes already in flight may still land in its queue
# for about one round trip; wait this long before trusting an empty queue.
DRAIN_SETTLE = 0.2


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
    name: str  # "TERM", "INT", "QUIT", "HUP", "TTIN", "TTOU"
    now: float


@dataclass(frozen=True)
class Tick:
    now: float
    pending: dict[int, int] = field(default_factory=dict)  # accept-queue length per draining slot


Event = Start | Spawned | Exited | Ready | Recycle | Signal | Tick


# Actions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    slot: int


@dataclass(frozen=True)
class Kill:
    pid: int
    signal: str  # "TERM" or "KILL"


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


@dataclass(frozen=True)
class Exit:
    code: int
    message: str = ""


Action = Spawn | Kill | AddSlot | RetireSlot | ReleaseSlot | NotifyReady | Log | Exit


class Phase(Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass
class Worker:
    pid: int
    slot: int
    started: float
    ready: bool = False
    stop_sent: float | None = None  # when TERM was sent


@dataclass
class Retiring:
    slot: int
    since: float
    stopping: bool = False


@dataclass
class Core:
    slots: int
    graceful_timeout: float = 30.0
    boot_window: float = 5.0
    assume_ready_after: float | None = None  # for commands that never send READY=1
    phase: Phase = Phase.STARTING
    workers: dict[int, Worker] = field(default_factory=dict)
    boot_failures: dict[int, int] = field(default_factory=dict)
    reload_queue: list[int] = field(default_factory=list)
    reloading: int | None = None  # slot whose new worker we wait for
    retiring: Retiring | None = None
    exit_code: int = 0
    exit_message: str = ""
    stop_deadline: float | None = None

    # Queries -------------------------------------------------------------------------------------
    def slot_workers(self, slot: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.slot == slot]

    def draining_slot(self) -> int | None:
        return self.retiring.slot if self.retiring and not self.retiring.stopping else None

    # Transitions ---------------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Start):
            return [Spawn(slot) for slot in range(self.slots)]
        if isinstance(event, Spawned):
            self.workers[event.pid] = Worker(event.pid, event.slot, event.now)
            return [Log(f"slot {event.slot}: worker {event.pid} started")]
        if isinstance(event, Ready):
            return self._ready(event)
        if isinstance(event, Exited):
            return self._exited(event)
        if isinstance(event, Signal):
            return self._signal(event)
        if isinstance(event, Recycle):
            return self._recycle(event)
        return self._tick(event)

    def _recycle(self, event: Recycle) -> list[Action]:
        """The HUP path for one slot: its successor starts on the socket, the worker stops once the
        successor is ready. Slots queue up, so they are replaced one at a time."""
        worker = self.workers.get(event.pid)
        if worker is None or worker.stop_sent is not None or self.phase is Phase.STOPPING:
            return []
        if worker.slot == self.reloading or worker.slot in self.reload_queue:
            return []
        self.reload_queue.append(worker.slot)
        actions: list[Action] = [Log(f"slot {worker.slot}: worker {worker.pid} reached --limit-max-requests")]
        return actions + (self._next_reload() if self.reloading is None else [])

    def _ready(self, event: Ready) -> list[Action]:
        worker = self.workers.get(event.pid)
        if worker is None or worker.ready:
            return []
        worker.ready = True
        actions: list[Action] = [Log(f"slot {worker.slot}: worker {worker.pid} ready")]
        if self.reloading == worker.slot:
            for old in self.slot_workers(worker.slot):
                if old is not worker and old.stop_sent is None:
                    actions += self._stop(old, event.now)
            self.reloading = None
            actions += self._next_reload()
        if self.phase is Phase.STARTING and all(
            any(w.ready for w in self.slot_workers(slot)) for slot in range(self.slots)
        ):
            self.phase = Phase.RUNNING
            actions += [Log(f"all {self.slots} slots serving"), NotifyReady()]
        return actions

    def _stop(self, worker: Worker, now: float) -> list[Action]:
        worker.stop_sent = now
        return [Kill(worker.pid, "TERM")]

    def _next_reload(self) -> list[Action]:
        while self.reload_queue:
            slot = self.reload_queue.pop(0)
            if slot < self.slots and (self.retiring is None or self.retiring.slot != slot):
                self.reloading = slot
                return [Spawn(slot)]
        return [Log("reload complete")]

    def _exited(self, event: Exited) -> list[Action]:
        worker = self.workers.pop(event.pid, None)
        if worker is None:
            return []
        how = f"exited with {event.code}" if event.code >= 0 else f"killed by signal {-event.code}"
        if worker.stop_sent is not None and event.code in (0, -SIGTERM):
            how = "stopped"  # as asked: servers re-raise the TERM they handled
        actions: list[Action] = []
        if self.phase is Phase.STOPPING:
            actions.append(Log(f"slot {worker.slot}: worker {worker.pid} {how}"))
            if not self.workers:
                actions.append(Exit(self.exit_code, self.exit_message))
            return actions
        if worker.stop_sent is not None:
            actions.append(Log(f"slot {worker.slot}: worker {worker.pid} {how}"))
            if self.retiring and self.retiring.slot == worker.slot and not self.slot_workers(worker.slot):
                actions += self._release_retired()
            return actions
        actions.append(Log(f"slot {worker.slot}: worker {worker.pid} {how}"))
        if not worker.ready and event.code == APP_LOAD_ERROR:
            return actions + self._fail(
                f"slot {worker.slot}: the worker could not load the app (its error is above)"
            )
        if self.reloading == worker.slot and not worker.ready:
            self.reloading = None
            self.reload_queue.clear()
            return actions + [
                Log(
                    f"reload aborted: the new worker for slot {worker.slot} failed; "
                    "the old workers keep serving"
                )
            ]
        if event.now - worker.started < self.boot_window:
            failures = self.boot_failures.get(worker.slot, 0) + 1
            self.boot_failures[worker.slot] = failures
            if failures >= 2:
                return actions + self._fail(
                    f"slot {worker.slot}: the worker died {failures} times within "
                    f"{self.boot_window:g} s of starting; stopping instead of looping"
                )
        else:
            self.boot_failures.pop(worker.slot, None)
        if not self.slot_workers(worker.slot):
            actions.append(Spawn(worker.slot))
        return actions

    def _fail(self, message: str) -> list[Action]:
        self.exit_code = APP_LOAD_ERROR
        self.exit_message = message
        return [Log(message), *self._stop_all(0.0, graceful=False)]

    def _stop_all(self, now: float, *, graceful: bool) -> list[Action]:
        self.phase = Phase.STOPPING
        self.reload_queue.clear()
        self.reloading = None
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
        if self.phase is Phase.STOPPING:
            # A second TERM/INT, or QUIT, while stopping: stop waiting.
            if event.name in ("TERM", "INT", "QUIT"):
                return [Log("stopping now"), *(Kill(pid, "KILL") for pid in self.workers)]
            return []
        if event.name in ("TERM", "INT"):
            return [
                Log(f"SIG{event.name}: graceful stop (up to {self.graceful_timeout:g} s)"),
                *self._stop_all(event.now, graceful=True),
            ]
        if event.name == "QUIT":
            return [Log("SIGQUIT: stopping now"), *self._stop_all(event.now, graceful=False)]
        if event.name == "HUP":
            if self.reloading is not None:
                self.reload_queue = list(range(self.slots))
                return [Log("SIGHUP: reload restarted")]
            self.reload_queue = list(range(self.slots))
            return [Log("SIGHUP: reloading slot by slot"), *self._next_reload()]
        if event.name == "TTIN":
            if self.retiring is not None:
                return [Log("SIGTTIN ignored: a slot is still retiring")]
            slot = self.slots
            self.slots += 1
            return [Log(f"SIGTTIN: adding slot {slot}"), AddSlot(slot), Spawn(slot)]
        if event.name == "TTOU":
            if self.slots <= 1:
                return [Log("SIGTTOU ignored: one slot is the minimum")]
            if self.retiring is not None:
                return [Log("SIGTTOU ignored: a slot is still retiring")]
            slot = self.slots - 1
            self.retiring = Retiring(slot, event.now)
            return [Log(f"SIGTTOU: retiring slot {slot}"), RetireSlot(slot)]
        return []

    def _tick(self, event: Tick) -> list[Action]:
        actions: list[Action] = []
        now = event.now
        if self.assume_ready_after is not None:
            for worker in list(self.workers.values()):
                if not worker.ready and now - worker.started >= self.assume_ready_after:
                    actions += self._ready(Ready(worker.pid, now))
        for worker in self.workers.values():
            late = worker.stop_sent is not None and now - worker.stop_sent > self.graceful_timeout
            if late and self.phase is not Phase.STOPPING:
                actions += [
                    Log(f"slot {worker.slot}: worker {worker.pid} ignored TERM; killing"),
                    Kill(worker.pid, "KILL"),
                ]
                worker.stop_sent = now  # once per timeout
        if self.phase is Phase.STOPPING and self.stop_deadline is not None and now > self.stop_deadline:
            self.stop_deadline = None
            actions += [Log("graceful timeout: killing the rest"), *(Kill(p, "KILL") for p in self.workers)]
        retiring = self.retiring
        if retiring and not retiring.stopping and self.phase is not Phase.STOPPING:
            settled = now - retiring.since >= DRAIN_SETTLE
            drained = event.pending.get(retiring.slot, 0) == 0
            if settled and (drained or now - retiring.since > self.graceful_timeout):
                retiring.stopping = True
                workers = self.slot_workers(retiring.slot)
                for worker in workers:
                    actions += self._stop(worker, now)
                if not workers:
                    actions += self._release_retired()
        return actions

    def _release_retired(self) -> list[Action]:
        """The retiring slot has no worker left: close its socket."""
        assert self.retiring is not None
        slot = self.retiring.slot
        self.retiring = None
        self.slots -= 1
        return [ReleaseSlot(slot), Log(f"slot {slot} retired; {self.slots} slots")]
