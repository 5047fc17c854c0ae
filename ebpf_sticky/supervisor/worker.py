"""The worker side: import the target after exec and serve it with uvicorn on the slot's socket.

Run by the master as ``python -m ebpf_sticky.supervisor.worker TARGET [--factory]`` with the slot's
listening socket on fd 3 (systemd socket-activation convention, ``LISTEN_FDS=1``). The worker holds
no BPF fd and no other slot's socket: the master execs it with only fd 3 open.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import random
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..stopping import run_stop_hooks
from ..uvicorn_options import ACCESS_LOG, WorkerOptions
from .core import APP_LOAD_ERROR
from .reports import encode_load_error

LISTEN_FD = 3
# The master hands each worker its uvicorn options here (JSON), not in argv: argv is world-readable
# in /proc and may carry the key's password.
OPTIONS_ENV = "EBPF_STICKY_WORKER_OPTIONS"
# What a worker tells the master (sd_notify) once it has served its --limit-max-requests.
RECYCLE = "RECYCLE=1"
APP_NAMES = ("app", "application")
# On stop, how long a worker keeps connections it has just accepted before closing idle ones:
# a connection accepted a moment before TERM has often not delivered its request yet, and
# uvicorn would reset it as idle. The slot's socket stays open in the master, so connections not
# yet accepted are never at risk: the next worker on the slot takes them.
STOP_GRACE = 0.5


@dataclass(frozen=True)
class Target:
    """Where the app lives: a file path or a module name, and an attribute (None: find it)."""

    location: str
    attr: str | None
    is_path: bool


def parse_target(text: str) -> Target:
    location, sep, attr = text.rpartition(":") if ":" in text else (text, "", "")
    if sep and not attr:
        raise ConfigError(f"target {text!r}: nothing after ':' (write path/app.py:app or module:app)")
    is_path = location.endswith(".py") or "/" in location
    if not is_path and not all(part.isidentifier() for part in location.split(".")):
        raise ConfigError(
            f"target {text!r}: expected path/to/app.py, path/to/app.py:attr or package.module:attr"
        )
    if not is_path and not sep:
        raise ConfigError(f"target {text!r}: name the attribute too, e.g. {text}:app")
    return Target(location, attr or None, is_path)


def module_dir(app_dir: str | None) -> str:
    """Where a module TARGET is imported from, in the master's check and in the worker alike."""
    return os.path.abspath(app_dir) if app_dir is not None else os.getcwd()


def check_target_exists(target: Target, app_dir: str | None = None) -> None:
    """Fail in the master, before any fork, for the commonest mistakes: a wrong path or module."""
    if target.is_path:
        if not Path(target.location).is_file():
            raise ConfigError(f"target file {target.location!r} does not exist (relative to {os.getcwd()})")
        return
    directory = module_dir(app_dir)
    missing = missing_module(target.location, directory)
    if missing is not None:
        raise ConfigError(
            f"target {target.location}:{target.attr}: no module named {missing!r} (searched {directory} "
            "and the installed packages): check the name, or launch from the directory that holds it"
        )


def missing_module(name: str, directory: str) -> str | None:
    """The first part of a dotted module name that cannot be found, or None; runs none of its code.

    The master must not import the user's module (its side effects belong in the workers), so it
    only searches, from the directory workers import from. ``find_spec`` of a submodule would
    import its parent package, so packages are searched through their ``__path__`` locations
    with ``PathFinder`` instead (a package that rewrites ``__path__`` at import time is not seen).
    """
    parts = name.split(".")
    sys.path.insert(0, directory)
    try:
        spec = importlib.util.find_spec(parts[0])
    except ValueError:  # already imported without a spec: it exists
        return None
    finally:
        sys.path.pop(0)
    for depth in range(1, len(parts)):
        if spec is None:
            return ".".join(parts[:depth])
        if spec.submodule_search_locations is None:  # a module, not a package: no submodules
            return ".".join(parts[: depth + 1])
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: depth + 1]), list(spec.submodule_search_locations)
        )
    return name if spec is None else None


