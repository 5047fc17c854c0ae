"""The options on the command line: argparse arguments, their EBPF_STICKY_* twins, and ``run()``'s
keywords written as the same flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .table import OPTIONS


def argv(keywords: dict[str, Any]) -> list[str]:
    """``run(app, ssl_certfile=..., access_log=True, header=[...])``: the same options as flags."""
    # uvicorn.run's names: the flag's, with the repeatable ones plural (headers, reload_dirs, ...).
    by_name = {option.dest + ("s" if option.kind == "list" else ""): option for option in OPTIONS}
    flags: list[str] = []
    for name, value in keywords.items():
        option = by_name.get(name)
        if option is None or option.kind == "bind":
            raise ConfigError(
                f"run() got {name}=: not a uvicorn option ebpf-sticky takes (see launch --help)"
            )
        if option.kind == "switch":
            flags.append(option.flag if value else f"--no-{option.flag[2:]}")
        elif option.kind == "list":
            for item in [value] if isinstance(value, str) else value:
                # headers=[("X-A", "1")], as uvicorn.run takes them, or "X-A: 1"
                flags += [option.flag, item if isinstance(item, str) else ":".join(map(str, item))]
        else:
            flags += [option.flag, str(value)]
    return flags


def whole_number(text: str) -> int:
    """argparse type for integers, with a message that names the value (cli.py uses it too)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on", "t", "y"):
        return True
    if value in ("0", "false", "no", "off", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _twin_bool(parser: argparse.ArgumentParser, name: str, text: str) -> bool:
    try:
        return _bool(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"EBPF_STICKY_{name.upper().replace('-', '_')}: {exc}")


_METAVARS = {"int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "str": "TEXT"}  # uvicorn's (click's)


def add_arguments(parser: argparse.ArgumentParser, env: Callable[[str], str | None]) -> None:
    """uvicorn's options, each with its EBPF_STICKY_* twin read through ``env``."""
    group = parser.add_argument_group("uvicorn options (per worker; uvicorn's names and meanings)")
    for option in OPTIONS:
        name = option.flag[2:]
        twin = env(name)
        if option.kind == "bind":
            metavar = option.flag[2:].upper()
            group.add_argument(option.flag, action=_BindPart, dest="bind", metavar=metavar, help=option.help)
            if twin is not None:
                namespace = argparse.Namespace(bind=parser.get_default("bind"))
                _BindPart([option.flag], "bind")(parser, namespace, twin, option.flag)
                parser.set_defaults(bind=namespace.bind)
        elif option.kind == "switch":
            group.add_argument(
                option.flag,
                action=argparse.BooleanOptionalAction,
                default=None if twin is None else _twin_bool(parser, name, twin),
                help=option.help,
            )
        elif option.kind == "list":
            # Repeatable; the twin holds one value per line.
            default = None if twin is None else [line for line in twin.splitlines() if line.strip()]
            group.add_argument(option.flag, action="append", default=None, metavar="TEXT", help=option.help)
            parser.set_defaults(**{f"_{option.dest}_env": default})
        else:
            convert: Callable[[str], Any] = {"int": whole_number, "float": _float, "bool": _bool}.get(
                option.kind, str
            )
            group.add_argument(
                option.flag,
                type=convert,
                default=twin,
                choices=option.choices or None,
                metavar=None if option.choices else _METAVARS[option.kind],
                help=option.help,
            )


class _BindPart(argparse.Action):
    """--host and --port rewrite --bind as they are parsed (with --bind, the last one given wins)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        part = str(values)
        if option_string == "--host":
            namespace.bind = bind_text(namespace.bind, part, None)
        elif not part.isdigit():
            raise argparse.ArgumentError(self, f"expected a port number, got {part!r}")
        else:
            namespace.bind = bind_text(namespace.bind, None, int(part))


def bind_text(bind: str, host: str | None, port: int | None) -> str:
    """--host/--port replace the matching half of --bind, as uvicorn's pair would."""
    if host is None and port is None:
        return bind
    bind_host, _, bind_port = bind.rpartition(":")
    if host is not None:
        bind_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{bind_host}:{bind_port if port is None else port}"
