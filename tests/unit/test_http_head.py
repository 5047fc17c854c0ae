"""HTTP/1.x request heads as the worker reads them before routing: round trips, splits, noise."""

from __future__ import annotations

from urllib.parse import parse_qs, quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpf_sticky.sessions.http_head import (
    MAX_HEAD,
    HeadError,
    RequestHead,
    cookie,
    header,
    is_upgrade,
    parse_request_head,
    query_param,
)

PROPERTY = settings(deadline=None, max_examples=300)

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TCHARS, min_size=1, max_size=20)
# A field value as a client writes it: visible Latin-1, inner spaces, no surrounding whitespace.
values = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
)
values = st.builds(lambda a, b: f"{a} {b}".strip(), values, values)
targets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60)
fields = st.lists(st.tuples(tokens, values), max_size=12)

# A python-socketio (aiohttp) client's first polling request, byte for byte.
SOCKETIO_HANDSHAKE = (
    b"GET /socket.io/?transport=polling&EIO=4&t=1796143987.3155458 HTTP/1.1\r\n"
    b"Host: 127.0.0.1:38103\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
    b"User-Agent: Python/3.11 aiohttp/3.14.5\r\n\r\n"
)
# A browser's WebSocket upgrade of that session (Chromium's field order).
BROWSER_UPGRADE = (
    b"GET /socket.io/?EIO=4&transport=websocket&sid=AS23EB1lZsN8pRYvAAAA HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8000\r\nConnection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n"
    b"Upgrade: websocket\r\nOrigin: http://127.0.0.1:8000\r\nSec-WebSocket-Version: 13\r\n"
    b"Cookie: theme=dark; io=AS23EB1lZsN8pRYvAAAA\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
)


def parse_or_error(data: bytes, with_fields: bool = True) -> RequestHead | None | HeadError:
    try:
        return parse_request_head(data, with_fields)
    except HeadError as error:
        return error


def build(method: str, target: str, headers: list[tuple[str, str]], newline: bytes = b"\r\n") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return newline.join(lines) + newline + newline


@PROPERTY
@given(st.binary(max_size=400))
def test_any_bytes_give_a_head_none_or_the_declared_error(data: bytes) -> None:
    result = parse_or_error(data)
    assert result is None or isinstance(result, (RequestHead, HeadError))
    if isinstance(result, RequestHead):
        assert 0 < result.length <= len(data)


@PROPERTY
@given(st.binary(max_size=400))
def test_bytes_after_a_request_line_give_a_head_none_or_the_declared_error(rest: bytes) -> None:
    result = parse_or_error(b"GET /?a=b HTTP/1.1\r\n" + rest)
    assert result is None or isinstance(result, (RequestHead, HeadError))
    if isinstance(result, RequestHead):
        # The helpers are total on whatever the parser accepted.
        for name in ("a", "cookie", "sid", ""):
            header(result, name), cookie(result, name), query_param(result, name)
        is_upgrade(result)


@PROPERTY
@given(st.binary(max_size=200), st.binary(min_size=1, max_size=200))
def test_more_bytes_never_change_an_answer_already_given(data: bytes, more: bytes) -> None:
    first = parse_or_error(data)
    then = parse_or_error(data + more)
    if isinstance(first, HeadError):
        assert isinstance(then, HeadError)
    elif first is not None:
        assert then == first


@PROPERTY
@given(tokens, targets, fields, st.sampled_from([b"\r\n", b"\n"]), st.binary(max_size=30))
def test_round_trip(
    method: str, target: str, headers: list[tuple[str, str]], newline: bytes, body: bytes
) -> None:
    data = build(method, target, headers, newline)
    head = parse_request_head(data + body)
    assert head == RequestHead(method, target, tuple((n.lower(), v) for n, v in headers), len(data))


@PROPERTY
@given(tokens, targets, fields)
def test_every_split_needs_more_until_the_blank_line(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    data = build(method, target, headers)
    for cut in range(len(data)):
        assert parse_request_head(data[:cut]) is None, cut
    assert parse_request_head(data) is not None


@PROPERTY
@given(fields, tokens)
def test_header_is_the_first_value_of_that_name_in_any_case(
    headers: list[tuple[str, str]], name: str
) -> None:
    head = RequestHead("GET", "/", tuple((n.lower(), v) for n, v in headers), 0)
    expected = next((v for n, v in headers if n.lower() == name.lower()), None)
    assert header(head, name.upper()) == header(head, name) == expected


@PROPERTY
@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=10), st.text(max_size=10)), max_size=6),
    st.text(min_size=1, max_size=10),
)
def test_query_param_agrees_with_parse_qs(pairs: list[tuple[str, str]], name: str) -> None:
    # python-engineio reads its sid with parse_qs: whatever it finds, we find.
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    head = RequestHead("GET", f"/socket.io/?{query}#frag", (), 0)
    expected = parse_qs(query, keep_blank_values=True).get(name, [None])[0]
    assert query_param(head, name) == expected


@PROPERTY
@given(st.text("sid=&+%20aé#?", max_size=40), st.data())
def test_query_param_agrees_with_parse_qs_on_raw_queries(query: str, data: st.DataObject) -> None:
    # Raw, as clients write them: "+" for spaces, stray "%", empty pairs, a fragment.
    parsed = parse_qs(query.partition("#")[0], keep_blank_values=True)
    name = data.draw(st.sampled_from([*parsed, "sid", "s d"]))
    head = RequestHead("GET", f"/socket.io/?{query}", (), 0)
    assert query_param(head, name) == parsed.get(name, [None])[0]


