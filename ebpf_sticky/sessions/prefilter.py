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

from collections.abc import Sequence
from dataclasses import dataclass

from .keys import MCP_HEADER, KeyKind, KeySpec

_FORWARDED_HEADERS = (b"\nx-forwarded-for:", b"\nforwarded:")


@dataclass(frozen=True)
class Markers:
    needles: tuple[bytes, ...]  # lowercased
    in_query: bool  # a key is a query parameter: percent-encoded names need the parse

    def may_carry_key(self, head: bytes) -> bool:
        """``head``: the request head's bytes (request line through the blank line)."""
        lowered = head.lower()
        if any(needle in lowered for needle in self.needles):
            return True
        return self.in_query and b"%" in head[: head.find(b"\n")]


def markers(specs: Sequence[KeySpec]) -> Markers:
    needles: list[bytes] = []
    for spec in specs:
        if spec.kind is KeyKind.ENGINEIO:
            needles.append(b"sid=")
        elif spec.kind is KeyKind.QUERY:
            needles.append(spec.name.lower().encode() + b"=")
        elif spec.kind is KeyKind.MCP:
            needles.append(b"\n" + MCP_HEADER.encode() + b":")
        elif spec.kind is KeyKind.HEADER:
            needles.append(b"\n" + spec.name.lower().encode() + b":")
        elif spec.kind is KeyKind.COOKIE:
            needles.append(b"\ncookie:")
        else:
            needles.extend(_FORWARDED_HEADERS)
    query = any(spec.kind in (KeyKind.ENGINEIO, KeyKind.QUERY) for spec in specs)
    return Markers(tuple(needles), query)


@dataclass(frozen=True)
class Creators:
    """Which responses may create a session key, judged before ``learn_key`` parses anything."""

    headers: frozenset[bytes]  # lowercased response header names that carry a new key
    engineio: bool  # Engine.IO handshakes (requests without a sid) when our ids are not issued

    @property
    def any(self) -> bool:
        """Whether any response at all may create a key (else responses are not watched)."""
        return bool(self.headers) or self.engineio

    def may_create(self, response_headers: Sequence[tuple[bytes, bytes]], query: bytes) -> bool:
        if self.engineio and b"sid=" not in query:
            return True
        return bool(self.headers) and any(name.lower() in self.headers for name, _ in response_headers)


def creators(specs: Sequence[KeySpec], issued_engineio: bool) -> Creators:
    names = {
        b"set-cookie" if spec.kind is KeyKind.COOKIE else spec.name.lower().encode()
        for spec in specs
        if spec.kind in (KeyKind.HEADER, KeyKind.COOKIE)
    }
    if any(spec.kind is KeyKind.MCP for spec in specs):
        names.add(MCP_HEADER.encode())
    engineio = not issued_engineio and any(spec.kind is KeyKind.ENGINEIO for spec in specs)
    return Creators(frozenset(names), engineio)


def head_end(data: bytes) -> int:
    """The length of the head at the start of ``data`` (through its blank line), or -1."""
    for blank in (b"\n\r\n", b"\n\n"):
        at = data.find(blank)
        if at >= 0:
            return at + len(blank)
    return -1
