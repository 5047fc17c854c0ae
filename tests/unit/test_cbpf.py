"""The classic-BPF program and its mirror: HalfSipHash, the program's shape, and an interpreter run.

The interpreter below executes the assembled program the way the kernel's classic BPF does (A, X,
M[], ``ld [SKF_NET_OFF + k]`` on a network header, ``ldh [proto]``), so the program is checked
against ``hashing_cbpf`` here without root; tests/kernel/test_cbpf_router.py checks the same on the
real kernel, as an unprivileged user.
"""

from __future__ import annotations

import hashlib
import ipaddress
import operator
import random
from collections import Counter

import pytest

from ebpf_sticky.hashing import BUCKETS, HashSpec, bucket_table, parse_address, siphash, table_runs
from ebpf_sticky.hashing.cbpf import (
    buckets_of,
    derive_key,
    halfsiphash,
    hash_words,
    message_words,
    program_constants,
    slot_of,
)
from ebpf_sticky.kernel import casm, cbpf

SPEC = HashSpec(bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0"))


ALU = {
    casm.ALU_OPS["add"]: operator.add,
    casm.ALU_OPS["or"]: operator.or_,
    casm.ALU_OPS["and"]: operator.and_,
    casm.ALU_OPS["lsh"]: operator.lshift,
    casm.ALU_OPS["rsh"]: operator.rshift,
    casm.ALU_OPS["xor"]: operator.xor,
}


def run(insns: list[casm.CInsn], proto: int, net: bytes) -> int:
    """Execute a classic program on a packet given by its EtherType and network header."""
    a = x = 0
    mem = [0] * casm.MEMWORDS
    pc = 0
    while True:
        insn = insns[pc]
        pc += 1
        cls, k = insn.code & 7, insn.k
        if cls == casm.LD:
            mode = insn.code & 0xE0
            if mode == casm.ABS:
                offset = k - (1 << 32)
                if offset == casm.SKF_AD_OFF + casm.SKF_AD_PROTOCOL:
                    a = proto
                else:
                    size = {casm.W: 4, casm.H: 2, casm.B: 1}[insn.code & 0x18]
                    where = offset - casm.SKF_NET_OFF
                    if where + size > len(net):
                        return 0  # the kernel ends the program with 0 on a load past the end
                    a = int.from_bytes(net[where : where + size], "big")
            elif mode == casm.MEM:
                a = mem[k]
            else:
                a = k
        elif cls == casm.LDX:
            x = mem[k]
        elif cls == casm.ST:
            mem[k] = a
        elif cls == casm.ALU:
            operand = x if insn.code & casm.X else k
            a = ALU[insn.code & 0xF0](a, operand) & 0xFFFFFFFF
        elif cls == casm.JMP:
            op = insn.code & 0xF0
            if op == 0:
                pc += k
            else:
                taken = {0x10: a == k, 0x30: a >= k}[op]
                pc += insn.jt if taken else insn.jf
        elif cls == casm.RET:
            return k
        elif cls == casm.MISC:
            if insn.code & casm.TXA:
                a = x
            else:
                x = a


def ipv4_header(source: str) -> bytes:
    return bytes(12) + ipaddress.IPv4Address(source).packed + bytes([127, 0, 0, 1])


def ipv6_header(source: str) -> bytes:
    return bytes(8) + ipaddress.IPv6Address(source).packed + bytes(16)


def test_halfsiphash_matches_the_reference_vectors() -> None:
    # vectors_hsip32 of the SipHash reference implementation (HalfSipHash-2-4, key 00..07, message
    # 00..len-1, output little-endian): the same code with c=1, d=3 is the router's hash.
    key = bytes(range(8))
    expected = {0: "a9359f5b", 1: "27475ab8", 8: "d0b8848f", 10: "94b07934"}
    for length, tag in expected.items():
        assert halfsiphash(key, bytes(range(length)), 2, 4).to_bytes(4, "little").hex() == tag


def test_word_path_is_halfsiphash13_of_the_big_endian_words() -> None:
    spec = HashSpec(SPEC.key, 32, 128)
    consts = program_constants(spec)
    for text in ("10.1.2.3", "2001:db8::1"):
        address = parse_address(text)
        packed = ipaddress.IPv6Address(f"::ffff:{text}").packed if address.version == 4 else address.packed
        # Our words are the big-endian words; the reference reads little-endian words.
        swapped = b"".join(packed[i : i + 4][::-1] for i in range(0, 16, 4))
        words = message_words(address, consts)
        assert hash_words(consts.v_init, words) == halfsiphash(derive_key(spec.key), swapped, 1, 3)


def test_golden_vectors() -> None:
    # Pinned: a change here changes where every client of a cbpf instance lands.
    assert derive_key(SPEC.key) == siphash(SPEC.key, b"ebpf-sticky cbpf key", 2, 4).to_bytes(8, "little")
    assert derive_key(SPEC.key).hex() == "8f2f5e66e5a63980"
    assert [slot_of(parse_address(a), SPEC, 5) for a in ("10.0.0.1", "127.0.0.2", "2001:db8::1")] == [4, 4, 3]


def test_table_golden_vectors() -> None:
    # The growth rule with buckets in their own order, pinned run by run for a few slot counts.
    assert table_runs(1) == ((0, 0),)
    assert table_runs(2) == ((0, 0), (2048, 1))
    assert table_runs(3) == ((0, 0), (1366, 2), (2048, 1), (3413, 2))
    assert len(table_runs(8)) == 27 and len(table_runs(64)) == 1454
    digest = hashlib.sha256(repr([bucket_table(n) for n in (4, 7, 16, 64)]).encode()).hexdigest()
    assert digest[:16] == "26e888996a692c66"


@pytest.mark.parametrize("slots", [1, 2, 5, 8, 33])
def test_program_routes_as_the_mirror(slots: int) -> None:
    spec = HashSpec(SPEC.key, prefix4=24, prefix6=56)
    insns = cbpf.build(program_constants(spec), slots)
    rng = random.Random(slots)
    for _ in range(300):
        v4 = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        v6 = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        assert run(insns, cbpf.ETH_P_IP, ipv4_header(v4)) == slot_of(parse_address(v4), spec, slots)
        assert run(insns, cbpf.ETH_P_IPV6, ipv6_header(v6)) == slot_of(parse_address(v6), spec, slots)
    assert run(insns, 0x0806, bytes(40)) == cbpf.FALLBACK  # neither IPv4 nor IPv6: the kernel's hash


def test_largest_slot_count_that_fits() -> None:
    assert cbpf.max_slots() == cbpf.MAX_CBPF_SLOTS == 71
    consts = program_constants(SPEC)
    assert len(cbpf.build(consts, 64)) <= casm.MAXINSNS
    with pytest.raises(ValueError, match="the kernel takes 4096"):
        cbpf.build(consts, cbpf.MAX_CBPF_SLOTS + 1)


def test_disassembly_reads_like_tcpdump() -> None:
    text = casm.disassemble(cbpf.build(program_constants(SPEC), 2))
    lines = text.splitlines()
    assert lines[0] == "   0: ldh [proto]"
    assert lines[1].startswith("   1: jeq #0x86dd jt 4 jf 2")
    assert "ld [net+12]" in text and "ld [net+20]" in text
    n = len(lines)
    assert lines[-3:] == [
        f"{n - 3:4d}: jge #0x80000000 jt {n - 1} jf {n - 2}",
        f"{n - 2:4d}: ret #0",
        f"{n - 1:4d}: ret #1",
    ]


def test_far_branches_go_through_ja() -> None:
    insns = cbpf.build(program_constants(SPEC), 64)
    assert any(insn.code == casm.JMP | casm.JMP_OPS["ja"] and insn.k > 255 for insn in insns)
    assert all(insn.jt <= 255 and insn.jf <= 255 for insn in insns)


def test_assembler_refuses_what_the_kernel_would() -> None:
    too_far: list[casm.Item] = [casm.jmp("jeq", 1, "end", None), *[casm.ret(0)] * 256, "end", casm.ret(1)]
    with pytest.raises(ValueError, match="reaches 0..255"):
        casm.assemble(too_far)
    with pytest.raises(ValueError, match="undefined label"):
        casm.assemble([casm.ja("nowhere")])
    with pytest.raises(ValueError, match="M\\[16\\]"):
        casm.st(16)


def test_balance_over_a_million_addresses() -> None:
    rng = random.Random(1)
    random_v4 = [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(1_000_000)]
    table = bucket_table(8)
    counts = Counter(table[b] for b in buckets_of(random_v4, SPEC))
    ratio = max(counts.values()) / (len(random_v4) / 8)
    print(f"cbpf balance, 8 slots, 1M random IPv4: max/mean {ratio:.4f}")
    assert ratio <= 1.02


def test_remap_fraction_is_ideal() -> None:
    rng = random.Random(2)
    buckets = buckets_of((ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(200_000)), SPEC)
    for n in (2, 4, 7, 8, 16, 32, 63, 70):
        before, after = bucket_table(n), bucket_table(n + 1)
        moved = [b for b in buckets if before[b] != after[b]]
        assert all(after[b] == n for b in moved)
        share = len(moved) / len(buckets)
        print(f"cbpf {n}->{n + 1}: moved {share:.4f} (ideal {1 / (n + 1):.4f})")
        assert 0.95 / (n + 1) <= share <= 1.05 / (n + 1), (n, share)
    assert BUCKETS == 4096
