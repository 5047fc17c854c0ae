"""Session keys: what in a request names its session, and what in a response creates one. Pure.

A ``--session-key`` is parsed once into a ``KeySpec``. For every request head the worker asks
``extract_key``, which tries the specs in the order given and answers with the first key found:

* ``IdKey`` — an id the app issued (an Engine.IO ``sid``, an ``Mcp-Session-Id``, a cookie, a
  header or a query parameter named by the user). Its owner is whichever worker issued it.
* ``AddressKey`` — the client's own address as a trusted proxy reports it (``forwarded``), to be
  hashed exactly as the kernel hashes a direct client's address.
* ``None`` — no key: the request is served where it landed.

For every response the worker asks ``learn_key`` which id (if any) the response creates, so that
the id can be recorded as owned by the worker that answered.

Design rules:

* Total: any head, any response, any peer address gives a value or ``None``, never an exception.
  Only ``parse_key_spec`` and ``parse_trusted`` raise, and only ``ConfigError``, at startup.
* Bounded: ids longer than ``MAX_KEY`` characters are neither extracted nor learnt (no issuer
  makes them), and a response body is read no further than
  ``MAX_LEARN_BODY`` bytes.
* Forwarded addresses are believed only from a trusted peer, and are walked from the right past
  trusted hops, as uvicorn's ``ProxyHeadersMiddleware`` does: the key is then the address the app
  itself will see as ``scope["client"]``. IPv4-mapped IPv6 is the IPv4 address it stands for,
  for the peer as for the reported client, so a dual-stack socket changes nothing.

Nothing here touches the OS.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import ConfigError
from ..hashing import Address, parse_address
from .http_head import (
    FIELD,
    FIELD_VALUE_CLASS,
    MAX_HEAD,
    REQUEST_LINE,
    TOKEN_CLASS,
    VERSION,
    RequestHead,
    cookie,
    header,
    is_upgrade,
    query_param,
    target_class,
)

# A browser keeps cookies of up to 4096 bytes (RFC 6265's floor), and signed session cookies come
# close; the table keeps a keyed hash of each id, so a long id costs nothing there.
MAX_KEY = 4096
MAX_LEARN_BODY = 4096
ENGINEIO_PATH = "/socket.io/"
MCP_HEADER = "mcp-session-id"

_FORMS = "engineio[:PATH], mcp, header:NAME, cookie:NAME, query:NAME or forwarded"
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# Engine.IO's open packet in a polling response: "0{...}" (EIO=4), "<len>:0{...}" (EIO=3 text),
# or "\x00<len digits as bytes 0-9>\xff0{...}" (EIO=3 binary payload).
_OPEN_PACKET = re.compile(rb"(?:[0-9]{1,6}:|\x00[\x00-\x09]{1,6}\xff)?0(\{.*)", re.DOTALL)
_JSON = json.JSONDecoder()
# Max-Age of zero or less: the cookie is being removed, not created.
_MAX_AGE_GONE = re.compile(r"0+|-[0-9]+")
_EPOCH = re.compile(r"\b(?:1[0-8][0-9][0-9]|19[0-6][0-9]|1970)\b")


class KeyKind(enum.Enum):
    """Where a session key is read from (``name`` is what the user writes on the command line)."""

    ENGINEIO = "engineio"
    MCP = "mcp"
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"
    FORWARDED = "forwarded"


@dataclass(frozen=True)
class KeySpec:
    """One ``--session-key``: its kind and its argument (a name, or Engine.IO's path)."""

    kind: KeyKind
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}" if self.name else self.kind.value


@dataclass(frozen=True)
class IdKey:
    """A session id the app issued: owned by the worker that issued it."""

    value: str


@dataclass(frozen=True)
class AddressKey:
    """A client address reported by a trusted proxy: owned by the slot its hash picks."""

    address: Address


Key = IdKey | AddressKey
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedProxies:
    """The peers whose forwarding headers (and PROXY protocol headers) are believed."""

    everyone: bool = False
    addresses: frozenset[Address] = frozenset()
    networks: tuple[Network, ...] = ()

    def __contains__(self, host: object) -> bool:
        if self.everyone:
            return True
        address = _address(host) if isinstance(host, str) else None
        if address is None:
            return False
        return address in self.addresses or any(address in network for network in self.networks)


# ---------------------------------------------------------------------------------- configuration


