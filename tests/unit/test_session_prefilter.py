"""The byte search before a head parse never hides a key the parse would find."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ebpf_sticky.sessions import prefilter
from ebpf_sticky.sessions.http_head import MAX_HEAD, HeadError, parse_request_head, parse_response_head
from ebpf_sticky.sessions.keys import (
    KeySpec,
    extract_key,
    learn_key,
    line_pattern,
    parse_key_spec,
    parse_trusted,
)
from ebpf_sticky.sessions.prefilter import creators, head_end, key_reader

SPECS = tuple(
    parse_key_spec(text)
    for text in ("engineio", "mcp", "header:X-Session", "cookie:sid", "query:session_hash", "forwarded")
)
TRUSTED = parse_trusted("*")
names = st.sampled_from(
    [
        "Mcp-Session-Id",
        "X-Session",
        "x-session",
        "Cookie",
        "X-Forwarded-For",
        "Forwarded",
        "Host",
        "Accept",
        "X-Other",
    ]
)
values = st.sampled_from(["abc", "sid=1", "a=b; sid=2", "192.0.2.1", "for=192.0.2.9", "x"])
targets = st.sampled_from(
    ["/", "/socket.io/?EIO=4&transport=polling", "/socket.io/?EIO=4&sid=abc", "/?session_hash=h",
     "/?%73ession_hash=h", "/socket.io/?%73id=q", "/x?SID=1"]
)  # fmt: skip


@given(
    st.sampled_from(["", "\r\n", "\n"]),
    targets,
    st.lists(st.tuples(names, values), max_size=6),
    st.lists(st.sampled_from(SPECS), min_size=1, max_size=3),
)
def test_a_head_without_markers_has_no_key(
    blank: str, target: str, headers: list[tuple[str, str]], specs: list[KeySpec]
) -> None:
    raw = f"{blank}GET {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    data = raw.encode()
    head = parse_request_head(data)
    assert head is not None and head_end(data) == len(data)
    found = extract_key(head, specs, "127.0.0.1", TRUSTED)
    if found is not None:
        assert key_reader(specs)(data, 0, len(data))


pieces = st.sampled_from(
    [b"GET / HTTP/1.1", b"sid=", b"session_hash=", b"%", b"=", b"&", b"\r\n", b"\n", b"\r",
     b"Mcp-Session-Id: 1", b"x-session:", b"Cookie: a", b"x", b"\x00", b"\xff"]
)  # fmt: skip


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A request head as the tests above build them, then maybe cut short, with pieces (markers,
    line breaks, bytes no head holds) dropped in anywhere: well-formed and not."""
    blank = draw(st.sampled_from(["", "\r\n", "\n"]))
    headers = draw(st.lists(st.tuples(names, values), max_size=4))
    data = bytearray(
        (
            f"{blank}GET {draw(targets)} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
        ).encode()
    )
    for piece in draw(st.lists(pieces, max_size=3)):
        at = draw(st.integers(0, len(data)))
        data[at:at] = piece
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


ENGINEIO, MCP = parse_key_spec("engineio"), parse_key_spec("mcp")


@settings(max_examples=1000)
@given(
    st.one_of(heads(), st.lists(pieces, max_size=10).map(b"".join), st.binary(max_size=64)),
    st.integers(0, 3),
    st.one_of(st.integers(0, 24), st.integers(0, 120)),  # often inside the bytes, not past them
    st.lists(st.sampled_from(SPECS), min_size=1, max_size=4),
)
@example(b"GET / HTTP/1.1\r\nMcp-Session-Id: 1\r\n\r\n", 0, 34, [ENGINEIO, MCP])  # a header key
@example(b"GET /?a HTTP/1.1%\nx", 0, 19, [ENGINEIO])  # a marker that ends the line
@example(b"GET /?sid=1", 0, 10, [ENGINEIO])  # a marker that ends the bytes searched, no line break
@example(b"GET /socket.io/?sid=ab HTTP/1.1\r\n\r\n", 0, 35, [ENGINEIO])  # the key, read in C
@example(b"GET /socket.io/?sid=ab&sid=c HTTP/1.1\r\n\r\n", 0, 41, [ENGINEIO])  # its name twice
@example(b"GET /socket.io/?x=sidsid&sid=ab HTTP/1.1\r\n\r\n", 0, 44, [ENGINEIO])  # inside a value
def test_the_c_search_answers_as_the_python_one(
    data: bytes, start: int, end: int, specs: list[KeySpec]
) -> None:
    """Over any bytes and bounds: the same answer (a key read, a ``str``; else what its truth says:
    no key, or "parse it")."""
    assert prefilter.NATIVE, "the C search is not built here: scripts/test builds it in place"
    native = key_reader(specs, native=True)(data, start, end)
    python = key_reader(specs, native=False)(data, start, end)
    assert answer(native) == answer(python)


