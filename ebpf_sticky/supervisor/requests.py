"""The control socket's requests: one line of bytes in, a validated request or ``BadRequest`` out.

Pure, and strict on purpose: anyone of the master's uid can write to the socket (its workers
included, when they share it), so every shape, size and depth is checked before anything reads
the request. The schema, one JSON object per line:

* ``{"cmd": "status"}``
* ``{"cmd": "route", "addresses": ["192.0.2.7", "2001:db8::1", ...]}`` (1..``MAX_ADDRESSES``)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..hashing import Address, parse_address

MAX_REQUEST = 65536  # bytes in one request line
MAX_DEPTH = 2  # the deepest valid request is an object holding a list
MAX_ADDRESSES = 1024
MAX_ADDRESS = 64  # characters: the longest IPv6 text with brackets and spaces fits


class BadRequest(ValueError):
    """The request does not follow the schema; its message says how, for the client."""


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Route:
    addresses: tuple[tuple[str, Address], ...]  # as the client wrote it, and parsed


Request = Status | Route


def parse_request(data: bytes) -> Request:
    if len(data) > MAX_REQUEST:
        raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
    if depth(data) > MAX_DEPTH:
        raise BadRequest(f"request nested deeper than {MAX_DEPTH} levels")
    try:
        message = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of 5000 digits
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadRequest(f"a request is a JSON object, not {type(message).__name__}")
    match message.get("cmd"):
        case "status":
            _only_keys(message, {"cmd"})
            return Status()
        case "route":
            _only_keys(message, {"cmd", "addresses"})
            return Route(_addresses(message.get("addresses")))
        case other:
            raise BadRequest(f"unknown request {_short(other)}: send status or route")


def depth(data: bytes) -> int:
    """How deep arrays and objects nest in ``data`` (JSON or not), counted without parsing it:
    a parser recursing into 64 KiB of ``[`` would hit the interpreter's recursion limit."""
    deepest = level = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            level += 1
            deepest = max(deepest, level)
        elif byte in (0x5D, 0x7D):  # ] }
            level -= 1
    return deepest


def _only_keys(message: dict[str, object], allowed: set[str]) -> None:
    extra = sorted(str(key) for key in message if key not in allowed)
    if extra:
        raise BadRequest(f"unexpected field {_short(extra[0])}")


def _addresses(value: object) -> tuple[tuple[str, Address], ...]:
    if not isinstance(value, list):
        raise BadRequest(f"addresses must be a list of strings, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ADDRESSES:
        raise BadRequest(f"addresses must hold 1 to {MAX_ADDRESSES} entries, not {len(value)}")
    parsed = []
    for text in value:
        if not isinstance(text, str) or len(text) > MAX_ADDRESS:
            raise BadRequest(f"each address is a string of at most {MAX_ADDRESS} characters: {_short(text)}")
        try:
            parsed.append((text, parse_address(text)))
        except ValueError:
            raise BadRequest(f"{_short(text)} is not an IP address") from None
    return tuple(parsed)


def _short(value: object) -> str:
    """A client's value, quoted and cut to a length fit for one error line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
