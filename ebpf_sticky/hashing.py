"""Keyed, consistent address → slot mapping: the Python mirror of the kernel program.

Design rules, shared with ``kernel/program.py`` and ``bpf/select.c``:

* The hashed message is always 16 bytes: an IPv6 address, or an IPv4 address written as
  ``::ffff:a.b.c.d``, masked to its prefix first. One code path for both families is why an IPv4
  client on a dual-stack ``[::]`` socket hashes exactly as on an ``AF_INET`` socket.
* The hash is SipHash-1-3 (the variant CPython and the kernel's hsiphash use for hash tables) with a
  128-bit secret key: clients cannot pick addresses that pile onto one worker without the key.
* The low 12 bits of the hash index a table of ``BUCKETS`` entries, each naming a slot. The table is
  a pure function of the slot count, grown one slot at a time (see ``bucket_table``), so any
  address's slot can be predicted offline from (key, prefixes, slot count). The classic-BPF router
  (``hashing_cbpf.py``) uses the very same table, decided there by comparisons on hash ranges.

Nothing here touches the OS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

# 4096 buckets, a power of two: SipHash output is uniform, so masking the low bits is exact (no
# modulo bias) and cheaper in BPF than a division by a prime; a prime size only matters for Maglev's
# permutation construction, which the growth rule below replaces. Small on purpose: the kernel's
# copy is 4096 u16 = 8 KiB and stays in cache. Measured per selection on this project's 2-core VM
# (bpf_stats): 65536 buckets 216 ns, 16384 154 ns, 4096 135 ns, no table at all 132 ns. Every slot's
# share is within one bucket of equal: max/mean <= 1 + slots/4096 (1.016 at 64 slots).
BUCKETS = 1 << 12
MAX_SLOTS = 256
KEY_BYTES = 16
DEFAULT_PREFIX4 = 32
DEFAULT_PREFIX6 = 64

_M64 = (1 << 64) - 1
# The message is 16 bytes long; SipHash's last word carries the length in its top byte.
_LENGTH_WORD = 16 << 56
_V4_MAPPED_HIGH = 0xFFFF << 16  # bytes 8..11 of ::ffff:a.b.c.d read as a little-endian word

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


@dataclass(frozen=True)
class ProgramConstants:
    """The per-group constants the kernel program embeds as immediates."""

    v_init: tuple[int, int, int, int]
    mask4: int  # little-endian u32 of the network-order IPv4 mask
    mask6: tuple[int, int]  # little-endian u64 words of the network-order IPv6 mask


def parse_address(text: str) -> Address:
    """Parse a client address; an IPv4-mapped IPv6 address is the IPv4 client it stands for."""
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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


@lru_cache(maxsize=64)
def bucket_table(slots: int, size: int = BUCKETS) -> tuple[int, ...]:
    """The slot owning each bucket when ``slots`` slots are live.

    Defined by growth: one slot owns every bucket, in bucket order; adding slot n takes from every
    existing slot the tail of its list beyond its fair share for n+1 slots (lowest slot first), and
    slot n's list is those tails in that order. So going from n to n+1 moves exactly the new slot's
    share (1/(n+1)) and nothing else, every slot's share is within one bucket of equal, and retiring
    the highest slot is the exact inverse of adding it.

    Pure integer steps, no random generator: the same table on every Python, pinned by golden
    vectors in the tests. Buckets start in their own order (no shuffle) because the keyed hash
    already spreads clients uniformly over buckets, and ordered buckets keep every slot's share a
    few contiguous hash ranges: that is what lets classic BPF decide the table with comparisons.
    """
    if not 1 <= slots <= MAX_SLOTS:
        raise ValueError(f"slot count must be 1..{MAX_SLOTS}, got {slots}")
    owned = [list(range(size))]
    for n in range(1, slots):
        taken: list[int] = []
        for i in range(n):
            fair = size // (n + 1) + (1 if i < size % (n + 1) else 0)
            taken.extend(owned[i][fair:])
            del owned[i][fair:]
        owned.append(taken)
    table = [0] * size
    for slot, buckets in enumerate(owned):
        for bucket in buckets:
            table[bucket] = slot
    return tuple(table)


def table_runs(slots: int) -> tuple[tuple[int, int], ...]:
    """The table as ranges: (first bucket, slot) of each run of buckets owned by one slot."""
    table = bucket_table(slots)
    return tuple((b, table[b]) for b in range(len(table)) if b == 0 or table[b] != table[b - 1])


def slot_of(address: Address, spec: HashSpec, slots: int) -> int:
    """The slot the kernel program picks for a client at ``address`` with ``slots`` live slots."""
    return bucket_table(slots)[bucket_of(address, spec)]


def buckets_of(addresses: Iterable[Address], spec: HashSpec) -> list[int]:
    """``bucket_of`` for many addresses, computing the per-spec constants once."""
    consts = program_constants(spec)
    return [hash_words(consts.v_init, *message_words(a, consts)) & (BUCKETS - 1) for a in addresses]
