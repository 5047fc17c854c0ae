"""Session keys: specs, trusted proxies, extraction from heads and learning from responses."""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import quote

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from ebpf_sticky.errors import ConfigError
from ebpf_sticky.hashing import parse_address
from ebpf_sticky.sessions.http_head import MAX_HEAD, HeadError, RequestHead, parse_request_head
from ebpf_sticky.sessions.keys import (
    MAX_KEY,
    AddressKey,
    IdKey,
    KeyKind,
    KeySpec,
    TrustedProxies,
    client_hop,
    extract_key,
    field_reader,
    learn_key,
    line_pattern,
    parse_key_spec,
    parse_trusted,
)
from ebpf_sticky.sessions.prefilter import key_reader

PROPERTY = settings(deadline=None, max_examples=300)

ENGINEIO = KeySpec(KeyKind.ENGINEIO, "/socket.io/")
MCP = KeySpec(KeyKind.MCP)
FORWARDED = KeySpec(KeyKind.FORWARDED)
NOBODY = TrustedProxies()
LOCAL = parse_trusted("127.0.0.1")

# What a python-socketio server (uvicorn) answers to the polling handshake, body de-chunked.
SOCKETIO_OPEN = (
    b'0{"sid":"AS23EB1lZsN8pRYvAAAA","upgrades":["websocket"],"pingTimeout":20000,'
    b'"pingInterval":25000,"maxPayload":1000000}'
)
HANDSHAKE = parse_request_head(b"GET /socket.io/?transport=polling&EIO=4&t=1 HTTP/1.1\r\nHost: x\r\n\r\n")
# The official MCP SDK's answer to initialize (handshake era), as its headers arrive.
MCP_INITIALIZED = [
    ("date", "Tue, 01 Dec 2026 16:56:28 GMT"),
    ("server", "uvicorn"),
    ("cache-control", "no-cache, no-transform"),
    ("connection", "keep-alive"),
    ("content-type", "text/event-stream"),
    ("mcp-session-id", "d18912dac23743c898450622d89bc280"),
    ("x-accel-buffering", "no"),
    ("transfer-encoding", "chunked"),
]
INITIALIZE = parse_request_head(
    b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
    b"Accept: application/json, text/event-stream\r\nContent-Length: 150\r\n\r\n"
)

printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
any_text = st.text(max_size=60)
heads = st.builds(
    RequestHead,
    st.sampled_from(["GET", "POST", "PUT"]),
    any_text,
    st.lists(
        st.tuples(
            st.sampled_from(["cookie", "x-forwarded-for", "forwarded", "mcp-session-id", "x"]), any_text
        ),
        max_size=6,
    ).map(tuple),
    st.integers(0, 100),
)
specs = st.lists(
    st.sampled_from(
        [
            ENGINEIO,
            MCP,
            FORWARDED,
            KeySpec(KeyKind.COOKIE, "s"),
            KeySpec(KeyKind.QUERY, "sid"),
            KeySpec(KeyKind.HEADER, "x"),
        ]
    ),
    max_size=4,
)
v4 = st.ip_addresses(v=4)
addresses = st.one_of(v4, st.ip_addresses(v=6))


def head(target: str = "/", *headers: tuple[str, str]) -> RequestHead:
    return RequestHead("GET", target, headers, 0)


# ---------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("engineio", ENGINEIO),
        ("engineio:/ws", KeySpec(KeyKind.ENGINEIO, "/ws/")),
        ("mcp", MCP),
        ("header:X-Session-Id", KeySpec(KeyKind.HEADER, "x-session-id")),
        ("cookie:SESSION", KeySpec(KeyKind.COOKIE, "SESSION")),
        ("query:sid", KeySpec(KeyKind.QUERY, "sid")),
        ("forwarded", FORWARDED),
    ],
)
def test_key_specs(text: str, spec: KeySpec) -> None:
    assert parse_key_spec(text) == spec
    assert parse_key_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text", ["", "sid", "mcp:x", "forwarded:1", "header:", "cookie:a b", "engineio:ws", "query:a=b"]
)
def test_bad_key_specs_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigError, match="header:NAME") as error:
        parse_key_spec(text)
    assert "\n" not in str(error.value)


