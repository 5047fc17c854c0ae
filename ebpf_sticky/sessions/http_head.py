"""An HTTP/1.x request head: the request line and the header fields, up to the blank line; and
the fields of a response head the worker writes. Pure.

The worker reads a connection's first request head (and each later one on a keep-alive connection)
to find its session key before deciding which worker serves it. ``parse_request_head`` is called
with everything read so far and answers at once: ``None`` while the blank line has not arrived,
``RequestHead`` once it has, ``HeadError`` when the bytes cannot be a request head or the head
outgrows ``MAX_HEAD``.

Design rules:

* Only as much HTTP as routing needs. The head is handed on unchanged to the server that answers
  it (uvicorn, with h11 or httptools), which parses it again and decides what it is worth; this
  parser only has to find the same request line and fields. So it follows h11 on what a head is
  (a bare LF ends lines as CRLF does, empty lines before the request line are skipped) and is
  strict on what would make two parsers disagree about a field: a name that is not a token,
  whitespace before the colon, obsolete line folding, control bytes.
* Names are lowercased (ASCII) and values decoded as Latin-1, as ASGI presents them, with
  surrounding spaces and tabs stripped. The fields keep their order and repeats.
* Bounded: a head is ``MAX_HEAD`` bytes at most, and a stream that cannot be HTTP/1 (TLS, the
  HTTP/2 preface, noise) is refused at its first word or line rather than buffered. Each call
  scans what it is given again; a caller reading a slow head may skip calls whose new bytes hold
  no LF, since only an LF can complete a head.

Nothing here touches the OS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

# Above h11's 16 KiB default (uvicorn's h11 limit) and nginx's 4 x 8 KiB header buffers, so a head
# the server behind us would accept is never refused here first; small enough that a peer cannot
# make a worker buffer much before it has sent a whole head.
MAX_HEAD = 64 * 1024

# RFC 9110 token characters: what a method and a field name may hold.
TOKEN_CLASS = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(TOKEN_CLASS + rb"+")


def target_class(excluded: bytes = b"") -> bytes:
    """A regex class of the bytes a request target may hold, less ``excluded``: visible ASCII and
    (as servers tolerate) bytes >= 0x80, never space or control."""
    allowed = (byte for byte in range(0x21, 0x100) if byte != 0x7F and byte not in excluded)
    return b"[" + b"".join(re.escape(bytes([byte])) for byte in allowed) + b"]"


# The parts of a head as regex source: what the parse checks, and what a match that must accept
# exactly the heads the parse accepts (``keys``) is built of.
VERSION = rb"HTTP/1\.[0-9]"
REQUEST_LINE = TOKEN_CLASS + rb"+ " + target_class() + rb"+ " + VERSION  # before its line ending
# A field line: a token, a colon, then visible characters, spaces and tabs, never another control
# byte (NUL, CR, ...). All the fields are checked by one match: a head is parsed per request.
FIELD_VALUE_CLASS = rb"[\t\x20-\x7e\x80-\xff]"
FIELD = TOKEN_CLASS + rb"+:" + FIELD_VALUE_CLASS + rb"*"

_TARGET = re.compile(target_class() + rb"+")
_VERSION = re.compile(VERSION)
_FIELDS = re.compile(FIELD + rb"(?:\n" + FIELD + rb")*")
_LEADING_BLANK_LINES = re.compile(rb"(?:\r?\n)*")
_STATUS_LINE = re.compile(VERSION + rb" ([0-9]{3})[ \r]")


class HeadError(ValueError):
    """The bytes cannot be an HTTP/1.x request head, or the head is larger than ``MAX_HEAD``."""


@dataclass(frozen=True)
class RequestHead:
    """A request line and its header fields; ``length`` counts the bytes up to the blank line's end."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    length: int


def parse_request_head(data: bytes, with_fields: bool = True) -> RequestHead | None:
    """The request head at the start of ``data``; ``None`` until its blank line has arrived.

    ``with_fields=False``: the request line only, ``headers`` left empty, for a caller that reads
    nothing else (keys in the query). The fields are then neither split nor checked: a field two
    parsers could read differently cannot change what such a caller reads, and the server that
    answers the request checks them. Most of a parse is the fields'.
    """
    begin = 0
    if data[:1] in (b"\r", b"\n"):
        blank = _LEADING_BLANK_LINES.match(data, 0, MAX_HEAD)
        begin = blank.end() if blank else 0
    end = _blank_line(data, begin)
    if end is None:
        if len(data) >= MAX_HEAD:
            raise HeadError(f"request head larger than {MAX_HEAD} bytes: refused")
        _check_request_line_so_far(data[begin:])
        return None
    lines_end, length = end
    if not with_fields:
        request_line = data[begin:lines_end].partition(b"\n")[0].removesuffix(b"\r")
        return RequestHead(*_request_line(request_line), (), length)
    # One line ending from here on: CRLF becomes LF, and the CR of the last line's CRLF (its LF
    # is the blank line's first byte) goes. A CR left anywhere else fails the checks below.
    text = data[begin:lines_end].replace(b"\r\n", b"\n")
    request_line, _, fields = text.removesuffix(b"\r").partition(b"\n")
    method, target = _request_line(request_line)
    return RequestHead(method, target, _fields(fields), length)


