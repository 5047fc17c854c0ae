"""The Python mirror of the kernel program: SipHash, masking, the consistent table."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter

import pytest

from ebpf_sticky.hashing import (
    BUCKETS,
    HashSpec,
    bucket_of,
    bucket_table,
    buckets_of,
    hash_words,
    message_words,
    parse_address,
    program_constants,
    siphash,
    slot_of,
)

KEY = bytes(range(16))
SPEC = HashSpec(bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0"))


def test_siphash_matches_reference_vectors() -> None:
    # SipHash-2-4 vectors from the SipHash paper (key 00..0f, message 00..len-1): the same code,
    # with c=1, d=3, is the hash we use.
    assert siphash(KEY, b"", 2, 4) == 0x726FDB47DD0E0E31
    assert siphash(KEY, bytes(range(15)), 2, 4) == 0xA129CA6149BE45E5
    assert siphash(KEY, bytes(range(8)), 2, 4) == 0x93F5F5799A932462


def test_word_path_equals_reference_siphash13() -> None:
    for text in ("10.1.2.3", "2001:db8::1", "127.0.0.1"):
        address = parse_address(text)
        spec = HashSpec(KEY, 32, 128)
        packed = address.packed if address.version == 6 else ipaddress.IPv6Address(f"::ffff:{text}").packed
        words = message_words(address, program_constants(spec))
        assert hash_words(program_constants(spec).v_init, *words) == siphash(KEY, packed, 1, 3)


def test_ipv4_mapped_is_the_ipv4_client() -> None:
    assert parse_address("::ffff:127.0.0.1") == ipaddress.IPv4Address("127.0.0.1")
    assert parse_address("[2001:db8::1]") == ipaddress.IPv6Address("2001:db8::1")
    assert bucket_of(parse_address("::ffff:10.0.0.7"), SPEC) == bucket_of(parse_address("10.0.0.7"), SPEC)


def test_prefix_grouping() -> None:
    a, b = parse_address("2001:db8:1:2::1"), parse_address("2001:db8:1:2:ffff:1:2:3")
    assert bucket_of(a, SPEC) == bucket_of(b, SPEC)  # one /64: one subscriber
    spec24 = HashSpec(SPEC.key, prefix4=24)
    assert bucket_of(parse_address("10.0.0.1"), spec24) == bucket_of(parse_address("10.0.0.200"), spec24)
    # Default /32 spreads IPv4 neighbours: 256 addresses of one /24 over 8 slots use them all.
    slots = {slot_of(parse_address(f"10.0.0.{i}"), SPEC, 8) for i in range(256)}
    assert slots == set(range(8))


def test_key_changes_placement() -> None:
    other = HashSpec(bytes(16))
    addresses = [parse_address(f"10.0.{i}.1") for i in range(200)]
    same = sum(bucket_of(a, SPEC) == bucket_of(a, other) for a in addresses)
    assert same < 5


@pytest.mark.parametrize("slots", [1, 2, 3, 7, 8, 64, 256])
def test_table_shares_within_one_bucket(slots: int) -> None:
    counts = Counter(bucket_table(slots))
    assert set(counts) == set(range(slots))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_growth_moves_only_the_new_slots_share() -> None:
    for n in range(1, 40):
        before, after = bucket_table(n), bucket_table(n + 1)
        moved = [b for b in range(BUCKETS) if before[b] != after[b]]
        assert all(after[b] == n for b in moved)  # moved buckets go to the new slot only
        assert len(moved) == BUCKETS // (n + 1) + (1 if n < BUCKETS % (n + 1) else 0)


def test_balance_over_a_million_addresses() -> None:
    rng = random.Random(1)
    random_v4 = [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(1_000_000)]
    sequential = [ipaddress.IPv4Address(0x0A000000 + i) for i in range(1 << 20)]  # 10.0.0.0/12
    for addresses in (random_v4, sequential):
        table = bucket_table(8)
        counts = Counter(table[b] for b in buckets_of(addresses, SPEC))
        assert max(counts.values()) / (len(addresses) / 8) <= 1.02


def test_remap_fraction_is_ideal_over_a_million_addresses() -> None:
    rng = random.Random(2)
    buckets = buckets_of((ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(1_000_000)), SPEC)
    for n in range(2, 17):
        before, after = bucket_table(n), bucket_table(n + 1)
        moved = sum(before[b] != after[b] for b in buckets) / len(buckets)
        assert moved <= 1.05 / (n + 1), (n, moved)
        assert moved >= 0.95 / (n + 1), (n, moved)  # and the new slot does get its share


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        HashSpec(b"short")
    with pytest.raises(ValueError, match="0..32"):
        HashSpec(KEY, prefix4=33)
    with pytest.raises(ValueError, match="1..256"):
        bucket_table(0)