def test_the_c_search_refuses_what_it_cannot_search_with() -> None:
    from ebpf_sticky.sessions._headscan import LineSearch

    with pytest.raises(TypeError):
        LineSearch((b"sid=", "%"), None, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LineSearch((b"sid=",), 1, print)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not initialised"):
        LineSearch.__new__(LineSearch).read(b"GET / HTTP/1.1\r\n", 0, 16)
    search = LineSearch((b"sid=",), None, print)
    with pytest.raises(TypeError, match="already initialised"):
        search.__init__((b"%",), None, print)  # type: ignore[misc]
    for line_key in ((print,), (print, "sid"), (print, b""), (1, b"sid")):
        with pytest.raises(TypeError, match="line_key"):
            LineSearch((b"sid=",), None, print, line_key, MAX_HEAD)  # type: ignore[arg-type]
    for max_head in ((), (-1,)):  # the Python read's MAX_HEAD, never a default of its own
        with pytest.raises(TypeError, match="max_head"):
            LineSearch((b"sid=",), None, print, (print, b"sid"), *max_head)


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("beyond", [-1, 0, 1])
def test_the_c_search_stops_reading_keys_where_the_python_one_does(start: int, beyond: int) -> None:
    """A head of MAX_HEAD bytes from ``start`` has its key read; one byte more is "parse it", in C
    as in Python (the property test's heads are far shorter)."""
    line = b"\r\n"[:start] + b"GET /socket.io/?EIO=4&sid=abc HTTP/1.1\r\nX: "
    data = line + b"y" * (MAX_HEAD + beyond - len(line) + start - 4) + b"\r\n\r\n"
    assert len(data) - start == MAX_HEAD + beyond
    native = key_reader([ENGINEIO], native=True)(data, start, len(data))
    python = key_reader([ENGINEIO], native=False)(data, start, len(data))
    assert answer(native) == answer(python) == ("abc" if beyond <= 0 else True)


POLL = b"GET /socket.io/?EIO=4&transport=polling&sid=abc HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("in_c", [True, False])
def test_the_c_search_reads_a_poll_key_itself(in_c: bool) -> None:
    """An Engine.IO poll's key is read in C, the Python reader not called: every poll of a session
    is spared its frame. Without the line key (the negative control), the Python reader is asked."""
    from ebpf_sticky.sessions._headscan import LineSearch

    asked: list[bytes] = []

    def python(data: bytes, start: int, end: int) -> object:
        asked.append(data)
        return key_reader([ENGINEIO], native=False)(data, start, end)

    line_key = line_pattern([ENGINEIO]) if in_c else None
    search = LineSearch((b"sid=", b"%"), None, python, line_key, MAX_HEAD)
    assert search.read(POLL, 0, POLL.index(b"\r\n\r\n")) == "abc"
    assert asked == ([] if in_c else [POLL])
    # A head longer than MAX_HEAD is not read by the line key: "parse it", as in Python.
    long = POLL[:-2] + b"X: " + b"y" * MAX_HEAD + b"\r\n\r\n"
    assert search.read(long, 0, len(long) - 4) is True


def test_the_c_search_hands_keyword_calls_to_the_python_one() -> None:
    head = b"GET /socket.io/?EIO=4&sid=abc HTTP/1.1\r\n\r\n"
    python = key_reader([ENGINEIO], native=False)
    native = key_reader([ENGINEIO], native=True)
    assert native(data=head, start=0, end=42) == python(data=head, start=0, end=42) == "abc"  # type: ignore[call-arg]


def test_the_key_reader_gives_the_c_search_its_line_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``key_reader`` builds reads an Engine.IO poll's key in C (else every answer would be
    the same, only slower)."""
    from ebpf_sticky.sessions import _headscan

    made: list[tuple[object, ...]] = []

    def recording(*args: object) -> object:
        made.append(args)
        return _headscan.LineSearch(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(prefilter, "LineSearch", recording)
    key_reader([ENGINEIO], native=True)
    ((_, _, _, line_key, max_head),) = made
    assert line_key == line_pattern([ENGINEIO]) and max_head == MAX_HEAD


class _OddMatch:
    """A match object whose spans no regex of ``line_pattern`` gives."""

    def __init__(self, group: object, end: int) -> None:
        self.group, self.until = group, end

    def span(self, group: int) -> object:
        return self.group

    def end(self) -> int:
        return self.until


def test_the_c_search_is_not_sure_of_a_match_outside_the_head() -> None:
    """What the line key's match says is checked before its bytes are read: a group or an end
    outside the head is "parse it", a match that fails is the caller's error."""
    from ebpf_sticky.sessions._headscan import LineSearch

    head = b"GET /?sid=abc HTTP/1.1\r\n\r\n"

    def search(match: Callable[[bytes, int], object]) -> object:
        return LineSearch((b"sid=",), None, print, (match, b"sid"), MAX_HEAD).read(head, 0, 22)  # type: ignore[arg-type]

    assert search(lambda data, start: _OddMatch((10, 13), 20)) == "abc"  # the control: in the head
    for odd in (_OddMatch((-1, -1), 20), _OddMatch((10, 13), 999), _OddMatch((13, 10), 20)):
        assert search(lambda data, start, odd=odd: odd) is True  # type: ignore[misc]
    with pytest.raises(TypeError, match="pair"):
        search(lambda data, start: _OddMatch([10, 13], 20))

    def failing(data: bytes, start: int) -> None:
        raise RuntimeError("the regex failed")

    with pytest.raises(RuntimeError, match="regex failed"):
        search(failing)


