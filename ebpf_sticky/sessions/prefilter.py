"""Whether a request head can carry any of the session keys at all: a byte search before a parse.

Most requests carry no key a worker must act on (a client on its own slot, a handshake, static
files), and parsing every head in Python would cost more than the rest of the layer together. A
head in which none of the keys' markers occurs (a header name followed by a colon, a query
parameter name followed by ``=``) cannot carry a key and is served where it landed without a
parse. The search is conservative: a marker that occurs anywhere (another header's value, another
case) only means "parse it"; a percent sign in the request line, where a parameter name could be
encoded, means the same when a query key is in use. When every key lives in the request line, the
same call reads the first one from it where it is sure to read what the parse would (an Engine.IO
poll's ``sid``). Pure.

The request-line search runs in C where the package was built with a compiler (``_headscan``,
``NATIVE``): for every request without a key, and every one whose key is read from its request
line, it answers as the Python function does, without the Python frame that is most of that
function's cost in a serving worker.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .http_head import MAX_HEAD
from .keys import MCP_HEADER, KeyKind, KeySpec, line_pattern

try:
    from ._headscan import LineSearch

    NATIVE = True
except ImportError:  # installed where no C compiler was at hand (setup.py): the Python search
    NATIVE = False

_FORWARDED_HEADERS = (b"x-forwarded-for:", b"forwarded:")
_LINE_BREAKS = (b"\r", b"\n")


def key_reader(specs: Sequence[KeySpec], native: bool = NATIVE) -> Callable[[bytes, int, int], object]:
    """What a head says of its key before any parse: ``read(data, start, end)``, over the bytes
    from ``start`` that begin with a whole head (``end``: where its blank line is, or beyond), is
    false only for a head where the parse would find no key; a ``str`` (when the first spec's key
    is read from the request line, ``line_pattern``) is the key the parse would find; anything
    else: parse it. For header keys alone, the reader is a regex's ``search`` (no Python frame).

    Header names are matched in any case, after a line's start, by one regex whose every
    alternative begins with that LF: the regex engine then skips to each LF in C. A query
    parameter lives in the request line only, and its name is matched as the parse matches it
    (exactly), with ``bytes.find``. An alternation of both kinds, or a case-blind ``sid=``, would
    defeat the engine's skipping and cost ten times as much on a browser's head. Reading the key
    here too, in the same call, spares an Engine.IO poll the calls of a parse (each Python frame
    costs a serving worker about a microsecond).

    ``native``: with query keys, the C ``LineSearch`` in front of the Python reader: it answers a
    line without a marker, and reads the key of one with a marker by the same regex (``line_key``),
    and hands the Python reader every head it is not sure of (a blank line first, a marker and no
    line key): the same answers.
    """
    names: list[bytes] = []
    params: list[bytes] = []
    for spec in specs:
        if spec.kind is KeyKind.ENGINEIO:
            params.append(b"sid=")
        elif spec.kind is KeyKind.QUERY:
            params.append(spec.name.encode() + b"=")
        elif spec.kind is KeyKind.MCP:
            names.append(MCP_HEADER.encode() + b":")
        elif spec.kind is KeyKind.HEADER:
            names.append(spec.name.encode() + b":")
        elif spec.kind is KeyKind.COOKIE:
            names.append(b"cookie:")
        else:
            names.extend(_FORWARDED_HEADERS)
    fields = (
        re.compile(rb"\n(?i:" + b"|".join(re.escape(name) for name in names) + b")").search if names else None
    )
    if not params:
        return fields or _never
    # A percent sign in the request line: a parameter name could be encoded there.
    needles = (*params, b"%")
    line_key = line_pattern(specs)  # None: the key cannot be read from the line alone

    def read(data: bytes, start: int, end: int) -> object:
        if data.startswith(_LINE_BREAKS, start):
            return True  # blank lines before the request line (the parse skips them): parse
        line = data.find(b"\n", start, end)
        if line < 0:
            line = end
        for needle in needles:
            if data.find(needle, start, line) >= 0:
                break
        else:
            return fields is not None and fields(data, line, end) is not None
        if line_key is None or len(data) - start > MAX_HEAD:
            return True
        found = line_key.match(data, start)
        if found is None or data.count(line_key.name, start, found.end()) != 1:
            return True
        return found[1].decode("ascii")

    if not native:
        return read
    return LineSearch(needles, fields, read, line_key, MAX_HEAD).read


def _never(data: bytes, start: int, end: int) -> None:
    return None


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