def parse_key_spec(text: str) -> KeySpec:
    """Parse one ``--session-key`` value."""
    kind_text, colon, argument = text.strip().partition(":")
    kind = next((kind for kind in KeyKind if kind.value == kind_text.lower()), None)
    if kind is None or (colon and kind in (KeyKind.MCP, KeyKind.FORWARDED)):
        raise _bad_spec(text, "unknown form")
    if kind is KeyKind.ENGINEIO:
        path = argument or ENGINEIO_PATH
        if not path.startswith("/") or any(c in path for c in "?# "):
            raise _bad_spec(text, "engineio:PATH takes a path such as /socket.io/")
        # python-engineio normalises its path the same way: leading and trailing slash.
        return KeySpec(kind, path.rstrip("/") + "/")
    if kind in (KeyKind.HEADER, KeyKind.COOKIE, KeyKind.QUERY):
        if not _TOKEN.fullmatch(argument):
            raise _bad_spec(text, f"{kind.value}:NAME needs a name (letters, digits, -_.)")
        return KeySpec(kind, argument.lower() if kind is KeyKind.HEADER else argument)
    return KeySpec(kind)


def _bad_spec(text: str, why: str) -> ConfigError:
    return ConfigError(f"--session-key {text!r}: {why}; expected {_FORMS}")


def parse_trusted(text: str) -> TrustedProxies:
    """Parse ``--forwarded-allow-ips``: addresses and networks, comma-separated, or ``*``."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if "*" in entries:
        return TrustedProxies(everyone=True)
    addresses: set[Address] = set()
    networks: list[Network] = []
    for entry in entries:
        try:
            if "/" in entry:
                networks.append(ipaddress.ip_network(entry))
            else:
                addresses.add(parse_address(entry))
        except ValueError as error:
            raise ConfigError(
                f"--forwarded-allow-ips entry {entry!r}: {error}; expected addresses or networks "
                "such as 127.0.0.1,10.0.0.0/8,::1, or *"
            ) from None
    return TrustedProxies(False, frozenset(addresses), tuple(networks))


# ------------------------------------------------------------------------------------- extraction


def extract_key(
    head: RequestHead, specs: Sequence[KeySpec], peer_host: str, trusted: TrustedProxies
) -> Key | None:
    """The request's session key: the first spec (in order) that finds one, or ``None``."""
    for spec in specs:
        key: Key | None
        if spec.kind is KeyKind.FORWARDED:
            key = _forwarded_key(head, peer_host, trusted)
        else:
            key = _id_key(_ID_READERS[spec.kind](head, spec.name))
        if key is not None:
            return key
    return None


def reads_fields(specs: Sequence[KeySpec]) -> bool:
    """Whether finding any of these keys reads a request's header fields (else only its line)."""
    return any(spec.kind not in (KeyKind.ENGINEIO, KeyKind.QUERY) for spec in specs)


class LinePattern(NamedTuple):
    """The first spec's key in a request line, read without a parse (``line_pattern``)."""

    match: Callable[[bytes, int], re.Match[bytes] | None]  # (data, start); group 1: the key's value
    name: bytes  # the parameter's name: the key is the parse's when it occurs once up to the match's end


def line_pattern(specs: Sequence[KeySpec]) -> LinePattern | None:
    """How to read the first spec's key straight from a head's bytes, one regex match over the
    request line instead of a parse, for specs that all read the request line alone (else
    ``None``). On bytes that start with a whole head of at most ``MAX_HEAD`` bytes, a match in
    which ``name`` occurs once up to the match's end holds the id that
    ``extract_key(parse_request_head(data, False), specs, ...)`` finds; anything else (no match, a
    ``%``, a name that occurs twice, a value outside base64url) is not sure: ask the parse.

    For an Engine.IO deployment this is every polling request's work. Being sure without a parse
    takes three things: the line is a valid request line (as the parse checks it); no ``%`` in it
    (an encoded name could be ``sid``, and only the parse decodes); and the parameter's name occurs
    once in the line, so no earlier pair (``sid``, ``sid=``, which the parse would read first)
    can take its place.
    """
    if reads_fields(specs) or not specs:
        return None
    spec = specs[0]
    name = "sid" if spec.kind is KeyKind.ENGINEIO else spec.name
    if not _UNRESERVED.fullmatch(name):
        return None  # a name the query's own syntax could split or decode ("&", "+", "%")
    if spec.kind is KeyKind.ENGINEIO:
        path = re.escape(spec.name.encode())
        on_path = path + target_class(b"?%") + b"*|" + re.escape(spec.name.rstrip("/").encode())
    else:
        on_path = target_class(b"?%") + b"*"
    value = rb"=([-0-9A-Z_a-z]{1,%d})" % MAX_KEY  # the id ends at "&", "#" or the target's end
    pattern = re.compile(
        b"".join(
            (
                TOKEN_CLASS + rb"+ (?:" + on_path + rb")\?",
                rb"(?:" + target_class(b"#%") + rb"*&)?" + re.escape(name.encode()) + value,
                rb"(?:[&#]" + target_class(b"%") + rb"*)? " + VERSION + rb"\r?\n",
            )
        )
    )
    return LinePattern(pattern.match, name.encode())


