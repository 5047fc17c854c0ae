"""`--reload`: watch the files (watchfiles, with uvicorn's patterns) and send the master SIGHUP.

The master's HUP path does the rest: slot by slot, a new worker starts on the slot's socket and the
old one stops once the new one is ready. Every client keeps its slot, and connections that arrive
meanwhile wait in the slot's queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from ..options import Reload

log = logging.getLogger("ebpf_sticky")


def _watch(reload: Reload, stop: threading.Event) -> None:
    from uvicorn import Config
    from uvicorn.supervisors.watchfilesreload import FileFilter
    from watchfiles import watch

    # uvicorn's own resolution of the directories and patterns, so they mean what they mean there.
    config = Config(
        "app:app",
        reload=True,
        reload_dirs=list(reload.dirs),
        reload_includes=list(reload.includes),
        reload_excludes=list(reload.excludes),
        log_config=None,
    )
    keep = FileFilter(config)
    # watchfiles logs every batch at INFO, filtered or not: a log file in a watched directory would
    # feed it forever. Changes the patterns drop never wake us.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    for changes in watch(
        *config.reload_dirs,
        watch_filter=lambda _change, path: keep(Path(path)),
        stop_event=stop,
        step=max(1, int(reload.delay * 1000)),
        ignore_permission_denied=True,
    ):
        changed = ", ".join(sorted({path for _, path in changes}))
        log.info("--reload: %s changed; replacing every worker", changed)
        os.kill(os.getpid(), signal.SIGHUP)


@contextlib.contextmanager
def watching(reload: Reload | None) -> Iterator[None]:
    """Watch in a thread for as long as the context lasts (nothing at all without --reload)."""
    if reload is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(reload, stop), name="reloader", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
