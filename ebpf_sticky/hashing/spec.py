"""What decides a client's bucket: its address, masked to a prefix, and the group's secret key. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

KEY_BYTES = 16
DEFAULT_PREFIX4 = 32
DEFAULT_PREFIX6 = 64

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class HashSpec:
    """What decides an address's bucket: the secret key and the prefix lengths."""

    key: bytes
    prefix4: int = DEFAULT_PREFIX4
    prefix6: int = DEFAULT_PREFIX6

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"hash key must be {KEY_BYTES} bytes, got {len(self.key)}")
        if not 0 <= self.prefix4 <= 32:
            raise ValueError(f"IPv4 prefix must be 0..32, got {self.prefix4}")
        if not 0 <= self.prefix6 <= 128:
            raise ValueError(f"IPv6 prefix must be 0..128, got {self.prefix6}")


def parse_address(text: str) -> Address:
    """Parse a client address; an IPv4-mapped IPv6 address is the IPv4 client it stands for."""
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