odd_lines = st.sampled_from([b" folded", b"A : b", b"A:\x00b", b"A:\rb", b"NoColon", b"\tx", b"A:b\r", b""])
lines = st.one_of(
    st.tuples(tokens, values).map(lambda f: f"{f[0]}: {f[1]}".encode("latin-1")),
    odd_lines,
)


@PROPERTY
@given(
    st.sampled_from([b"", b"\r\n", b"\n\n"]),
    st.one_of(tokens, st.text(max_size=8)),
    st.one_of(targets, st.text(max_size=20)),
    st.lists(lines, max_size=6),
    st.sampled_from([b"\r\n", b"\n", b"\r"]),
    st.binary(max_size=20),
)
def test_the_request_line_alone_is_read_as_the_whole_head_reads_it(
    blank: bytes, method: str, target: str, fields: list[bytes], newline: bytes, rest: bytes
) -> None:
    request_line = f"{method} {target} HTTP/1.1".encode("utf-8", "replace")
    data = blank + newline.join([request_line, *fields]) + newline + newline + rest
    for cut in (len(data), len(data) // 2):
        whole, line = parse_or_error(data[:cut]), parse_or_error(data[:cut], with_fields=False)
        if isinstance(whole, RequestHead):
            assert line == RequestHead(whole.method, whole.target, (), whole.length)
        elif whole is None:
            assert line is None
        else:  # refused: for its request line (then alike), or for a field only the whole reads
            assert isinstance(line, HeadError) or (isinstance(line, RequestHead) and fields)


@PROPERTY
@given(tokens, targets, st.lists(lines, max_size=6), st.sampled_from([b"\r\n", b"\n"]))
def test_agrees_with_h11_wherever_both_read_a_request(
    method: str, target: str, fields: list[bytes], newline: bytes
) -> None:
    # uvicorn's h11 server is the reference for what the head says: where both parse it, the
    # method, target and fields are the same, so the key we read is the one the app will see.
    # On these lines this parser may refuse more (obsolete folding, which h11 joins), never less;
    # h11 also refuses what routing need not judge (no Host, conflicting body framing).
    import h11

    data = newline.join([f"{method} {target} HTTP/1.1".encode(), b"Host: x", *fields]) + newline + newline
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    ours = parse_or_error(data)
    try:
        event = server.next_event()
    except h11.RemoteProtocolError:
        # What the server refuses is never read as a request here either (it answers 400 itself).
        assert isinstance(ours, HeadError)
        return
    if isinstance(event, h11.Request) and isinstance(ours, RequestHead):
        assert ours.method.encode() == event.method and ours.target.encode("latin-1") == event.target
        assert [(n.encode(), v.encode("latin-1")) for n, v in ours.headers] == list(event.headers)


def test_socketio_client_handshake() -> None:
    head = parse_request_head(SOCKETIO_HANDSHAKE)
    assert head is not None and head.length == len(SOCKETIO_HANDSHAKE)
    assert (head.method, head.target) == ("GET", "/socket.io/?transport=polling&EIO=4&t=1796143987.3155458")
    assert query_param(head, "EIO") == "4" and query_param(head, "sid") is None
    assert header(head, "Host") == "127.0.0.1:38103" and not is_upgrade(head)


def test_browser_websocket_upgrade() -> None:
    head = parse_request_head(BROWSER_UPGRADE + b"\x81\x85")
    assert head is not None and head.length == len(BROWSER_UPGRADE)
    assert is_upgrade(head)
    assert query_param(head, "sid") == "AS23EB1lZsN8pRYvAAAA"
    assert cookie(head, "io") == "AS23EB1lZsN8pRYvAAAA" and cookie(head, "theme") == "dark"
    assert cookie(head, "the") is None


def test_connection_upgrade_among_other_tokens() -> None:
    head = parse_request_head(
        b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert head is not None and is_upgrade(head)
    head = parse_request_head(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n")
    assert head is not None and not is_upgrade(head)


def test_blank_lines_before_the_request_line_are_skipped_and_counted() -> None:
    # A client may send a stray CRLF after a body; it belongs to the next head's bytes.
    head = parse_request_head(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n")
    assert head is not None and head.length == 22 and head.target == "/"


def test_quoted_cookie_and_repeated_cookie_headers() -> None:
    head = parse_request_head(b'GET / HTTP/1.1\r\nCookie: a=1\r\nCookie: s="x y"\r\n\r\n')
    assert head is not None and cookie(head, "s") == "x y" and cookie(head, "a") == "1"


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01",  # TLS ClientHello: refused at the first word
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obsolete line folding
        b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
        b"G\xc3\x89T / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD,
    ],
)
def test_refused(data: bytes) -> None:
    with pytest.raises(HeadError):
        parse_request_head(data)


def test_largest_head_is_read() -> None:
    start = b"GET / HTTP/1.1\r\nX: "
    data = start + b"a" * (MAX_HEAD - len(start) - 4) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD
    head = parse_request_head(data)
    assert head is not None and head.length == MAX_HEAD
    with pytest.raises(HeadError):
        parse_request_head(start + b"a" * (MAX_HEAD - len(start) - 3) + b"\r\n\r\n")