@PROPERTY
@given(any_text)
def test_any_key_spec_text_parses_or_is_a_config_error(text: str) -> None:
    try:
        spec = parse_key_spec(text)
    except ConfigError:
        return
    assert parse_key_spec(str(spec)) == spec


@PROPERTY
@given(
    st.lists(
        st.one_of(
            addresses, st.ip_addresses(v=4).map(lambda a: ipaddress.ip_network(f"{a}/24", strict=False))
        ),
        max_size=5,
    ),
    addresses,
)
def test_trusted_membership_matches_the_networks(
    entries: list[ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Network],
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    trusted = parse_trusted(",".join(map(str, entries)))
    client = parse_address(str(peer))
    expected = any(
        client in entry if isinstance(entry, ipaddress.IPv4Network) else client == parse_address(str(entry))
        for entry in entries
    )
    assert (str(peer) in trusted) == expected


def test_trusted_forms() -> None:
    trusted = parse_trusted(" 127.0.0.1 , 10.0.0.0/8,::1,fd00::/8")
    for host in ["127.0.0.1", "::ffff:127.0.0.1", "10.9.8.7", "::1", "fd00::5", "[::1]"]:
        assert host in trusted, host
    for host in ["127.0.0.2", "11.0.0.1", "", "unix:/tmp/s", "2001:db8::1"]:
        assert host not in trusted, host
    assert "anything" in parse_trusted("*") and "1.2.3.4" in parse_trusted("10.0.0.1, *")
    assert "127.0.0.1" not in parse_trusted("")


@pytest.mark.parametrize("text", ["10.0.0.1/8", "localhost", "10.0.0.0/33", "1.2.3"])
def test_bad_trusted_entries_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--forwarded-allow-ips"):
        parse_trusted(text)


@PROPERTY
@given(any_text)
def test_any_trusted_text_parses_or_is_a_config_error(text: str) -> None:
    try:
        trusted = parse_trusted(text)
    except ConfigError:
        return
    assert isinstance(trusted, TrustedProxies)


# ------------------------------------------------------------------------------------- extraction


@PROPERTY
@given(heads, specs, any_text, st.sampled_from([NOBODY, LOCAL, parse_trusted("*")]))
def test_extraction_is_total(
    request: RequestHead, keys: list[KeySpec], peer: str, trusted: TrustedProxies
) -> None:
    key = extract_key(request, keys, peer, trusted)
    assert key is None or isinstance(key, (IdKey, AddressKey))
    if isinstance(key, IdKey):
        assert 0 < len(key.value) <= MAX_KEY


@PROPERTY
@given(st.lists(addresses, min_size=1, max_size=6), st.sets(addresses, max_size=4), st.booleans())
def test_forwarded_walk_matches_a_reference_model(
    hops: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    proxies: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    rfc7239: bool,
) -> None:
    # Some hops are trusted proxies: draw a few hops from the trusted set.
    hops = [hop if i % 2 else next(iter(proxies), hop) for i, hop in enumerate(hops)]
    trusted = parse_trusted(",".join(map(str, proxies)) + ",127.0.0.1")
    trusted_set = {parse_address(str(p)) for p in proxies} | {parse_address("127.0.0.1")}
    # The reference: the nearest hop that is not a trusted proxy, else the farthest one.
    normal = [parse_address(str(hop)) for hop in hops]
    expected = next((hop for hop in reversed(normal) if hop not in trusted_set), normal[0])
    if rfc7239:
        value = ", ".join(
            f'for="[{hop}]:1234"' if hop.version == 6 else f"for={hop};proto=http" for hop in hops
        )
        request = head("/", ("forwarded", value))
    else:
        # A proxy may add its own X-Forwarded-For line rather than extend the first one.
        lines = [", ".join(map(str, part)) for part in (hops[:2], hops[2:]) if part]
        request = head("/", *(("x-forwarded-for", line) for line in lines))
    key = extract_key(request, [FORWARDED], "127.0.0.1", trusted)
    assert key == AddressKey(expected)


@PROPERTY
@given(
    st.lists(st.tuples(addresses, st.sampled_from([None, 80, 65535])), min_size=1, max_size=6),
    st.sets(addresses, max_size=4),
    st.booleans(),
)
def test_forwarded_client_is_the_one_uvicorn_shows_the_app(
    hops: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]],
    proxies: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    everyone: bool,
) -> None:
    # uvicorn's own ProxyHeadersMiddleware is the reference: the key is the scope["client"] host.
    from uvicorn.middleware.proxy_headers import _TrustedHosts

    assume(all(getattr(a, "ipv4_mapped", None) is None for a, _ in hops))  # uvicorn keeps those as v6
    hops = [
        (next(iter(proxies)), port) if i % 3 == 1 and proxies else (a, port)
        for i, (a, port) in enumerate(hops)
    ]
    allowed = "*" if everyone else ",".join(["127.0.0.1", *map(str, proxies)])
    written = [
        str(a) if port is None else (f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}") for a, port in hops
    ]
    expected, _ = _TrustedHosts(allowed).get_trusted_client_address(", ".join(written))
    key = extract_key(
        head("/", ("x-forwarded-for", ", ".join(written))), [FORWARDED], "127.0.0.1", parse_trusted(allowed)
    )
    assert key == AddressKey(parse_address(expected))


