"""The PROXY protocol header a load balancer puts before a connection's first byte. Pure.

Both versions of HAProxy's specification (doc/proxy-protocol.txt) are read: v1, one text line
``PROXY TCP4|TCP6|UNKNOWN src dst sport dport\\r\\n``, and v2, a binary block behind a 12-byte
signature. ``parse_proxy_header`` is called with everything read so far and answers at once:

* ``None`` while the bytes are still a prefix of some valid header: the caller reads more.
* ``ProxyHeader`` as soon as one header is complete; ``length`` says how many bytes it took, and
  whatever follows is the client's own stream.
* ``ProxyProtocolError`` as soon as no continuation could make the bytes valid. The spec asks to
  abort such connections, never to guess that a header was absent: a peer allowed to send
  headers must always send one, so a missing header is as wrong as a malformed one.

Design rules:

* Strict where the spec is strict (exact single spaces, CRLF and never a lone CR or LF, no
  leading zeroes, address family matching the protocol), because a lenient parser is one that a
  forged header can slip through. Lenient only where the spec says to be: ``UNKNOWN`` lines may
  carry anything before their CRLF, v2 TLVs are skipped unread, and v2 families we cannot use
  (``AF_UNIX``, ``UNSPEC``, datagrams) fall back to the connection's own endpoints.
* ``source is None`` means "use the real peer": v1 ``UNKNOWN`` and v2 ``LOCAL`` (health checks)
  and the fallbacks above. An IPv4-mapped IPv6 address is the IPv4 client it stands for, as in
  ``hashing.parse_address``, so a client hashes alike whichever way the balancer wrote it.
* Bounded: a header never takes more than ``MAX_PROXY_HEADER`` bytes; one announcing more is
  refused before its bytes are read.

Nothing here touches the OS.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from socket import inet_ntoa

from ..hashing import Address

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The longest line the spec allows, CRLF included: "PROXY UNKNOWN" with two full IPv6 addresses.
V1_MAX = 107
V2_FIXED = 16
# The spec lets a v2 header run to 16 + 65535 bytes, but every sender we know of stays far below
# a kilobyte: addresses take at most 216 bytes (AF_UNIX), and the TLVs in use (ALPN, authority,
# CRC32C, unique id <= 128 bytes, SSL version/cipher/CN, AWS/GCP/Azure endpoint ids) add a few
# hundred at most. 4 KiB keeps a hostile peer from parking 64 KiB per connection in the worker
# while leaving a tenfold margin over real headers.
MAX_PROXY_HEADER = 4096

_V2_VERSION = 0x2
_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
# Bytes of the address block each family must at least carry (addresses, then ports if any).
_MAPPED = bytes(10) + b"\xff\xff"
_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

# v1 fields, matched on bytes so that int()'s and ipaddress's tolerance ("+1", "1_0", unicode
# digits, "%scope") never reaches them: ports are 0..65535 without leading zeroes, IPv4 is four
# decimals 0..255 without leading zeroes (its canonical text: read without ipaddress, which costs
# a microsecond or more per address on a header read for every connection), IPv6 is hex, colons
# and an optional dotted IPv4 tail.
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_FIELD = _OCTET + rb"(?:\." + _OCTET + rb"){3}"
_IPV4 = re.compile(_IPV4_FIELD)
_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}(?:\.[0-9.]{1,15})?")
# The common headers whole (``parse_proxy_header``): v1 TCP4, and v2 PROXY/STREAM over AF_INET
# with its 12-byte address block (and any TLVs after it, skipped).
_V1_TCP4 = re.compile(
    rb"PROXY TCP4 (%s) (%s) (%s) (%s)\r\n" % (_IPV4_FIELD, _IPV4_FIELD, _PORT.pattern, _PORT.pattern)
)
_V2_TCP4 = V2_SIGNATURE + b"\x21\x11"
_V2_TCP4_FIELDS = struct.Struct("!H4s4sHH")  # from byte 14: size, then the address block
_V2_TCP4_BLOCK = _ADDRESS_BYTES[_AF_INET]


class ProxyProtocolError(ValueError):
    """The bytes cannot be a valid PROXY protocol header: the connection must be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed header: the client's and the balancer's endpoints, and the bytes it took.

    ``source``/``destination`` are ``(host, port)`` with the host in canonical text, or ``None``
    when the header says to use the connection's own endpoints (LOCAL, UNKNOWN, unusable family).
    """

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; ``None`` if more bytes are needed to tell."""
    # What balancers send on nearly every connection, a whole TCP-over-IPv4 header, in one step:
    # the general parse below answers the same for it, in a dozen Python calls (each costs a
    # serving worker about a microsecond, and a header is read on every connection).
    if data.startswith(_V2_TCP4) and len(data) >= V2_FIXED + _V2_TCP4_BLOCK:
        size, source, destination, source_port, destination_port = _V2_TCP4_FIELDS.unpack_from(data, 14)
        if _V2_TCP4_BLOCK <= size <= min(len(data), MAX_PROXY_HEADER) - V2_FIXED:
            return ProxyHeader(
                (inet_ntoa(source), source_port), (inet_ntoa(destination), destination_port), V2_FIXED + size
            )
    else:
        v1 = _V1_TCP4.match(data)
        if v1 is not None:
            source_port, destination_port = int(v1[3]), int(v1[4])
            if source_port <= 0xFFFF and destination_port <= 0xFFFF:
                return ProxyHeader(
                    (v1[1].decode(), source_port), (v1[2].decode(), destination_port), v1.end()
                )
    return _parse_header(data)