def answer(read: object) -> str | bool:
    return read if isinstance(read, str) else bool(read)


def test_markers_are_looked_for_only_where_a_key_can_be() -> None:
    """A query parameter's name in a header value (a cookie, a referer), or in another case than
    the parse reads, is not a marker; a header name is, in any case."""
    engineio, header = parse_key_spec("engineio"), parse_key_spec("header:X-Session")
    cookie_sid = b"GET /socket.io/?EIO=4 HTTP/1.1\r\nCookie: sid=1\r\nReferer: /?sid=2\r\n\r\n"
    assert not key_reader((engineio,))(cookie_sid, 0, len(cookie_sid))
    assert not key_reader((engineio,))(b"GET /?SID=1 HTTP/1.1\r\n\r\n", 0, 27)
    assert key_reader((engineio, header))(b"GET / HTTP/1.1\r\nx-SESSION: 1\r\n\r\n", 0, 31)
    assert not key_reader((header,))(b"GET / HTTP/1.1\r\nx-sessions: 1\r\n\r\n", 0, 32)


def test_only_responses_that_can_create_a_key_are_learnt_from() -> None:
    learn = creators(SPECS, issued_engineio=True)
    assert learn.may_create([(b"Mcp-Session-Id", b"1")], b"")
    assert learn.may_create([(b"set-cookie", b"sid=1")], b"")
    assert learn.may_create([(b"x-session", b"1")], b"")
    assert not learn.may_create([(b"content-type", b"text/plain")], b"")
    assert creators(SPECS, issued_engineio=False).may_create([], b"EIO=4&transport=polling")
    assert not creators(SPECS, issued_engineio=False).may_create([], b"EIO=4&sid=abc")


response_names = st.sampled_from(
    ["Mcp-Session-Id", "X-Session", "x-session", "Set-Cookie", "set-cookie", "Content-Type", "X-Other"]
)


@given(st.integers(100, 599), st.lists(st.tuples(response_names, values), max_size=6), st.booleans())
def test_a_response_head_without_markers_creates_no_key(
    status: int, headers: list[tuple[str, str]], issued: bool
) -> None:
    """What a worker's server writes (uvicorn's ``name: value`` lines, names lowercased whatever
    case the app gave), read back exactly; the byte search finds something in every head from
    which a key is learnt."""
    raw = f"HTTP/1.1 {status} X\r\n" + "".join(f"{n.lower()}: {v}\r\n" for n, v in headers) + "\r\n"
    parsed_status, fields = parse_response_head(raw.encode())
    assert (parsed_status, fields) == (status, tuple((n.lower(), v) for n, v in headers))
    learnt = learn_key(SPECS, None, parsed_status, fields, b"")
    if learnt is not None:
        assert any(mark in raw.encode() for mark in creators(SPECS, issued_engineio=issued).in_head)


def test_a_response_head_is_read_only_from_a_status_line() -> None:
    for bad in (b"", b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1\r\n\r\n", b"HTTP/1.1 OK fine\r\n\r\n"):
        with pytest.raises(HeadError):
            parse_response_head(bad)
    plain = b"HTTP/1.1 200 OK\r\ncontent-type: x\r\n\r\n"
    assert not any(mark in plain for mark in creators(SPECS, issued_engineio=True).in_head)