def _import(target: Target, app_dir: str | None = None) -> Any:
    if not target.is_path:
        sys.path.insert(0, module_dir(app_dir))
        return importlib.import_module(target.location)
    path = Path(target.location).resolve()
    # Like `python app.py`: the app's directory comes first, so its sibling modules import.
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {target.location!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def _looks_like_app(value: Any) -> bool:
    return callable(value) and not inspect.isclass(value) and not inspect.ismodule(value)


def find_app(module: Any, target: Target) -> Any:
    if target.attr is not None:
        if not hasattr(module, target.attr):
            raise ConfigError(f"{target.location!r} has no attribute {target.attr!r}")
        return getattr(module, target.attr)
    for name in APP_NAMES:
        if hasattr(module, name):
            return getattr(module, name)
    candidates = sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and _looks_like_app(value)
        and getattr(value, "__module__", module.__name__) == module.__name__
    )
    seen = ", ".join(f"{target.location}:{name}" for name in candidates) or "no callables"
    raise ConfigError(f"no 'app' or 'application' in {target.location!r}; saw {seen}: name one as PATH:ATTR")


def is_asgi(app: Any) -> bool:
    """ASGI apps are coroutine functions (or objects whose __call__ is); WSGI apps are not."""
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 - the attribute itself is what we inspect
    return inspect.iscoroutinefunction(call)


def load_app(
    target: Target, factory: bool, interface: str = "auto", app_dir: str | None = None
) -> Callable[..., Any]:
    app: Callable[..., Any] = find_app(_import(target, app_dir), target)
    if factory:
        app = app()
    if not callable(app):
        raise ConfigError(f"{target.location}: the app is not callable (is it a factory? add --factory)")
    # uvicorn wraps an ASGI2 app itself (interface="asgi2"); WSGI goes through a2wsgi.
    if interface in ("asgi3", "asgi2") or (interface == "auto" and is_asgi(app)):
        return app
    from a2wsgi import WSGIMiddleware

    wrapped: Callable[..., Any] = WSGIMiddleware(app)
    return wrapped


def check_readable(options: WorkerOptions) -> None:
    """The master checked the TLS files as itself; a worker reads them after dropping to --user."""
    for keyword in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
        path = options.config.get(keyword)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(
                f"--{keyword.replace('_', '-')} {path!r}: uid {os.getuid()} cannot read it ({exc.strerror}): "
                "make it readable by the --user/--group the workers run as"
            ) from None


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def _server(config: Any, max_requests: int | None) -> Any:
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

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:
                server.close()  # stop accepting first ...
            await run_stop_hooks(STOP_GRACE)  # ... let the app release requests it holds open ...
            await asyncio.sleep(STOP_GRACE)  # ... so just-accepted connections get their request in
            await super().shutdown(sockets)

    return Server(config)


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
        sd_notify("READY=1")
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
    server = _server(config, max_requests(options))
    return _run(_serve(server, sock), config.get_loop_factory())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ebpf-sticky-worker")
    parser.add_argument("target")
    parser.add_argument("--factory", action="store_true")
    parser.add_argument("--graceful-timeout", type=float, default=30.0)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    slot = os.environ.get("EBPF_STICKY_WORKER", "?")
    text = os.environ.pop(OPTIONS_ENV, None)
    options = WorkerOptions.from_json(text) if text else WorkerOptions()
    try:
        if options.env_file is not None:
            # Before the import, as uvicorn does: the app may read its settings at import time.
            from dotenv import load_dotenv

            load_dotenv(options.env_file)
        check_readable(options)
        app = load_app(parse_target(args.target), args.factory, options.interface, options.app_dir)
    except ConfigError as exc:
        return report_load_error(f"slot {slot}: {exc}", "")
    except Exception as exc:
        import traceback

        return report_load_error(
            f"slot {slot}: importing {args.target} raised {type(exc).__name__}: {exc}", traceback.format_exc()
        )
    sock = socket.socket(fileno=LISTEN_FD)
    started = serve(app, sock, options, args.graceful_timeout, args.log_level)
    return 0 if started else APP_LOAD_ERROR


if __name__ == "__main__":
    sys.exit(main())
