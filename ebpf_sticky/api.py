"""`ebpf_sticky.run(app)`: launch from a script's ``if __name__ == "__main__":`` block."""

from __future__ import annotations

import os
import sys
from typing import Any

from . import config
from .errors import ConfigError, StickyError
from .hashing import DEFAULT_PREFIX4, DEFAULT_PREFIX6


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
    **uvicorn: Any,
) -> int:
    """Serve ``app`` (an ASGI/WSGI app, a factory with ``factory=True``, or a target string) with
    sticky workers until stopped; returns the exit status. Exactly `ebpf-sticky launch`: the same
    validation, defaults and one-line errors. uvicorn's options go by their ``uvicorn.run`` names
    (``ssl_certfile=...``, ``access_log=True``, ``limit_max_requests=...``)."""
    from .cli import main, report
    from .options import argv as uvicorn_argv

    try:
        target = locate(app)
        extra = uvicorn_argv(uvicorn)
    except StickyError as exc:
        return report(exc)
    argv = [
        "launch",
        target,
        "--bind",
        bind,
        "--loader",
        loader,
        "--prefix4",
        str(prefix4),
        "--prefix6",
        str(prefix6),
        "--graceful-timeout",
        str(graceful_timeout),
        "--log-level",
        log_level,
    ]
    argv += ["--workers", str(workers)] if workers is not None else []
    argv += ["--hash-key", hash_key] if hash_key is not None else []
    argv += ["--factory"] if factory else []
    return main(argv + extra)
