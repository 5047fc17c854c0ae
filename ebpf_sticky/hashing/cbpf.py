"""The classic-BPF router's mirror: address → HalfSipHash-1-3 → bucket → slot, as ``kernel/cbpf.py``.

Classic BPF has two 32-bit registers and sixteen 32-bit scratch words, so SipHash's 64-bit lanes do
not fit; HalfSipHash, its 32-bit sibling (the kernel's ``hsiphash`` on 32-bit machines), does. The
same design rules as the eBPF mirror (``native.py``) otherwise:

* The message is the 16-byte address (an IPv4 client as ``::ffff:a.b.c.d``), masked to its prefix,
  taken as four 32-bit words in network byte order: classic BPF's ``ld [k]`` reads packet words
  big-endian and has no byte swap, so the words are defined the way the program reads them.
  HalfSipHash-1-3 runs over those four words and the length word, exactly as the reference
  implementation runs over the little-endian words of a byte string.
* Its 64-bit key is derived from the launch's 128-bit key: the first 8 bytes of
  SipHash-2-4(key, "ebpf-sticky cbpf key"), a PRF output, so it tells nothing about the 128-bit key
  and `route` can recompute it from ``--hash-key``.
* The top 12 bits of the 32-bit hash pick one of the ``BUCKETS`` buckets of the shared
  ``table.bucket_table`` (top bits, because the program compares the whole hash against range
  boundaries: bucket b starts at hash ``b << 20``).

Nothing here touches the OS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .native import siphash
from .spec import Address, HashSpec
from .table import BUCKETS, bucket_table

_M32 = 0xFFFFFFFF
KEY_LABEL = b"ebpf-sticky cbpf key"
BUCKET_SHIFT = 32 - (BUCKETS.bit_length() - 1)  # 20: the top 12 bits name the bucket
# The hashed message is 16 bytes; HalfSipHash's last word carries the length in its top byte.
LENGTH_WORD = 16 << 24
V4_MAPPED_WORD = 0x0000FFFF  # bytes 8..11 of ::ffff:a.b.c.d read big-endian


@dataclass(frozen=True)
class CbpfConstants:
    """The per-group constants the classic program embeds as immediates."""

    v_init: tuple[int, int, int, int]
    mask4: int  # host-order mask of the big-endian IPv4 word
    mask6: tuple[int, int, int, int]  # host-order masks of the four big-endian IPv6 words


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (32 - b))) & _M32


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _M32
    v1 = _rotl(v1, 5) ^ v0
    v0 = _rotl(v0, 16)
    v2 = (v2 + v3) & _M32
    v3 = _rotl(v3, 8) ^ v2
    v0 = (v0 + v3) & _M32
    v3 = _rotl(v3, 7) ^ v0
    v2 = (v2 + v1) & _M32
    v1 = _rotl(v1, 13) ^ v2
    v2 = _rotl(v2, 16)
    return v0, v1, v2, v3


def halfsiphash_init(key: bytes) -> tuple[int, int, int, int]:
    k0 = int.from_bytes(key[:4], "little")
    k1 = int.from_bytes(key[4:8], "little")
    return k0, k1, k0 ^ 0x6C796765, k1 ^ 0x74656462


def _compress(v: tuple[int, int, int, int], words: Iterable[int], c_rounds: int, d_rounds: int) -> int:
    v0, v1, v2, v3 = v
    for m in words:
        v3 ^= m
        for _ in range(c_rounds):
            v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(d_rounds):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v1 ^ v3


def halfsiphash(key: bytes, message: bytes, c_rounds: int = 1, d_rounds: int = 3) -> int:
    """HalfSipHash-c-d with a 32-bit output over a byte string (reference form, for the vectors)."""
    tail_len = len(message) % 4
    words = [int.from_bytes(message[i : i + 4], "little") for i in range(0, len(message) - tail_len, 4)]
    last = ((len(message) & 0xFF) << 24) | int.from_bytes(message[len(message) - tail_len :], "little")
    return _compress(halfsiphash_init(key), [*words, last], c_rounds, d_rounds)


def derive_key(key: bytes) -> bytes:
    """The 64-bit HalfSipHash key of a launch's 128-bit key."""
    return siphash(key, KEY_LABEL, 2, 4).to_bytes(8, "little")


def _mask_words(prefix: int, width: int) -> list[int]:
    mask = ((1 << prefix) - 1) << (width - prefix)
    return [(mask >> (width - 32 * (i + 1))) & _M32 for i in range(width // 32)]


def program_constants(spec: HashSpec) -> CbpfConstants:
    m0, m1, m2, m3 = _mask_words(spec.prefix6, 128)
    return CbpfConstants(
        v_init=halfsiphash_init(derive_key(spec.key)),
        mask4=_mask_words(spec.prefix4, 32)[0],
        mask6=(m0, m1, m2, m3),
    )


def message_words(address: Address, consts: CbpfConstants) -> tuple[int, int, int, int]:
    """The four words the classic program hashes for this source address."""
    if isinstance(address, ipaddress.IPv4Address):
        return 0, 0, V4_MAPPED_WORD, int(address) & consts.mask4
    w = [(int(address) >> (96 - 32 * i)) & _M32 & consts.mask6[i] for i in range(4)]
    return w[0], w[1], w[2], w[3]


def hash_words(v_init: tuple[int, int, int, int], words: tuple[int, int, int, int]) -> int:
    """HalfSipHash-1-3 of the four message words: the exact steps of the classic program."""
    return _compress(v_init, [*words, LENGTH_WORD], 1, 3)


def bucket_of(address: Address, spec: HashSpec) -> int:
    consts = program_constants(spec)
    return hash_words(consts.v_init, message_words(address, consts)) >> BUCKET_SHIFT


def slot_of(address: Address, spec: HashSpec, slots: int) -> int:
    """The slot the classic program picks for a client at ``address`` with ``slots`` live slots."""
    return bucket_table(slots)[bucket_of(address, spec)]


def buckets_of(addresses: Iterable[Address], spec: HashSpec) -> list[int]:
    """``bucket_of`` for many addresses, computing the per-spec constants once."""
    consts = program_constants(spec)
    return [hash_words(consts.v_init, message_words(a, consts)) >> BUCKET_SHIFT for a in addresses]
