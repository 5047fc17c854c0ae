"""Session affinity beyond the source address: what the worker reads before the app sees a byte.

The pure parts live here: the PROXY protocol header (``proxy_protocol``), an HTTP/1.x request head
(``http_head``), and the session keys read from a head or learnt from a response (``keys``). They
take bytes and return values or raise their own declared errors, never anything else, whatever the
peer sends; every size they read is bounded. Nothing here touches the OS.
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
