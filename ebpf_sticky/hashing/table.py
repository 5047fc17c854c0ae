"""The bucket table both routers share: which slot owns each of ``BUCKETS`` hash buckets. Pure."""

from __future__ import annotations

from functools import lru_cache

# 4096 buckets, a power of two: SipHash output is uniform, so masking the low bits is exact (no
# modulo bias) and cheaper in BPF than a division by a prime; a prime size only matters for Maglev's
# permutation construction, which the growth rule below replaces. Small on purpose: the kernel's
# copy is 4096 u16 = 8 KiB and stays in cache. Measured per selection on this project's 2-core VM
# (bpf_stats): 65536 buckets 216 ns, 16384 154 ns, 4096 135 ns, no table at all 132 ns. Every slot's
# share is within one bucket of equal: max/mean <= 1 + slots/4096 (1.016 at 64 slots).
BUCKETS = 1 << 12
MAX_SLOTS = 256


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