def _parse_header(data: bytes) -> ProxyHeader | None:
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyProtocolError("no PROXY protocol header: the peer must send v1 or v2 first")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX)
    line = data[: end + 1] if end >= 0 else data[:V1_MAX]
    # Fail at the first wrong byte rather than wait 107 bytes for a line that cannot be valid: a
    # CR is only ever allowed as the line's second-last byte, or as the last byte read so far.
    head = line[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyProtocolError("not a PROXY protocol header: expected 'PROXY ' or the v2 signature")
    if b"\r" in line[: -2 if end >= 0 else -1]:
        raise ProxyProtocolError("PROXY v1 line holds a CR outside its final CRLF")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line without CRLF in its first {V1_MAX} bytes")
        return None
    if not line.endswith(b"\r\n"):
        raise ProxyProtocolError("PROXY v1 line ends with a lone LF: it must end with CRLF")
    return _v1_fields(line[:-2].split(b" "), len(line))


def _v1_fields(fields: list[bytes], length: int) -> ProxyHeader:
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(None, None, length)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("PROXY v1 line must be 'PROXY TCP4|TCP6 src dst sport dport'")
    v6 = fields[1] == b"TCP6"
    source = (_v1_address(fields[2], v6), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], v6), _v1_port(fields[5]))
    return ProxyHeader(source, destination, length)


def _v1_address(field: bytes, v6: bool) -> str:
    if not v6:
        if _IPV4.fullmatch(field):
            return field.decode("ascii")
    elif _IPV6.fullmatch(field):
        try:
            return _canonical(ipaddress.IPv6Address(field.decode("ascii")))
        except ValueError:
            pass
    family = "IPv6" if v6 else "IPv4"
    raise ProxyProtocolError(f"PROXY v1 address {field[:39]!r} is not a canonical {family} address")


def _v1_port(field: bytes) -> int:
    if not _PORT.fullmatch(field) or int(field) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1 port {field[:6]!r} is not a decimal in 0..65535")
    return int(field)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        raise ProxyProtocolError("not a PROXY protocol header: expected 'PROXY ' or the v2 signature")
    _check_v2_bytes(data)
    if len(data) < V2_FIXED:
        return None
    (size,) = struct.unpack_from("!H", data, 14)
    if V2_FIXED + size > MAX_PROXY_HEADER:
        raise ProxyProtocolError(f"PROXY v2 header of {V2_FIXED + size} bytes: at most {MAX_PROXY_HEADER}")
    if len(data) < V2_FIXED + size:
        return None
    return _v2_addresses(data[12], data[13], data[V2_FIXED : V2_FIXED + size])


def _check_v2_bytes(data: bytes) -> None:
    # The version/command and family/protocol bytes are checked as soon as they arrive.
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0xF
        if version != _V2_VERSION or command not in (_LOCAL, _PROXY):
            raise ProxyProtocolError(f"PROXY v2 version/command byte {data[12]:#04x}: expected 0x20 or 0x21")
    if len(data) > 13:
        family, protocol = data[13] >> 4, data[13] & 0xF
        if family not in _ADDRESS_BYTES or protocol not in (_UNSPEC, _STREAM, _DGRAM):
            raise ProxyProtocolError(f"PROXY v2 family/protocol byte {data[13]:#04x} is not defined")


def _v2_addresses(ver_cmd: int, family_protocol: int, block: bytes) -> ProxyHeader:
    length = V2_FIXED + len(block)
    if ver_cmd & 0xF == _LOCAL:
        # Health checks from the balancer itself: the family and any addresses are to be ignored.
        return ProxyHeader(None, None, length)
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if len(block) < _ADDRESS_BYTES[family]:
        raise ProxyProtocolError(
            f"PROXY v2 address block of {len(block)} bytes, family needs {_ADDRESS_BYTES[family]}"
        )
    if family not in (_AF_INET, _AF_INET6) or protocol != _STREAM:
        # The spec's fallback for combinations a receiver does not use: the real endpoints.
        return ProxyHeader(None, None, length)
    width = 4 if family == _AF_INET else 16
    source = _v2_host(block[:width])
    destination = _v2_host(block[width : 2 * width])
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * width)
    return ProxyHeader((source, source_port), (destination, destination_port), length)


def _v2_host(raw: bytes) -> str:
    # IPv4 (and IPv4-mapped IPv6) written directly: most balancers send IPv4, and ipaddress
    # costs several times more than the formatting for a header read on every connection.
    if len(raw) == 16 and raw[:12] != _MAPPED:
        return str(ipaddress.IPv6Address(raw))
    return ".".join(map(str, raw[-4:]))


def _canonical(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
