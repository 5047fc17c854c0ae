"""Wiring the session layer into a worker: its fds from the master, and uvicorn's hooks.

The layer is installed on uvicorn's own server, not beside it: uvicorn still accepts on the slot's
socket (its accept loop, its backlog, its graceful shutdown), and each accepted connection's
protocol is uvicorn's own with a ``Gate`` in front of its ``data_received``.
"""

from __future__ import annotations

import mmap
import socket
from typing import Any

from ..contract import HANDOFF_RECV_FD, HANDOFF_SEND_FD0, SESSION_TABLE_FD
from ..hashing import HashSpec
from .keys import KeyKind, parse_key_spec, parse_trusted
from .ownership import SessionTable, table_size
from .prefilter import creators
from .runtime import MIRRORS, AdoptedGate, Layer, gated, issue_engineio_ids, learning_app
from .settings import SessionSettings


def open_layer(settings: SessionSettings, slot: int, family: socket.AddressFamily) -> Layer:
    """The worker's layer over the fds the master passed (see ``contract``); ``family`` is the
    slot socket's."""
    table_key = bytes.fromhex(settings.table_key)
    memory = mmap.mmap(SESSION_TABLE_FD, table_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    receiver = socket.socket(fileno=HANDOFF_RECV_FD)
    receiver.setblocking(False)
    senders = [socket.socket(fileno=HANDOFF_SEND_FD0 + i) for i in range(settings.send_slots)]
    for sender in senders:
        sender.setblocking(False)
    spec = (
        HashSpec(bytes.fromhex(settings.routing_key), settings.prefix4, settings.prefix6)
        if settings.routing_key
        else None
    )
    trusted = parse_trusted(settings.trusted)
    specs = tuple(parse_key_spec(text) for text in settings.keys)
    issued = any(spec.kind is KeyKind.ENGINEIO for spec in specs) and issue_engineio_ids(slot, table_key)
    return Layer(
        slot=slot,
        specs=specs,
        creators=creators(specs, issued),
        proxy_protocol=settings.proxy_protocol,
        trusted=trusted,
        table=SessionTable(memoryview(memory), table_key),
        senders=senders,
        receiver=receiver,
        family=family,
        spec=spec,
        mirror=MIRRORS[settings.mirror],
    )


def install(config: Any, server: Any, layer: Layer) -> None:
    """Before ``server.serve``: every connection uvicorn accepts is gated."""
    if not config.loaded:
        config.load()
    protocol, adopted = gated(config.http_protocol_class, layer)
    if layer.creators.any and getattr(protocol, "response_head", None) is None:
        config.loaded_app = learning_app(config.loaded_app, layer)  # the protocol shows no heads

    def make_protocol() -> AdoptedGate:
        # The arguments uvicorn's server gives the protocols it creates for accepted connections.
        return adopted(config=config, server_state=server.server_state, app_state=server.lifespan.state)

    layer.make_protocol = make_protocol
    config.http_protocol_class = protocol