_UNRESERVED = re.compile(r"[-.0-9A-Z_a-z~]+")


def field_reader(specs: Sequence[KeySpec]) -> Callable[[bytes], str | None]:
    """How to read the first spec's key, when it is a header field's (``mcp``, ``header:NAME``),
    from a whole head by one regex match instead of a parse: ``read(data)`` is the key that
    ``extract_key(parse_request_head(data), specs, ...)`` finds, or ``None`` when not sure (ask the
    parse). Every request of an MCP session carries its key, and the parse costs a serving worker
    several times what the match does.

    Being sure takes the head to be one the parse accepts, checked the way it checks it (a valid
    request line, then field lines of a token, a colon and visible characters, each ended by CRLF
    or LF, up to the first blank line within ``MAX_HEAD``), and the field to be the first of its
    name: no earlier line names it, in any case. An empty value is not sure either, since the next
    spec then decides.
    """
    spec = specs[0] if specs else None
    if spec is None or spec.kind not in (KeyKind.MCP, KeyKind.HEADER):
        return _unsure
    name = b"(?i:" + re.escape((MCP_HEADER if spec.kind is KeyKind.MCP else spec.name).encode()) + b"):"
    line = FIELD + rb"\r?\n"
    match = re.compile(
        b"".join(
            (
                REQUEST_LINE + rb"\r?\n",
                rb"(?:(?!" + name + rb")" + line + rb")*",
                name + b"(" + FIELD_VALUE_CLASS + rb"*)\r?\n",
                rb"(?:" + line + rb")*\r?\n",
            )
        )
    ).match

    def read(data: bytes) -> str | None:
        found = match(data, 0, MAX_HEAD)
        return _bounded(found[1].decode("latin-1")) if found else None

    return read


def _unsure(data: bytes) -> None:
    return None


def _engineio_sid(head: RequestHead, path: str) -> str | None:
    if not _on_path(head, path):
        return None
    return query_param(head, "sid")


def _on_path(head: RequestHead, path: str) -> bool:
    request_path = head.target.partition("?")[0]
    return request_path.startswith(path) or request_path == path.rstrip("/")


_ID_READERS: dict[KeyKind, Callable[[RequestHead, str], str | None]] = {
    KeyKind.ENGINEIO: _engineio_sid,
    KeyKind.MCP: lambda head, _: header(head, MCP_HEADER),
    KeyKind.HEADER: header,
    KeyKind.COOKIE: cookie,
    KeyKind.QUERY: query_param,
}


def _id_key(value: str | None) -> IdKey | None:
    value = _bounded(value)
    return IdKey(value) if value is not None else None


