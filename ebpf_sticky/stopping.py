"""Hooks an app registers to run the moment its worker begins to stop.

A stopping uvicorn worker stops accepting, then waits (up to the graceful timeout) for the requests
in flight, and only then sends the ASGI lifespan shutdown. A request the app holds open on purpose
(server-sent events, a long-poll of its own) keeps the worker alive that long, and the lifespan
shutdown comes too late to release it. A hook registered here runs right after the worker stops
accepting and has told its keep-alive connections to close, before that wait: the place to answer
held requests so their clients come back, to the slot's new worker on HUP. Socket.IO and
Engine.IO apps (python-socketio's ``ASGIApp``) need no hook: the worker releases their sessions
itself (``supervisor/longpoll.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("ebpf_sticky")

StopHook = Callable[[], Awaitable[None]]
_hooks: list[StopHook] = []


def on_stop(hook: StopHook) -> StopHook:
    """Register ``async def hook()`` to run when this worker begins to stop (usable as a decorator)."""
    _hooks.append(hook)
    return hook


async def run_stop_hooks(timeout: float, hooks: Sequence[StopHook] | None = None) -> None:
    """Run ``hooks`` (by default every registered one), each bounded by ``timeout``; a failing
    hook is logged, never fatal."""
    for hook in list(_hooks if hooks is None else hooks):
        try:
            await asyncio.wait_for(hook(), timeout)
        except Exception as exc:  # the worker must stop whatever an app hook does
            log.warning(
                "stop hook %s failed: %s: %s", getattr(hook, "__name__", hook), type(exc).__name__, exc
            )
