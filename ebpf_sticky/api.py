"""`ebpf_sticky.run(app)`: launch from a script's ``if __name__ == "__main__":`` block."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from . import config
from .config import Launch
from .errors import ConfigError
from .hashing import DEFAULT_PREFIX4, DEFAULT_PREFIX6
from .options import from_keywords
from .settings import ENV_PREFIX, env_twin, launch_settings


def locate(app: Any) -> str:
    """The ``path.py:attr`` or ``module:attr`` a worker imports to get ``app`` back.

    Workers import the script as a module (not as ``__main__``), so the block that called ``run``
    does not run again in them.
    """
    if isinstance(app, str):
        return app
    main = sys.modules.get("__main__")
    modules = [main] if main is not None else []
    modules += [m for name, m in sys.modules.items() if name != "__main__" and m is not None]
    for module in modules:
        for name, value in list(vars(module).items()):
            if value is app and not name.startswith("_"):
                if module is main:
                    path = getattr(module, "__file__", None)
                    if path is None:
                        break
                    return f"{os.path.relpath(path)}:{name}"
                return f"{module.__name__}:{name}"
    raise ConfigError("cannot find the app at module level: pass it as a 'path/app.py:attr' string")


def run(
    app: Any,
    *,
    bind: str = config.DEFAULT_BIND,
    workers: int | None = None,
    factory: bool = False,
    loader: str = "auto",
    hash_key: str | None = None,
    prefix4: int = DEFAULT_PREFIX4,
    prefix6: int = DEFAULT_PREFIX6,
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    user: str | None = None,
    group: str | None = None,
    pid_file: str | None = None,
    metrics: str | None = None,
    session_keys: Sequence[str] = (),
    proxy_protocol: bool = False,
    **uvicorn: Any,
) -> int:
    """Serve ``app`` (an ASGI/WSGI app, a factory with ``factory=True``, or a target string) with
    sticky workers until stopped; returns the exit status. The settings of `ebpf-sticky launch`,
    checked by the same function: uvicorn's options go by their ``uvicorn.run`` names
    (``ssl_certfile=...``, ``access_log=True``, ``limit_max_requests=...``), and what is not given
    falls back to its EBPF_STICKY_* twin (``workers``: the CPU count). Raises ``ConfigError`` for a
    bad argument, before anything starts, and the other ``StickyError``s for what the kernel or
    the app refuses."""
    settings = launch_settings(
        target=locate(app),
        bind=bind,
        workers=workers if workers is not None else _twin_count("workers"),
        factory=factory,
        loader=loader,
        hash_key=hash_key if hash_key is not None else env_twin("hash-key"),
        prefix4=prefix4,
        prefix6=prefix6,
        graceful_timeout=graceful_timeout,
        log_level=log_level,
        user=user if user is not None else env_twin("user"),
        group=group if group is not None else env_twin("group"),
        pid_file=pid_file if pid_file is not None else env_twin("pid-file"),
        metrics=metrics if metrics is not None else env_twin("metrics"),
        uvicorn=from_keywords(uvicorn, env_twin),
        session_keys=session_keys,
        proxy_protocol=proxy_protocol,
    )
    return serve(settings)


def _twin_count(name: str) -> int | None:
    text = env_twin(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected a whole number, got {text!r}") from None


def serve(settings: Launch) -> int:
    """Run a validated launch until it stops; returns the exit status (the CLI's path too)."""
    from .supervisor.loop import configure_logging, launch

    configure_logging(settings.log_level)
    return launch(settings)
