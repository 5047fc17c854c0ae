"""The options on the command line: argparse arguments and their EBPF_STICKY_* twins."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from .table import OPTIONS, Option


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


def twin_name(option: Option) -> str:
    return "EBPF_STICKY_" + option.flag[2:].upper().replace("-", "_")


def text_value(option: Option, text: str) -> Any:
    """The value of an option's EBPF_STICKY_* twin: a switch takes 1/0 (true/false...), a
    repeatable option one value per line."""
    convert: Callable[[str], Any] = {
        "list": lambda t: [line for line in t.splitlines() if line.strip()],
        "switch": _bool,
        "bool": _bool,
        "int": whole_number,
        "float": _float,
    }.get(option.kind, str)
    try:
        value = convert(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{twin_name(option)}: {exc}") from None
    if option.choices and value not in option.choices:
        raise ConfigError(f"{twin_name(option)}: expected one of {', '.join(option.choices)}, got {text!r}")
    return value


def _twin(parser: argparse.ArgumentParser, option: Option, text: str | None) -> Any:
    try:
        return None if text is None else text_value(option, text)
    except ConfigError as exc:
        parser.error(str(exc))


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
                default=_twin(parser, option, twin),
                help=option.help,
            )
        elif option.kind == "list":
            # Repeatable; the twin holds one value per line.
            group.add_argument(option.flag, action="append", default=None, metavar="TEXT", help=option.help)
            parser.set_defaults(**{f"_{option.dest}_env": _twin(parser, option, twin)})
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
