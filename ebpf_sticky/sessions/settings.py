"""What a worker's session layer needs to know, as the master hands it over. Pure."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SessionSettings:
    """The session layer of one launch: on when ``keys`` or ``proxy_protocol`` is given.

    ``table_key`` keys the hash of session ids in the shared table and the tag of the ids we issue:
    it is not the routing key, so a worker that knows it learns nothing about where addresses go.
    ``routing_key`` (the hash key the kernel routes by) is only handed over when an address decides
    the slot (``--proxy-protocol`` or ``--session-key forwarded``).
    """

    keys: tuple[str, ...] = ()  # --session-key texts, validated by the master
    proxy_protocol: bool = False
    trusted: str = "127.0.0.1"  # uvicorn's --forwarded-allow-ips syntax
    table_key: str = ""  # hex
    routing_key: str | None = None  # hex; only when address keys are in use
    prefix4: int = 32
    prefix6: int = 64
    mirror: str = "native"  # which Python mirror predicts the kernel's choice: native or cbpf
    send_slots: int = 0  # handoff send ends on fds HANDOFF_SEND_FD0 .. + send_slots - 1

    @property
    def enabled(self) -> bool:
        return bool(self.keys) or self.proxy_protocol

    @property
    def needs_routing_key(self) -> bool:
        return self.proxy_protocol or "forwarded" in self.keys

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SessionSettings:
        data = json.loads(text)
        data["keys"] = tuple(data["keys"])
        return cls(**data)
