"""The worker side: import the target after exec and serve it with uvicorn on the slot's socket.

Run by the master as ``python -c contract.WORKER_BOOT TARGET [--factory]`` (which makes the process
non-dumpable first, then runs this module) with the slot's listening socket on fd 3 (systemd
socket-activation convention, ``LISTEN_FDS=1``) and its options on fd 4, read once and closed. The
worker holds no BPF fd and no other slot's socket: the master execs it with only those open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import sys
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..contract import (
    APP_LOAD_ERROR,
    LISTEN_FD,
    OPTIONS_FD,
    READY,
    RECYCLE,
    WORKER_ENV,
    decode_channel,
    encode_load_error,
)
from ..errors import ConfigError
from ..notify import sd_notify
from ..options import ACCESS_LOG, WorkerOptions
from ..sessions.settings import SessionSettings
from ..stopping import run_stop_hooks
from ..targets import load_app, parse_target
from .draining import close_keep_alive
from .longpoll import releasers

if TYPE_CHECKING:
    from ..sessions.runtime import Layer

# On stop, how long a worker keeps connections it has just accepted before closing idle ones:
# a connection accepted a moment before TERM has often not delivered its request yet, and
# uvicorn would reset it as idle. The slot's socket stays open in the master, so connections not
# yet accepted are never at risk: the next worker on the slot takes them.
STOP_GRACE = 0.5


def check_readable(options: WorkerOptions) -> None:
    """The master checked the files as itself (and as the workers' user, in its probe); a worker
    reads them after dropping to --user. An --env-file it cannot read would be skipped silently."""
    for flag, path in options.files():
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{flag} {path!r}: uid {os.getuid()} cannot read it ({exc.strerror}): "
                "make it readable by the --user/--group the workers run as"
            ) from None


def _server(config: Any, max_requests: int | None, layer: Layer | None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        recycle_sent = False

        async def on_tick(self, counter: int) -> bool:
            # uvicorn's own --limit-max-requests would exit and leave the slot without a worker
            # until the master noticed; instead the master starts the successor first (the once-a-
            # tick check, every 0.1 s, is uvicorn's own: nothing is added per request).
            if (
                max_requests is not None
                and not self.recycle_sent
                and self.server_state.total_requests >= max_requests
            ):
                self.recycle_sent = True
                sd_notify(RECYCLE)
            return bool(await super().on_tick(counter))

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            # uvicorn acts on the signal at its next tick (0.1 s, longer under load). On HUP the
            # slot's new worker already accepts from the same socket: while both do, a client's new
            # connections are split between them, and a session the new worker holds can see a
            # request answered "unknown session" by this one (python-engineio's client then stops
            # sending, while its long-poll waits at the new worker for pingInterval). Stop
            # accepting now, from the loop (a signal handler must not touch it directly); with no
            # loop running (not serving yet, or done) there is nothing to stop.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon_threadsafe(self.stop_accepting)

        def stop_accepting(self) -> None:
            for server in getattr(self, "servers", []):  # uvicorn sets it in startup()
                server.close()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if layer is not None and self.started:
                layer.start_receiving()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if layer is not None:
                layer.stop_receiving()  # handoffs still queued wait for the slot's next worker
            connections, app = self.server_state.connections, self.config.loaded_app
            self.stop_accepting()  # first (if the signal did not already) ...
            # ... so that a client whose connection closes comes back through the slot's socket, to
            # the slot's next worker: close keep-alive connections before answering held requests,
            # or their clients would send the next request (and long-poll) here again ...
            close_keep_alive(connections, just_accepted=False)
            # ... then answer held requests: Engine.IO long-polls, and whatever the app's hooks hold ...
            await run_stop_hooks(STOP_GRACE, releasers(app, first=True))
            await run_stop_hooks(STOP_GRACE)
            await asyncio.sleep(STOP_GRACE)  # ... so just-accepted connections get their request in
            # A request that came in meanwhile on a just-accepted connection may be a long-poll too.
            close_keep_alive(connections, just_accepted=True)
            await run_stop_hooks(STOP_GRACE, releasers(app, first=False))
            await super().shutdown(sockets)

    from .accepting import install as cheaper_accepts

    cheaper_accepts(config)  # before the session layer's install, which wraps the class it finds
    server = Server(config)
    if layer is not None:
        from ..sessions.service import install

        install(config, server, layer)
    return server


def max_requests(options: WorkerOptions) -> int | None:
    """This worker's request budget: the limit plus its own random share of the jitter."""
    if options.limit_max_requests is None:
        return None
    return options.limit_max_requests + random.randint(0, options.limit_max_requests_jitter)


async def _serve(server: Any, sock: socket.socket) -> bool:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    started: bool = server.started
    if started:
        sd_notify(READY)
    await task
    return started


def report_load_error(summary: str, detail: str) -> int:
    """Tell the master (which shows each distinct error once); print it only if that fails."""
    try:
        sd_notify(encode_load_error(summary, detail))
        if os.environ.get("NOTIFY_SOCKET"):
            return APP_LOAD_ERROR
    except OSError:
        pass
    print(f"{detail}ebpf-sticky: {summary}", file=sys.stderr, flush=True)
    return APP_LOAD_ERROR


def _run(
    main: Coroutine[Any, Any, bool], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
) -> bool:
    """asyncio.run on the event loop uvicorn's --loop chose (uvloop by default when installed)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(main)
    loop = loop_factory() if loop_factory is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def serve(
    app: Callable[..., Any],
    sock: socket.socket,
    options: WorkerOptions,
    graceful_timeout: float,
    log_level: str,
    layer: Layer | None = None,
) -> bool:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=round(graceful_timeout),
        backlog=options.backlog,  # asyncio listen()s again with it: keep the master's value
        # An ASGI2 app is wrapped by uvicorn; a WSGI one was wrapped by a2wsgi already.
        interface="asgi2"
        if options.interface == "asgi2"
        else "asgi3"
        if options.interface == "asgi3"
        else "auto",
        **{"access_log": ACCESS_LOG, **options.config},
    )
    server = _server(config, max_requests(options), layer)
    return _run(_serve(server, sock), config.get_loop_factory())


def read_options() -> tuple[WorkerOptions, str | None]:
    """The options (and session settings) the master put on ``OPTIONS_FD``, read once; the fd is
    closed so nothing the app runs later finds the key's password there."""
    try:
        with open(OPTIONS_FD, "rb") as channel:
            data = channel.read()
    except OSError:  # started by hand, without the master
        return WorkerOptions(), None
    if not data:
        return WorkerOptions(), None
    options, sessions = decode_channel(data)
    return WorkerOptions.from_json(options), sessions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebpf-sticky-worker")
    parser.add_argument("target")
    parser.add_argument("--factory", action="store_true")
    parser.add_argument("--graceful-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    slot = os.environ.get(WORKER_ENV, "?")
    options, sessions_text = read_options()
    sock = socket.socket(fileno=LISTEN_FD)
    layer = None
    try:
        check_readable(options)
        if sessions_text:
            from ..sessions.service import open_layer

            # Before the import: python-engineio's ids are issued from the start.
            layer = open_layer(SessionSettings.from_json(sessions_text), int(slot), sock.family)
        if options.env_file is not None:
            # Before the import, as uvicorn does: the app may read its settings at import time.
            from dotenv import load_dotenv

            load_dotenv(options.env_file)
        app = load_app(parse_target(args.target), args.factory, options.interface, options.app_dir)
    except ConfigError as exc:
        return report_load_error(f"slot {slot}: {exc}", "")
    except Exception as exc:
        import traceback

        return report_load_error(
            f"slot {slot}: importing {args.target} raised {type(exc).__name__}: {exc}", traceback.format_exc()
        )
    started = serve(app, sock, options, args.graceful_timeout, args.log_level, layer)
    return 0 if started else APP_LOAD_ERROR


if __name__ == "__main__":
    sys.exit(main())
