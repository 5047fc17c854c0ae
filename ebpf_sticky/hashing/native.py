"""The eBPF router's mirror: address → SipHash-1-3 → bucket → slot, step for step as ``kernel/program.py``.

See the package's docstring for the design rules. Nothing here touches the OS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .spec import Address, HashSpec
from .table import BUCKETS, bucket_table

_M64 = (1 << 64) - 1
# The message is 16 bytes long; SipHash's last word carries the length in its top byte.
_LENGTH_WORD = 16 << 56
_V4_MAPPED_HIGH = 0xFFFF << 16  # bytes 8..11 of ::ffff:a.b.c.d read as a little-endian word


@dataclass(frozen=True)
class ProgramConstants:
    """The per-group constants the kernel program embeds as immediates."""

    v_init: tuple[int, int, int, int]
    mask4: int  # little-endian u32 of the network-order IPv4 mask
    mask6: tuple[int, int]  # little-endian u64 words of the network-order IPv6 mask


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _M64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _M64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _M64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _M64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash_init(key: bytes) -> tuple[int, int, int, int]:
    k0 = int.from_bytes(key[:8], "little")
    k1 = int.from_bytes(key[8:16], "little")
    return (
        k0 ^ 0x736F6D6570736575,
        k1 ^ 0x646F72616E646F6D,
        k0 ^ 0x6C7967656E657261,
        k1 ^ 0x7465646279746573,
    )


def siphash(key: bytes, message: bytes, c_rounds: int = 1, d_rounds: int = 3) -> int:
    """SipHash-c-d of any message (reference form, used to check the fast path)."""
    v0, v1, v2, v3 = siphash_init(key)
    tail_len = len(message) % 8
    words = [int.from_bytes(message[i : i + 8], "little") for i in range(0, len(message) - tail_len, 8)]
    last = ((len(message) & 0xFF) << 56) | int.from_bytes(message[len(message) - tail_len :], "little")
    for m in [*words, last]:
        v3 ^= m
        for _ in range(c_rounds):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(d_rounds):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def _mask_bytes(prefix: int, width: int) -> bytes:
    return (((1 << prefix) - 1) << (width - prefix)).to_bytes(width // 8, "big")


def program_constants(spec: HashSpec) -> ProgramConstants:
    mask6 = _mask_bytes(spec.prefix6, 128)
    return ProgramConstants(
        v_init=siphash_init(spec.key),
        mask4=int.from_bytes(_mask_bytes(spec.prefix4, 32), "little"),
        mask6=(int.from_bytes(mask6[:8], "little"), int.from_bytes(mask6[8:], "little")),
    )


def message_words(address: Address, consts: ProgramConstants) -> tuple[int, int]:
    """The two little-endian words the kernel program hashes for this source address."""
    if isinstance(address, ipaddress.IPv4Address):
        v4 = int.from_bytes(address.packed, "little") & consts.mask4
        return 0, (v4 << 32) | _V4_MAPPED_HIGH
    packed = address.packed
    return (
        int.from_bytes(packed[:8], "little") & consts.mask6[0],
        int.from_bytes(packed[8:], "little") & consts.mask6[1],
    )


def hash_words(v_init: tuple[int, int, int, int], m0: int, m1: int) -> int:
    """SipHash-1-3 of a 16-byte message given as two words: the exact steps of the BPF program."""
    v0, v1, v2, v3 = v_init
    for m in (m0, m1, _LENGTH_WORD):
        v3 ^= m
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def bucket_of(address: Address, spec: HashSpec) -> int:
    consts = program_constants(spec)
    return hash_words(consts.v_init, *message_words(address, consts)) & (BUCKETS - 1)


def slot_of(address: Address, spec: HashSpec, slots: int) -> int:
    """The slot the kernel program picks for a client at ``address`` with ``slots`` live slots."""
    return bucket_table(slots)[bucket_of(address, spec)]


def buckets_of(addresses: Iterable[Address], spec: HashSpec) -> list[int]:
    """``bucket_of`` for many addresses, computing the per-spec constants once."""
    consts = program_constants(spec)
    return [hash_words(consts.v_init, *message_words(a, consts)) & (BUCKETS - 1) for a in addresses]
