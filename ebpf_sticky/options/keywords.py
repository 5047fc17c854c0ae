"""``run()``'s keywords, by ``uvicorn.run``'s names, to the same validated ``WorkerOptions`` the
command line gives: no flags are written and parsed back."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError
from .arguments import text_value
from .model import WorkerOptions
from .table import OPTIONS, Option
from .validate import from_args


def keyword(option: Option) -> str:
    """``uvicorn.run``'s name for it: the flag's, the repeatable ones plural (``headers``)."""
    return option.dest + ("s" if option.kind == "list" else "")


def from_keywords(keywords: Mapping[str, Any], env: Callable[[str], str | None]) -> WorkerOptions:
    """The options given as keywords; each one not given falls back to its EBPF_STICKY_* twin
    (read through ``env``), as on the command line."""
    by_keyword = {keyword(option): option for option in OPTIONS if option.kind != "bind"}
    unknown = sorted(set(keywords) - set(by_keyword))
    if unknown:
        raise ConfigError(
            f"run() got {unknown[0]}=: not a uvicorn option ebpf-sticky takes (see launch --help)"
        )
    values: dict[str, Any] = {}
    for name, option in by_keyword.items():
        if name in keywords:
            values[option.dest] = _python_value(option, name, keywords[name])
        else:
            twin = env(option.flag[2:])
            values[option.dest] = None if twin is None else text_value(option, twin)
        if option.kind == "list":
            values[f"_{option.dest}_env"] = None
    return from_args(argparse.Namespace(**values))


def _python_value(option: Option, name: str, value: Any) -> Any:
    expected = {
        "switch": (bool,),
        "bool": (bool,),
        "int": (int,),
        "float": (int, float),
        "str": (str,),
        "choice": (str,),
    }.get(option.kind)
    if expected is not None:
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            kinds = " or ".join(kind.__name__ for kind in expected)
            raise ConfigError(f"run() got {name}={value!r}: expected {kinds}")
        if option.choices and value not in option.choices:
            raise ConfigError(f"run() got {name}={value!r}: expected one of {', '.join(option.choices)}")
        return value
    # A repeatable option: one value or several; headers=[("X-A", "1")] as uvicorn.run takes them.
    items = [value] if isinstance(value, (str, tuple)) else list(value)
    return [item if isinstance(item, str) else ":".join(map(str, item)) for item in items]
