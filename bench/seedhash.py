"""npm sticky-session 1.1.2's worker choice, in Python: ``hash(ip) % workers`` with JavaScript's
int32/double arithmetic reproduced exactly (checked against node by tests/unit/test_bench_figures.py)."""

from __future__ import annotations

import math

_M31 = 2147483648


def _i32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _mod(x: int) -> int:
    return int(math.fmod(x, _M31))  # JavaScript's %: the sign follows the dividend


def seed_hash(address: bytes, seed: int) -> int:
    h = seed
    for num in address:
        h = _mod(h + num)
        h = _mod(h + _i32(_i32(h) << 10))
        h = _i32(h) ^ (_i32(h) >> 6)
    h = _mod(h + _i32(_i32(h) << 3))
    h = _i32(h) ^ (_i32(h) >> 11)
    h = _mod(h + _i32(_i32(h) << 15))
    return h & 0xFFFFFFFF


def seed_worker(address: bytes, seed: int, workers: int) -> int:
    return seed_hash(address, seed) % workers