def _blank_line(data: bytes, begin: int) -> tuple[int, int] | None:
    """Where the head's lines end and where its blank line ends, if it has arrived."""
    crlf = data.find(b"\n\r\n", begin, MAX_HEAD)
    # A bare-LF blank line counts only if it comes first.
    lf = data.find(b"\n\n", begin, crlf + 2 if crlf >= 0 else MAX_HEAD)
    if lf >= 0:
        return lf, lf + 2
    return (crlf, crlf + 3) if crlf >= 0 else None


def _fields(text: bytes) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    if not _FIELDS.fullmatch(text):
        # A field name must be a token right up to the colon: " Host:" (obsolete folding) and
        # "Host :" are what request smuggling is made of, so they are refused, as h11 refuses them.
        bad = next((line for line in text.split(b"\n") if not _FIELDS.fullmatch(line)), text)
        raise HeadError(f"malformed header field {bad[:80]!r}")
    # Checked: names are ASCII tokens, so decoding the block once as Latin-1 is exact and cheap.
    fields = []
    for line in text.decode("latin-1").split("\n"):
        name, _, value = line.partition(":")
        fields.append((name.lower(), value.strip(" \t")))
    return tuple(fields)


def _check_request_line_so_far(partial: bytes) -> None:
    # Refuse a stream that is plainly not HTTP/1 (TLS, HTTP/2's preface, binary noise) as soon as
    # its first word or first line shows it, instead of buffering up to MAX_HEAD of it.
    newline = partial.find(b"\n")
    if newline >= 0:
        _request_line(partial[:newline].removesuffix(b"\r"))
        return
    method = partial.removesuffix(b"\r").split(b" ", 1)[0]
    if method and not _TOKEN.fullmatch(method):
        raise HeadError(f"not an HTTP/1.x request: starts with {partial[:16]!r}")


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HeadError(f"malformed request line {line[:80]!r}: expected 'METHOD TARGET HTTP/1.x'")
    if not _VERSION.fullmatch(parts[2]):
        raise HeadError(f"request line {line[:80]!r} is not HTTP/1.x")
    return parts[0].decode("ascii"), parts[1].decode("latin-1")


def parse_response_head(data: bytes) -> tuple[int, tuple[tuple[str, str], ...]]:
    """The status and the fields of a response head as this worker's server wrote it (uvicorn:
    CRLF lines, ``name: value``), names lowercased; ``HeadError`` if it is not one."""
    status = _STATUS_LINE.match(data)
    if status is None:
        raise HeadError(f"not an HTTP/1.x response: {data[:32]!r}")
    fields = (line.partition(":") for line in data.decode("latin-1").split("\r\n")[1:] if line)
    return int(status[1]), tuple((name.lower(), value.strip(" \t")) for name, _, value in fields)


def header(head: RequestHead, name: str) -> str | None:
    """The first value of header ``name`` (any case), or ``None``."""
    wanted = name.lower()
    return next((value for key, value in head.headers if key == wanted), None)


def query_param(head: RequestHead, name: str) -> str | None:
    """The first value of query parameter ``name`` in the request target, percent-decoded.

    Reads the query as ``urllib.parse.parse_qs`` does (python-engineio's reader), decoding only
    the parts that need it: this runs for every request when a query names the session.
    """
    query = head.target.partition("?")[2].partition("#")[0]
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if pair and _decoded(key) == name:
            return _decoded(value)
    return None


def _decoded(text: str) -> str:
    return unquote_plus(text) if "%" in text or "+" in text else text


def cookie(head: RequestHead, name: str) -> str | None:
    """The value of cookie ``name`` from the request's Cookie header(s), quotes removed."""
    for key, value in head.headers:
        if key != "cookie":
            continue
        for pair in value.split(";"):
            cookie_name, equals, cookie_value = pair.partition("=")
            if equals and cookie_name.strip() == name:
                return _unquote(cookie_value.strip())
    return None


def is_upgrade(head: RequestHead) -> bool:
    """Whether the request asks to switch protocols (a WebSocket handshake, in practice)."""
    connection = ",".join(value for key, value in head.headers if key == "connection")
    tokens = {token.strip().lower() for token in connection.split(",")}
    return "upgrade" in tokens and header(head, "upgrade") is not None


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value