@PROPERTY
@given(st.lists(addresses, min_size=1, max_size=4), addresses)
def test_forwarded_headers_of_an_untrusted_peer_are_ignored(
    hops: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assume(str(peer) not in LOCAL)
    request = head("/", ("x-forwarded-for", ", ".join(map(str, hops))), ("forwarded", f"for={hops[0]}"))
    assert extract_key(request, [FORWARDED], str(peer), LOCAL) is None


def test_forwarded_examples() -> None:
    trusted = parse_trusted("127.0.0.1,10.0.0.0/8")
    xff = head("/", ("x-forwarded-for", "203.0.113.9, 198.51.100.1:4321, 10.1.1.1"))
    assert extract_key(xff, [FORWARDED], "::ffff:127.0.0.1", trusted) == AddressKey(
        parse_address("198.51.100.1")
    )
    everyone = parse_trusted("*")
    assert extract_key(xff, [FORWARDED], "192.0.2.1", everyone) == AddressKey(parse_address("203.0.113.9"))
    rfc = head(
        "/", ("forwarded", 'for=192.0.2.60;proto=http;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"')
    )
    assert extract_key(rfc, [FORWARDED], "127.0.0.1", trusted) == AddressKey(
        parse_address("2001:db8:cafe::17")
    )
    # X-Forwarded-For wins over Forwarded: it is the one uvicorn shows the app.
    both = head("/", ("forwarded", "for=192.0.2.60"), ("x-forwarded-for", "192.0.2.61"))
    assert extract_key(both, [FORWARDED], "127.0.0.1", trusted) == AddressKey(parse_address("192.0.2.61"))
    for value in ["unknown", "_hidden", "", "192.0.2.1, garbage"]:
        assert extract_key(head("/", ("x-forwarded-for", value)), [FORWARDED], "127.0.0.1", trusted) is None
    assert extract_key(head("/", ("forwarded", "for=unknown")), [FORWARDED], "127.0.0.1", trusted) is None
    assert extract_key(head("/"), [FORWARDED], "127.0.0.1", trusted) is None


def test_client_hop_of_an_all_trusted_chain_is_the_first() -> None:
    assert client_hop(["10.0.0.1", "10.0.0.2"], parse_trusted("10.0.0.0/8")) == "10.0.0.1"


def test_ids_and_the_order_of_specs() -> None:
    request = head(
        "/socket.io/?EIO=4&transport=polling&sid=ENGINE",
        ("mcp-session-id", "MCP"),
        ("cookie", "a=1; s=COOKIE"),
        ("x-session", "HEADER"),
    )
    cookie_spec, header_spec, query_spec = (
        parse_key_spec(t) for t in ("cookie:s", "header:X-Session", "query:sid")
    )
    assert extract_key(request, [ENGINEIO, MCP], "", NOBODY) == IdKey("ENGINE")
    assert extract_key(request, [MCP, ENGINEIO], "", NOBODY) == IdKey("MCP")
    assert extract_key(request, [cookie_spec], "", NOBODY) == IdKey("COOKIE")
    assert extract_key(request, [header_spec], "", NOBODY) == IdKey("HEADER")
    assert extract_key(request, [query_spec], "", NOBODY) == IdKey("ENGINE")
    assert extract_key(request, [FORWARDED, cookie_spec], "", NOBODY) == IdKey("COOKIE")
    # Engine.IO's sid counts on Engine.IO's path only; query:sid anywhere.
    elsewhere = head("/api?sid=X")
    assert extract_key(elsewhere, [ENGINEIO], "", NOBODY) is None
    assert extract_key(elsewhere, [query_spec], "", NOBODY) == IdKey("X")
    assert extract_key(head("/socket.io?sid=Y"), [ENGINEIO], "", NOBODY) == IdKey("Y")
    assert extract_key(head("/socket.iox/?sid=Y"), [ENGINEIO], "", NOBODY) is None


def test_empty_and_oversized_ids_are_not_keys() -> None:
    assert extract_key(head("/", ("mcp-session-id", "")), [MCP], "", NOBODY) is None
    assert extract_key(head("/", ("mcp-session-id", "x" * (MAX_KEY + 1))), [MCP], "", NOBODY) is None
    assert extract_key(head("/", ("mcp-session-id", "x" * MAX_KEY)), [MCP], "", NOBODY) == IdKey(
        "x" * MAX_KEY
    )


# Request lines near the ones the line reader must be sure of, and the ones it must not be:
# encoded or repeated names, empty and odd values, fragments, other paths, bad lines.
line_specs = st.lists(
    st.sampled_from(
        [
            ENGINEIO,
            KeySpec(KeyKind.ENGINEIO, "/"),
            KeySpec(KeyKind.ENGINEIO, "/x.io/"),
            KeySpec(KeyKind.QUERY, "sid"),
            KeySpec(KeyKind.QUERY, "t"),
        ]
    ),
    min_size=1,
    max_size=3,
)
pair_names = st.one_of(
    st.sampled_from(["sid", "s%69d", "%73id", "si+d", "SID", "t", "EIO", "", "sid#", "xsid", "sidx"]),
    st.text("sidt=&%+#?", max_size=6),
)
pair_values = st.one_of(
    st.sampled_from(["AS23EB1lZsN8pRYvAAAA", "", "a+b", "%41", "A-_z", "x" * (MAX_KEY + 1), "a=b"]),
    st.text("sidAZaz09-_+%=&#?/. ", max_size=8),
)
pairs = st.tuples(pair_names, st.sampled_from(["=", "", "=="]), pair_values).map("".join)
line_paths = st.sampled_from(
    ["/socket.io/", "/socket.io", "/socket.iox/", "/x.io/", "/", "", "/a#b", "/sid/", "/s%6fcket.io/"]
)


def mostly(common: str, *odd: str) -> st.SearchStrategy[str]:
    """``common`` four times in five: a key is read only from a line right in every part."""
    return st.sampled_from([common] * 4 * len(odd) + list(odd))


# A query: some pairs, most often one that is a key of these specs, then some more, each
# followed by a separator of the query's syntax, or of another one.
keyed_pairs = mostly("sid=AS23EB1lZsN8pRYvAAAA", "t=Ow2Dx4k", "sid=A+B", "sid=A", "sid=", "sid")
separators = mostly("&", ";", "#", "&&", "=")
other_pairs = st.one_of(st.sampled_from(["EIO=4", "transport=polling", "t=Ow2Dx4k"]), pairs)
query_parts = st.lists(st.tuples(other_pairs, separators).map("".join), max_size=2).map("".join)
queries = st.tuples(query_parts, st.one_of(keyed_pairs, pairs), separators, query_parts).map("".join)


@settings(deadline=None, max_examples=1000)
@given(
    line_specs,
    mostly("GET", "POST", "G T", "", "GE\x00T"),
    st.one_of(st.just("/socket.io/"), line_paths),
    mostly("?", "", "??", "#?"),
    queries,
    mostly("", "#frag", "#sid=B"),
    mostly(" HTTP/1.1", " HTTP/1.0", " HTTP/2.0", " http/1.1", "  HTTP/1.1", " HTTP/1.1\r"),
    mostly("\r\n", "\n", "\r"),
    mostly("", "\r\n", "\n"),
)
def test_a_key_read_from_the_line_is_the_one_the_parse_finds(
    specs: list[KeySpec],
    method: str,
    path: str,
    question: str,
    query: str,
    fragment: str,
    version: str,
    newline: str,
    blank: str,
) -> None:
    line = f"{method} {path}{question}{query}{fragment}{version}"
    data = (blank + line + newline + "Host: x" + newline + newline).encode("latin-1")
    value = key_reader(specs)(data, 0, len(data))
    event("read" if isinstance(value, str) else "parse" if value else "no key")
    if isinstance(value, str):
        parsed = parse_request_head(data, with_fields=False)
        assert parsed is not None
        assert extract_key(parsed, specs, "", NOBODY) == IdKey(value)
    elif not value:
        try:
            parsed = parse_request_head(data, with_fields=False)
        except HeadError:
            return  # served where it landed, and answered as the server answers it alone
        assert parsed is None or extract_key(parsed, specs, "", NOBODY) is None


def test_the_key_is_read_from_socketio_polls_and_upgrades() -> None:
    read = key_reader([ENGINEIO])
    poll = b"GET /socket.io/?EIO=4&transport=polling&t=Ow2Dx4k&sid=AS23EB1lZsN8pRYvAAAA HTTP/1.1\r\n"
    upgrade = b"GET /socket.io/?EIO=4&transport=websocket&sid=AS23EB1lZsN8pRYvAAAA HTTP/1.1\r\n"
    post = b"POST /socket.io/?EIO=4&transport=polling&sid=AS23EB1lZsN8pRYvAAAA&t=Ow2 HTTP/1.1\r\n"
    for line in (poll, upgrade, post):
        data = line + b"Host: x\r\n\r\n"
        assert read(data, 0, len(data)) == "AS23EB1lZsN8pRYvAAAA"
    # Unsure, so parsed: an encoded byte, a repeated name, a head too large to be one.
    for data in (
        poll.replace(b"t=Ow2", b"t=%4F") + b"\r\n",
        poll.replace(b"t=Ow2", b"sid=&t=Ow2") + b"\r\n",
        poll + b"X: " + b"x" * MAX_HEAD + b"\r\n\r\n",
    ):
        assert read(data, 0, len(data)) is True
    handshake = b"GET /socket.io/?EIO=4&transport=polling&t=Ow2Dx4k HTTP/1.1\r\n\r\n"
    assert not read(handshake, 0, len(handshake))


def test_no_line_pattern_when_a_key_is_read_from_fields() -> None:
    assert line_pattern([ENGINEIO, MCP]) is None
    assert line_pattern([FORWARDED]) is None
    assert line_pattern([]) is None
    assert line_pattern([KeySpec(KeyKind.QUERY, "a+b")]) is None


X_SESSION = KeySpec(KeyKind.HEADER, "x-session")
field_specs = st.sampled_from(
    [[MCP], [X_SESSION], [X_SESSION, ENGINEIO], [MCP, KeySpec(KeyKind.COOKIE, "s")], [FORWARDED, MCP]]
)
# Field lines, most of them right, some of the kinds the parse refuses or reads otherwise.
field_names = st.sampled_from(
    ["Host", "mcp-session-id", "Mcp-Session-Id", "x-session", "X-SESSION", "x-sessions", ""]
)
field_values = mostly(
    " d18912dac23743c898450622d89bc280", "", " ", "\t a b \t", " \xa0x\x85", "x" * (MAX_KEY + 1)
)
odd_values = st.text(" \t\x00\r:abc\xa0\x85", max_size=6)
odd_lines = st.tuples(
    field_names, st.sampled_from([":", " :", ""]), odd_values, mostly("\r\n", "\n", "\r")
).map("".join)
right_lines = st.sampled_from(["Host: x\r\n", "Accept: */*\n", "X-Session-Id: 1\r\n"])


def rarely(odd: st.SearchStrategy[str], common: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``odd``'s one time in five, else ``common``'s."""
    return st.tuples(st.integers(0, 4), odd, common).map(
        lambda drawn: drawn[1] if drawn[0] == 0 else drawn[2]
    )


field_lines = rarely(odd_lines, right_lines)


@settings(deadline=None, max_examples=1000)
@given(
    field_specs,
    mostly("", "\r\n"),
    mostly("POST /mcp HTTP/1.1", "POST /mcp HTTP/2", "POST  /mcp HTTP/1.1", "P\x00ST /mcp HTTP/1.1"),
    mostly("\r\n", "\n", "\r"),
    st.lists(field_lines, max_size=3),
    mostly("", "x-other", "X-SESSION", "mcp-session-id"),
    rarely(odd_values, field_values),
    st.lists(field_lines, max_size=3),
    mostly("\r\n", "\n", "", "X: y\r\n"),
    st.sampled_from(["", "{}", "GET / HTTP/1.1\r\n\r\n"]),
)
def test_a_key_read_from_the_fields_is_the_one_the_parse_finds(
    specs: list[KeySpec],
    blank: str,
    line: str,
    newline: str,
    before: list[str],
    name: str,
    key: str,
    after: list[str],
    end: str,
    rest: str,
) -> None:
    # The key's field, named as the first spec names it ("") or otherwise.
    name = name or (specs[0].name or "Mcp-Session-Id")
    fields = [*before, f"{name}:{key}\r\n", *after]
    data = (blank + line + newline + "".join(fields) + end + rest).encode("latin-1")
    value = field_reader(specs)(data)
    event("read" if value is not None else "parse")
    if value is not None:
        parsed = parse_request_head(data)
        assert parsed is not None
        assert extract_key(parsed, specs, "", NOBODY) == IdKey(value)


def test_the_key_is_read_from_an_mcp_clients_fields() -> None:
    # The official SDK's client (httpx), a tool call in an established session.
    data = (
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.28.1\r\n"
        b"Accept: application/json, text/event-stream\r\ncontent-type: application/json\r\n"
        b"mcp-session-id: d18912dac23743c898450622d89bc280\r\nmcp-protocol-version: 2025-06-18\r\n"
        b"Content-Length: 150\r\n\r\n{"
    )
    assert field_reader([MCP])(data) == "d18912dac23743c898450622d89bc280"
    assert field_reader([X_SESSION])(data.replace(b"mcp-session-id", b"X-Session")) == (
        "d18912dac23743c898450622d89bc280"
    )
    # Unsure, so parsed: a field the parse refuses, a head too large to be one, no such field,
    # and keys that are not a header field's.
    for unsure in (
        data.replace(b"Host:", b"Host :"),
        data.replace(b"\r\n\r\n", b"\r\nX: " + b"x" * MAX_HEAD + b"\r\n\r\n"),
        data.replace(b"mcp-session-id", b"x-other"),
    ):
        assert field_reader([MCP])(unsure) is None
    assert field_reader([ENGINEIO, MCP])(data) is None
    assert field_reader([FORWARDED])(data) is None
    assert field_reader([])(data) is None


# --------------------------------------------------------------------------------------- learning


@PROPERTY
@given(
    specs,
    heads,
    st.integers(0, 999),
    st.lists(st.tuples(any_text, any_text), max_size=6),
    st.binary(max_size=300),
)
def test_learning_is_total(
    keys: list[KeySpec], request: RequestHead, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    value = learn_key(keys, request, status, headers, body)
    assert value is None or 0 < len(value) <= MAX_KEY


@PROPERTY
@given(st.sampled_from([b"", b"97:", b"\x00\x09\x07\xff"]), st.binary(max_size=200))
def test_learning_from_noise_after_an_open_packet_start_is_total(frame: bytes, rest: bytes) -> None:
    assert HANDSHAKE is not None
    value = learn_key([ENGINEIO], HANDSHAKE, 200, [], frame + b"0{" + rest)
    assert value is None or isinstance(value, str)


@PROPERTY
@given(
    printable.filter(lambda s: ";" not in s and "," not in s and '"' not in s),
    st.sampled_from(["mcp", "header:X-Id", "cookie:sid", "engineio"]),
)
def test_a_learnt_id_is_the_key_of_the_next_request(session: str, spec_text: str) -> None:
    # What a response creates is what the session's next request is recognised by.
    spec = parse_key_spec(spec_text)
    assert HANDSHAKE is not None
    body = b"0" + json.dumps({"sid": session, "upgrades": []}).encode()
    headers = [
        ("Mcp-Session-Id", session),
        ("X-Id", session),
        ("Set-Cookie", f"sid={session}; Path=/; HttpOnly"),
    ]
    learnt = learn_key([spec], HANDSHAKE, 200, headers, body)
    assert learnt == session
    following = head(
        f"/socket.io/?EIO=4&transport=polling&sid={quote(session, safe='')}",
        ("mcp-session-id", session),
        ("x-id", session),
        ("cookie", f"other=1; sid={session}"),
    )
    assert extract_key(following, [spec], "", NOBODY) == IdKey(session)


def test_learn_socketio_handshake_eio4_and_eio3() -> None:
    assert HANDSHAKE is not None
    assert (
        learn_key([ENGINEIO], HANDSHAKE, 200, [("content-type", "text/plain")], SOCKETIO_OPEN)
        == "AS23EB1lZsN8pRYvAAAA"
    )
    batched = SOCKETIO_OPEN + b'\x1e40{"sid":"other"}'
    assert learn_key([ENGINEIO], HANDSHAKE, 200, [], batched) == "AS23EB1lZsN8pRYvAAAA"
    text_eio3 = b"96:" + SOCKETIO_OPEN + b"2:40"
    assert learn_key([ENGINEIO], HANDSHAKE, 200, [], text_eio3) == "AS23EB1lZsN8pRYvAAAA"
    binary_eio3 = b"\x00\x09\x06\xff" + SOCKETIO_OPEN + b"\x00\x02\xff40"
    assert learn_key([ENGINEIO], HANDSHAKE, 200, [], binary_eio3) == "AS23EB1lZsN8pRYvAAAA"


def test_learn_websocket_only_engineio_handshake() -> None:
    # transports=["websocket"]: the open packet is the first message after the 101.
    upgrade = parse_request_head(
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert upgrade is not None and HANDSHAKE is not None
    assert learn_key([ENGINEIO], upgrade, 101, [], SOCKETIO_OPEN) == "AS23EB1lZsN8pRYvAAAA"
    assert learn_key([ENGINEIO], HANDSHAKE, 101, [], SOCKETIO_OPEN) is None


def test_only_a_handshake_creates_an_engineio_session() -> None:
    polling = parse_request_head(b"GET /socket.io/?EIO=4&transport=polling&sid=AS23 HTTP/1.1\r\n\r\n")
    post = parse_request_head(b"POST /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n\r\n")
    other = parse_request_head(b"GET /api/?EIO=4 HTTP/1.1\r\n\r\n")
    assert HANDSHAKE is not None and polling is not None and post is not None and other is not None
    for request, status in [(polling, 200), (post, 200), (other, 200), (HANDSHAKE, 400), (HANDSHAKE, 101)]:
        assert learn_key([ENGINEIO], request, status, [], SOCKETIO_OPEN) is None
    for body in [b"", b"0", b'0{"sid":1}', b'0{"sid":"x"', b"0[1]", b'4{"sid":"x"}', b'0{"a":' + b"[" * 3000]:
        assert learn_key([ENGINEIO], HANDSHAKE, 200, [], body) is None, body[:20]


def test_learn_mcp_initialize_response() -> None:
    assert INITIALIZE is not None
    assert (
        learn_key([MCP], INITIALIZE, 200, MCP_INITIALIZED, b"event: message\r\n")
        == "d18912dac23743c898450622d89bc280"
    )
    assert learn_key([ENGINEIO], INITIALIZE, 200, MCP_INITIALIZED, b"") is None
    # An error names no new session, even if it echoes the id it refuses.
    for status in (400, 404, 503):
        assert learn_key([MCP], INITIALIZE, status, MCP_INITIALIZED, b"") is None


def test_learn_cookie_creation_not_deletion() -> None:
    assert HANDSHAKE is not None
    spec = parse_key_spec("cookie:session")
    for gone in [
        "session=; Max-Age=0",
        "session=x; Path=/; max-age=-1",
        "session=x; expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/",
    ]:
        assert learn_key([spec], HANDSHAKE, 200, [("Set-Cookie", gone)], b"") is None
    headers = [("set-cookie", "theme=dark"), ("Set-Cookie", 'session="abc"; Max-Age=3600; Secure')]
    assert learn_key([spec], HANDSHAKE, 200, headers, b"") == "abc"
    assert learn_key([spec], HANDSHAKE, 302, headers, b"") == "abc"  # the login redirect
    kept = [("Set-Cookie", "session=abc; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=60")]
    assert learn_key([spec], HANDSHAKE, 200, kept, b"") == "abc"  # Max-Age wins
    assert learn_key([parse_key_spec("query:session"), FORWARDED], HANDSHAKE, 200, headers, b"") is None
