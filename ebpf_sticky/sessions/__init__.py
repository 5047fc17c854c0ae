"""Session affinity beyond the source address: the worker decides before the app sees a byte.

A connection is read up to its first request head; its session key (an id the app issued, or a
client address a trusted proxy reports) names the slot that owns it, and a connection owned
elsewhere is handed to that slot's worker. Pure, and re-exported here:

* ``proxy_protocol`` — the PROXY protocol v1/v2 header a load balancer sends first;
* ``http_head`` — an HTTP/1.x request head, and the header, cookie and query values in it;
* ``keys`` — ``--session-key`` specs, the key of a request, the id a response creates, and
  ``--forwarded-allow-ips``.

They take bytes and strings and return values or raise their own declared errors, whatever the
peer sends, and every size they read is bounded. ``settings`` and ``ownership`` (which slot owns
an id) are pure too; ``handoff`` (moving a connection), ``master`` (the table and the handoff
sockets the master keeps), ``runtime`` and ``service`` (the layer in a worker) do the I/O.
"""

from .http_head import (
    MAX_HEAD,
    HeadError,
    RequestHead,
    cookie,
    header,
    is_upgrade,
    parse_request_head,
    query_param,
)
from .keys import (
    AddressKey,
    IdKey,
    Key,
    KeyKind,
    KeySpec,
    TrustedProxies,
    extract_key,
    learn_key,
    parse_key_spec,
    parse_trusted,
)
from .proxy_protocol import MAX_PROXY_HEADER, ProxyHeader, ProxyProtocolError, parse_proxy_header

__all__ = [
    "MAX_HEAD",
    "MAX_PROXY_HEADER",
    "AddressKey",
    "HeadError",
    "IdKey",
    "Key",
    "KeyKind",
    "KeySpec",
    "ProxyHeader",
    "ProxyProtocolError",
    "RequestHead",
    "TrustedProxies",
    "cookie",
    "extract_key",
    "header",
    "is_upgrade",
    "learn_key",
    "parse_key_spec",
    "parse_proxy_header",
    "parse_request_head",
    "parse_trusted",
    "query_param",
]