def _bounded(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value if 0 < len(value) <= MAX_KEY else None


def _forwarded_key(head: RequestHead, peer_host: str, trusted: TrustedProxies) -> AddressKey | None:
    if peer_host not in trusted:
        return None
    hops = list(_x_forwarded_for(head)) or list(_forwarded_for(head))
    if not hops:
        return None
    address = _address(client_hop(hops, trusted))
    return AddressKey(address) if address is not None else None


def client_hop(hops: Sequence[str], trusted: TrustedProxies) -> str:
    """The client among forwarding hops (oldest first): the last one not trusted, walking back.

    All trusted means the client is itself one of the trusted proxies: the first hop is taken.
    With ``*`` every hop is trusted, so the first hop is the client, as in uvicorn.
    """
    return next((hop for hop in reversed(hops) if hop not in trusted), hops[0])


def _x_forwarded_for(head: RequestHead) -> Iterator[str]:
    for name, value in head.headers:
        if name == "x-forwarded-for":
            yield from (hop.strip() for hop in value.split(","))


# RFC 7239: elements separated by ",", pairs by ";", values tokens or quoted strings.
_FORWARDED_PAIR = re.compile(r'\s*([^=,;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,;\s]*)\s*([,;]?)')


def _forwarded_for(head: RequestHead) -> Iterator[str]:
    for name, value in head.headers:
        if name == "forwarded":
            yield from _forwarded_elements(value)


def _forwarded_elements(value: str) -> Iterator[str]:
    # One hop per element; an element without "for=" is a hop whose address is unknown ("").
    position, hop = 0, ""
    while position < len(value):
        match = _FORWARDED_PAIR.match(value, position)
        if match is None or match.end() == position:
            yield hop
            return
        if match[1].lower() == "for":
            hop = match[2][1:-1] if match[2].startswith('"') else match[2]
        if match[3] != ";":
            yield hop
            hop = ""
        position = match.end()


def _host(hop: str) -> str:
    """The host of a forwarded hop: ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]``, ``[::1]:80`` or ``::1``."""
    if hop.startswith("["):
        return hop[1 : hop.find("]")] if "]" in hop else hop
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop


def _address(host: str) -> Address | None:
    # Behind a proxy every request asks about the same few hosts (the proxies, then its client):
    # remembered, as uvicorn remembers its trust answers. Nothing longer than any written address
    # (with brackets, port and scope) is an address, nor fills the cache.
    return _parsed(host) if 0 < len(host) <= _LONGEST_HOP else None


_LONGEST_HOP = 72  # [ + 45 (IPv6 with a dotted tail) + %scope (<= 16) + ] + :65535


@functools.lru_cache(maxsize=4096)
def _parsed(host: str) -> Address | None:
    try:
        return parse_address(_host(host))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------- learning


def learn_key(
    specs: Sequence[KeySpec],
    head: RequestHead | None,
    status: int,
    headers: Sequence[tuple[str, str]],
    body_prefix: bytes,
) -> str | None:
    """The session id this response creates (first spec in order), or ``None``.

    ``headers`` are the response's fields (any case); ``body_prefix`` the start of its decoded
    body (the ASGI body bytes, not chunked wire bytes; for a WebSocket, status 101 and the first
    message sent): only Engine.IO's handshake needs it, and the request's ``head`` (without it,
    no handshake is recognised: a response seen on the wire creates header and cookie keys only).
    An error response (4xx, 5xx) creates nothing, whatever it carries: "404 Session not found"
    must not claim the id it refuses.
    """
    if status >= 400:
        return None
    for spec in specs:
        value = _bounded(_learn_one(spec, head, status, headers, body_prefix))
        if value is not None:
            return value
    return None


def _learn_one(
    spec: KeySpec, head: RequestHead | None, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> str | None:
    if spec.kind is KeyKind.ENGINEIO:
        return _engineio_open(spec.name, head, status, body) if head is not None else None
    if spec.kind is KeyKind.MCP:
        return _response_header(headers, MCP_HEADER)
    if spec.kind is KeyKind.HEADER:
        return _response_header(headers, spec.name)
    if spec.kind is KeyKind.COOKIE:
        return _set_cookie(headers, spec.name)
    # A query parameter or an address is chosen by the client: no response creates one.
    return None


def _response_header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _set_cookie(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() != "set-cookie":
            continue
        pair, _, attributes = value.partition(";")
        cookie_name, equals, cookie_value = pair.partition("=")
        if equals and cookie_name.strip() == name and not _deletes(attributes):
            return cookie_value.strip().strip('"')
    return None


def _deletes(attributes: str) -> bool:
    # Max-Age wins over Expires (RFC 6265 5.3); without a clock, an Expires in or before 1970
    # (the date every framework writes to delete a cookie) is the one past date we recognise.
    expired = False
    for attribute in attributes.split(";"):
        name, _, value = attribute.partition("=")
        name = name.strip().lower()
        if name == "max-age":
            return _MAX_AGE_GONE.fullmatch(value.strip()) is not None
        expired = expired or (name == "expires" and _EPOCH.search(value) is not None)
    return expired


def _engineio_open(path: str, head: RequestHead, status: int, body: bytes) -> str | None:
    # Only a handshake creates a session: a GET on the path without a sid yet, answered by a
    # polling response (200) or, for a WebSocket-only client, by the first message after the 101.
    handshake = status == 200 or (status == 101 and is_upgrade(head))
    if not handshake or head.method != "GET" or not _on_path(head, path) or query_param(head, "sid"):
        return None
    match = _OPEN_PACKET.match(body[:MAX_LEARN_BODY])
    if match is None:
        return None
    try:
        # raw_decode stops at the object's end: packets batched after it (EIO=4 "\x1e", EIO=3
        # binary framing) are left unread, and so is any invalid UTF-8 in them.
        data, _ = _JSON.raw_decode(match[1].decode("utf-8", "replace"))
        sid = data.get("sid") if isinstance(data, dict) else None
    except (ValueError, RecursionError):
        return None
    return sid if isinstance(sid, str) else None
