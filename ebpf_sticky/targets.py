"""What to serve: parse a TARGET (path, path:attr, module:attr), check it exists, import it.

The master only checks (it must not run the user's code: import side effects belong in the
workers); each worker imports. Both search from the same directory (``module_dir``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

APP_NAMES = ("app", "application")


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


def import_target(target: Target, app_dir: str | None = None) -> Any:
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
    app: Callable[..., Any] = find_app(import_target(target, app_dir), target)
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
