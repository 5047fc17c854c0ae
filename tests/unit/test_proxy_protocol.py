"""PROXY protocol v1/v2 headers: round trips, byte-by-byte arrival, and hostile bytes."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpf_sticky.sessions.proxy_protocol import (
    MAX_PROXY_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    _parse_header,
    parse_proxy_header,
)

# A loaded 2-core machine: no per-example deadline, the property still runs its examples.
PROPERTY = settings(deadline=None, max_examples=300)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
ports = st.integers(0, 0xFFFF)
v4 = st.ip_addresses(v=4).map(IPv4)
v6 = st.ip_addresses(v=6).map(IPv6)


def parse_or_error(
    data: bytes, parse: Callable[[bytes], ProxyHeader | None] = parse_proxy_header
) -> ProxyHeader | None | ProxyProtocolError:
    try:
        return parse(data)
    except ProxyProtocolError as error:
        return error


def canonical(address: IPv4 | IPv6) -> str:
    if isinstance(address, IPv6) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def v1_line(family: str, source: IPv4 | IPv6, destination: IPv4 | IPv6, sport: int, dport: int) -> bytes:
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2_header(
    command: int, family_protocol: int, addresses: bytes, tlvs: bytes = b"", version: int = 2
) -> bytes:
    block = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family_protocol])
        + struct.pack("!H", len(block))
        + block
    )


def v2_inet(source: IPv4 | IPv6, destination: IPv4 | IPv6, sport: int, dport: int) -> bytes:
    return source.packed + destination.packed + struct.pack("!HH", sport, dport)


# ------------------------------------------------------------------------------- any bytes at all


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_the_declared_error(data: bytes) -> None:
    result = parse_or_error(data)
    assert result is None or isinstance(result, (ProxyHeader, ProxyProtocolError))
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)


@PROPERTY
@given(
    st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]),
    st.binary(max_size=200),
)
def test_bytes_after_a_signature_give_a_header_none_or_the_declared_error(prefix: bytes, rest: bytes) -> None:
    # Random bytes alone rarely get past the first byte; behind a signature they reach every field.
    result = parse_or_error(prefix + rest)
    assert result is None or isinstance(result, (ProxyHeader, ProxyProtocolError))


def same(a: ProxyHeader | None | ProxyProtocolError, b: ProxyHeader | None | ProxyProtocolError) -> bool:
    return type(a) is type(b) if isinstance(a, ProxyProtocolError) else a == b


def v1_tcp4_line(octets: list[str], flaw: tuple[int, str] | None, ports: tuple[str, str]) -> bytes:
    if flaw is not None:
        octets[flaw[0]] = flaw[1]
    return f"PROXY TCP4 {'.'.join(octets[:4])} {'.'.join(octets[4:])} {ports[0]} {ports[1]}\r\n".encode()


# Valid lines and lines one octet or port away from valid, whole or cut, bytes after them.
port_text = st.one_of(st.integers(0, 0xFFFF), st.integers(0x10000, 99999), st.just("01")).map(str)
v1_tcp4_lines = st.builds(
    lambda line, cut, rest: line[:cut] + rest,
    st.builds(
        v1_tcp4_line,
        st.lists(st.integers(0, 255).map(str), min_size=8, max_size=8),
        st.none()
        | st.tuples(st.integers(0, 7), st.sampled_from(["256", "300", "999", "00", "01", "", "+1"])),
        st.tuples(port_text, port_text),
    ),
    st.none() | st.integers(0, 60),  # None: the whole line
    st.binary(max_size=20),
)
v2_tcp4_headers = st.builds(
    lambda size, block, cut: (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", size) + block)[:cut],
    st.one_of(st.integers(0, 40), st.integers(MAX_PROXY_HEADER - 40, 0xFFFF)),
    st.binary(max_size=60),
    st.integers(0, 100),
)


@settings(deadline=None, max_examples=1000)  # a flaw the one step could miss is one in fifty
@given(st.one_of(v1_tcp4_lines, v2_tcp4_headers))
def test_a_common_header_read_in_one_step_is_what_the_whole_parse_reads(data: bytes) -> None:
    # The general parse alone, without the one step.
    assert same(parse_or_error(data), parse_or_error(data, _parse_header))


@PROPERTY
@given(st.binary(max_size=200), st.binary(min_size=1, max_size=200))
def test_more_bytes_never_change_an_answer_already_given(data: bytes, more: bytes) -> None:
    # Refused stays refused, a header stays that header: the caller may answer as soon as it can.
    first = parse_or_error(data)
    then = parse_or_error(data + more)
    if isinstance(first, ProxyProtocolError):
        assert isinstance(then, ProxyProtocolError)
    elif first is not None:
        assert then == first


# ------------------------------------------------------------------------------------ round trips


@PROPERTY
@given(v4, v4, ports, ports, st.binary(max_size=40))
def test_v1_tcp4_round_trip(source: IPv4, destination: IPv4, sport: int, dport: int, rest: bytes) -> None:
    line = v1_line("TCP4", source, destination, sport, dport)
    assert parse_proxy_header(line + rest) == ProxyHeader(
        (str(source), sport), (str(destination), dport), len(line)
    )


@PROPERTY
@given(st.lists(st.integers(0, 999), min_size=4, max_size=4))
def test_v1_ipv4_is_four_octets_up_to_255(octets: list[int]) -> None:
    text = ".".join(map(str, octets))
    data = f"PROXY TCP4 {text} 5.6.7.8 1 2\r\n".encode()
    if max(octets) > 255:
        with pytest.raises(ProxyProtocolError):
            parse_proxy_header(data)
    else:
        assert parse_proxy_header(data) == ProxyHeader((text, 1), ("5.6.7.8", 2), len(data))


@given(v6, v6, ports, ports)
def test_v1_tcp6_round_trip(source: IPv6, destination: IPv6, sport: int, dport: int) -> None:
    line = v1_line("TCP6", source, destination, sport, dport)
    assert len(line) <= 104
    header = parse_proxy_header(line + b"GET / HTTP/1.1\r\n")
    assert header == ProxyHeader((canonical(source), sport), (canonical(destination), dport), len(line))


@PROPERTY
@given(
    st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)),
    ports,
    ports,
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=4),
)
def test_v2_proxy_round_trip_skipping_tlvs(
    pair: tuple[IPv4, IPv4] | tuple[IPv6, IPv6], sport: int, dport: int, tlvs: list[tuple[int, bytes]]
) -> None:
    source, destination = pair
    family = 0x11 if isinstance(source, IPv4) else 0x21
    data = v2_header(0x1, family, v2_inet(source, destination, sport, dport), b"".join(tlv(*t) for t in tlvs))
    assert parse_proxy_header(data + b"\x16\x03\x01") == ProxyHeader(
        (canonical(source), sport), (canonical(destination), dport), len(data)
    )


@PROPERTY
@given(st.integers(0, 0x32), st.binary(max_size=300))
def test_v2_local_is_accepted_whatever_it_carries(family_protocol: int, block: bytes) -> None:
    # LOCAL (health checks): "discard the protocol block including the family".
    family_protocol = (family_protocol // 16 % 4) << 4 | family_protocol % 3
    data = v2_header(0x0, family_protocol, block)
    assert parse_proxy_header(data) == ProxyHeader(None, None, len(data))


@PROPERTY
@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), ports, ports, st.sampled_from(["v1", "v2"]))
def test_every_split_needs_more_until_the_header_is_whole(
    pair: tuple[IPv4, IPv4] | tuple[IPv6, IPv6], sport: int, dport: int, version: str
) -> None:
    source, destination = pair
    v6_pair = isinstance(source, IPv6)
    if version == "v1":
        data = v1_line("TCP6" if v6_pair else "TCP4", source, destination, sport, dport)
    else:
        data = v2_header(0x1, 0x21 if v6_pair else 0x11, v2_inet(source, destination, sport, dport))
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None, cut
    assert parse_proxy_header(data) is not None


# ----------------------------------------------------------------------------- real-world samples


def test_haproxy_v2_bytes_as_sent_before_an_http_request() -> None:
    # HAProxy's send-proxy-v2 for a client 172.19.0.1:42578 → 172.19.0.3:80, as captured on the
    # wire in front of "GET / HTTP/1.1".
    wire = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050") + b"GET / HTTP/1.1\r\n"
    assert parse_proxy_header(wire) == ProxyHeader(("172.19.0.1", 42578), ("172.19.0.3", 80), 28)


def test_spec_v1_example_and_limits() -> None:
    example = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    assert parse_proxy_header(example) == ProxyHeader(("192.168.0.1", 56324), ("192.168.0.11", 443), 47)
    longest_v4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(longest_v4) == 56 and parse_proxy_header(longest_v4) is not None
    full = ":".join(["ffff"] * 8)
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == 107 and parse_proxy_header(worst) == ProxyHeader(None, None, 107)
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(None, None, 15)
    with pytest.raises(ProxyProtocolError, match="107"):
        parse_proxy_header(worst[:-2] + b"0\r\n")


def test_v2_ipv4_mapped_source_is_the_ipv4_client() -> None:
    mapped = IPv6("::ffff:198.51.100.7")
    data = v2_header(0x1, 0x21, v2_inet(mapped, IPv6("2001:db8::1"), 5000, 443))
    header = parse_proxy_header(data)
    assert header is not None and header.source == ("198.51.100.7", 5000)


def test_v2_families_we_cannot_use_fall_back_to_the_real_peer() -> None:
    for family_protocol, block in [(0x00, b""), (0x12, bytes(12)), (0x31, bytes(216)), (0x10, bytes(12))]:
        data = v2_header(0x1, family_protocol, block)
        assert parse_proxy_header(data) == ProxyHeader(None, None, len(data)), hex(family_protocol)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",  # no header at all: never guessed
        b"\x16\x03\x01\x02\x00",  # TLS
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # lone LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",  # CR inside
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # scope ids are not addresses on the wire
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",  # an Arabic-Indic digit
        v2_header(0x1, 0x11, b"", version=1),
        v2_header(0x2, 0x11, bytes(12)),  # unassigned command
        v2_header(0x1, 0x41, bytes(12)),  # unassigned family
        v2_header(0x1, 0x13, bytes(12)),  # unassigned protocol
        v2_header(0x1, 0x11, bytes(11)),  # short IPv4 block
        v2_header(0x1, 0x21, bytes(35)),
        V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_PROXY_HEADER - 15),  # too long, refused unread
    ],
)
def test_refused(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


def test_refused_at_the_first_wrong_byte() -> None:
    for data in [b"G", b"PROXX", b"\r\n\r\n\x01", V2_SIGNATURE + b"\x11", V2_SIGNATURE + b"\x21\x51"]:
        with pytest.raises(ProxyProtocolError):
            parse_proxy_header(data)


def test_largest_allowed_v2_header_is_read() -> None:
    data = v2_header(0x1, 0x11, bytes(12), tlv(0x04, bytes(MAX_PROXY_HEADER - 16 - 12 - 3)))
    assert len(data) == MAX_PROXY_HEADER
    assert parse_proxy_header(data[:-1]) is None
    header = parse_proxy_header(data)
    assert header is not None and header.length == MAX_PROXY_HEADER
