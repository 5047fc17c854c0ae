"""What a master hands to the image that replaces it: its launch settings and its running state. Pure.

An in-place upgrade execs a new image in the same process, and a restart under systemd starts one
that adopts the sockets systemd kept. Either way the new image must go on as the same group: the
same hash key (or every client moves), the same sockets (or queued connections are reset), the
same workers. This module turns that state into JSON and back; the file descriptors themselves
travel by inheritance and are named here by number.

The text holds the hash key and perhaps a TLS key's password: it goes through an inherited memfd,
never argv or the environment (both readable in /proc).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .activation import SessionFds
from .addresses import Bind
from .config import Launch
from .hashing import HashSpec
from .options import WorkerOptions
from .supervisor.core import Carried


def _bind(data: dict[str, Any]) -> Bind:
    return Bind(str(data["host"]), int(data["port"]), int(data["family"]), bool(data["dual_stack"]))


def _spec(data: dict[str, Any]) -> HashSpec:
    return HashSpec(bytes.fromhex(data["key"]), int(data["prefix4"]), int(data["prefix6"]))


# Fields that are not plain JSON values. Any other field (str, int, float, bool, None) travels as is,
# so a new plain setting needs nothing here; a tuple needs a decoder, since JSON gives it back as a
# list (tests/unit/test_handover.py draws every field, so one left out fails there).
_ENCODE: dict[str, Callable[[Any], Any]] = {
    "bind": dataclasses.asdict,
    "metrics": lambda bind: None if bind is None else dataclasses.asdict(bind),
    "spec": lambda spec: {"key": spec.key.hex(), "prefix4": spec.prefix4, "prefix6": spec.prefix6},
    "uvicorn": lambda options: json.loads(options.to_json()),
    "command": list,
}
_DECODE: dict[str, Callable[[Any], Any]] = {
    "bind": _bind,
    "metrics": lambda data: None if data is None else _bind(data),
    "spec": _spec,
    "uvicorn": lambda data: WorkerOptions.from_json(json.dumps(data)),
    "command": tuple,
    "session_keys": tuple,
}


def launch_to_dict(launch: Launch) -> dict[str, Any]:
    return {
        f.name: _ENCODE.get(f.name, lambda value: value)(getattr(launch, f.name))
        for f in dataclasses.fields(launch)
    }


def launch_from_dict(data: dict[str, Any]) -> Launch:
    """The settings again, validated again (``Launch.__post_init__``): a newer image that refuses
    them says so before it takes over."""
    return Launch(**{name: _DECODE.get(name, lambda value: value)(value) for name, value in data.items()})


@dataclass(frozen=True)
class Routing:
    """The router's kernel objects by fd, and what the new image cannot read back from them."""

    loader: str  # the loader running, never "auto"
    sockets: tuple[int, ...]  # in slot order (= the kernel's order in the group)
    insn_count: int
    program: int | None = None  # the eBPF program (native, bcc)
    maps: tuple[int, int, int, int] | None = None  # socks, table, live, counters (native, bcc)
    live_table: int = 0  # which of the two bucket tables the live word names


@dataclass(frozen=True)
class Handover:
    launch: Launch
    routing: Routing
    generation: int  # in-place upgrades since launch, this one included
    started: float  # time.monotonic() at launch (one clock for the whole system)
    control: int  # the control socket's listener
    control_path: str
    notify: int  # the socket workers send READY=1 to; they know it by name
    notify_name: str
    metrics: int | None = None  # the /metrics listener
    workers: tuple[Carried, ...] = ()  # the workers, as the core saw them
    sessions: SessionFds | None = None  # None: no session layer, or an image before it was carried

    def fds(self) -> list[int]:
        """Every fd the new image needs inherited."""
        r = self.routing
        fds = [*r.sockets, *(r.maps or ()), self.control, self.notify]
        if self.sessions is not None:
            fds += [self.sessions.table, *(fd for pair in self.sessions.channels for fd in pair)]
        return fds + [fd for fd in (r.program, self.metrics) if fd is not None]

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["launch"] = launch_to_dict(self.launch)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Handover:
        data = json.loads(text)
        routing = data.pop("routing")
        maps = routing.pop("maps")
        workers = data.pop("workers")
        sessions = data.pop("sessions", None)  # absent from an image that did not carry them
        return cls(
            **{**data, "launch": launch_from_dict(data["launch"])},
            routing=Routing(
                **{**routing, "sockets": tuple(routing["sockets"])},
                maps=None if maps is None else (maps[0], maps[1], maps[2], maps[3]),
            ),
            workers=tuple(Carried(**w) for w in workers),
            sessions=None
            if sessions is None
            else SessionFds(sessions["table"], tuple((r, s) for r, s in sessions["channels"])),
        )
