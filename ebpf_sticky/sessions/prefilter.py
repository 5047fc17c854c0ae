"""Whether a request head can carry any of the session keys at all: a byte search before a parse.

Most requests carry no key a worker must act on (a client on its own slot, a handshake, static
files), and parsing every head in Python would cost more than the rest of the layer together. A
head in which none of the keys' markers occurs (a header name followed by a colon, a query
parameter name followed by ``=``) cannot carry a key and is served where it landed without a
parse. The search is conservative: a marker that occurs anywhere (another header's value, another
case) only means "parse it"; a percent sign in the request line, where a parameter name could be
encoded, means the same when a query key is in use. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .keys import MCP_HEADER, KeyKind, KeySpec

_FORWARDED_HEADERS = (b"\nx-forwarded-for:", b"\nforwarded:")


def key_markers(specs: Sequence[KeySpec]) -> re.Pattern[bytes]:
    """What every head that can carry one of the keys contains: ``search(data, 0, end)`` over a
    head's bytes finds nothing only in a head where the parse would find no key. One pattern, so
    that the common case is one call into C."""
    needles: list[bytes] = []
    for spec in specs:
        if spec.kind is KeyKind.ENGINEIO:
            needles.append(b"sid=")
        elif spec.kind is KeyKind.QUERY:
            needles.append(spec.name.encode() + b"=")
        elif spec.kind is KeyKind.MCP:
            needles.append(b"\n" + MCP_HEADER.encode() + b":")
        elif spec.kind is KeyKind.HEADER:
            needles.append(b"\n" + spec.name.encode() + b":")
        elif spec.kind is KeyKind.COOKIE:
            needles.append(b"\ncookie:")
        else:
            needles.extend(_FORWARDED_HEADERS)
    alternatives = [re.escape(needle) for needle in needles]
    if any(spec.kind in (KeyKind.ENGINEIO, KeyKind.QUERY) for spec in specs):
        alternatives.append(rb"\A[^\n]*%")  # a percent sign in the request line
    return re.compile(b"|".join(alternatives) or rb"(?!)", re.IGNORECASE)


@dataclass(frozen=True)
class Creators:
    """Which responses may create a session key, judged before ``learn_key`` parses anything."""

    headers: frozenset[bytes]  # lowercased response header names that carry a new key
    engineio: bool  # Engine.IO handshakes (requests without a sid) when our ids are not issued
    # ``\nname:`` for each of ``headers``: a response head that holds none of them creates no
    # key. Searched for as they are (``in``), since the server writes names lowercased (uvicorn).
    in_head: tuple[bytes, ...]

    @property
    def any(self) -> bool:
        """Whether any response at all may create a key (else responses are not watched)."""
        return bool(self.headers) or self.engineio

    def may_create(self, response_headers: Sequence[tuple[bytes, bytes]], query: bytes) -> bool:
        if self.engineio and b"sid=" not in query:
            return True
        return bool(self.headers) and any(name.lower() in self.headers for name, _ in response_headers)


class HeadWatch(NamedTuple):
    """Response heads for the worker's protocol to look at as it writes them: each one that holds
    one of ``marks`` (``Creators.in_head``, searched for there with ``in``: no Python frame for a
    head that holds none) is shown to ``seen``."""

    marks: tuple[bytes, ...]
    seen: Callable[[bytes], None]


def creators(specs: Sequence[KeySpec], issued_engineio: bool) -> Creators:
    names = {
        b"set-cookie" if spec.kind is KeyKind.COOKIE else spec.name.lower().encode()
        for spec in specs
        if spec.kind in (KeyKind.HEADER, KeyKind.COOKIE)
    }
    if any(spec.kind is KeyKind.MCP for spec in specs):
        names.add(MCP_HEADER.encode())
    engineio = not issued_engineio and any(spec.kind is KeyKind.ENGINEIO for spec in specs)
    return Creators(frozenset(names), engineio, tuple(b"\n" + name + b":" for name in sorted(names)))


def head_end(data: bytes) -> int:
    """The length of the head at the start of ``data`` (through its blank line), or -1."""
    for blank in (b"\n\r\n", b"\n\n"):
        at = data.find(blank)
        if at >= 0:
            return at + len(blank)
    return -1
