"""The classic-BPF selection program, written with ``casm``: address → HalfSipHash-1-3 → slot.

Mirrors ``hashing_cbpf.py`` step for step. Attached with ``SO_ATTACH_REUSEPORT_CBPF``, which needs
no capability and no bpf(2): this is the router for hosts and containers that refuse eBPF.

What classic BPF gives and takes:

* ``ld [SKF_NET_OFF + k]`` reads the network header although the packet data starts at the TCP/UDP
  header; ``ldh [SKF_AD_OFF + SKF_AD_PROTOCOL]`` is the EtherType, so an IPv4 client on a
  dual-stack ``[::]`` socket takes the IPv4 path exactly as on an ``AF_INET`` socket.
* Registers A and X, scratch words M[0..15], a 32-bit ALU without rotate: HalfSipHash's state
  lives in M[0..3], the message words in M[4..7]; a rotate is two shifts and an or.
* No maps: the bucket table is compiled into the program as a binary tree of ``jge`` comparisons on
  the hash over the table's runs (``hashing.table_runs``), so a table change is a new program,
  attached in one ``setsockopt`` (atomic: a connection sees the old program or the new one).
* The return value is an index into the kernel's list of the group's sockets, in join order
  (``net/core/sock_reuseport.c``: ``reuse->socks[]``); an index past the end makes the kernel pick
  by its own hash. ``router.py`` keeps socket position = slot (see ``Router``).
* No counters: classic BPF cannot write anywhere but its scratch words.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ..hashing import MAX_SLOTS, table_runs
from ..hashing.cbpf import BUCKET_SHIFT, LENGTH_WORD, V4_MAPPED_WORD, CbpfConstants
from .casm import (
    MAXINSNS,
    SKF_AD_OFF,
    SKF_AD_PROTOCOL,
    SKF_NET_OFF,
    CInsn,
    H,
    Item,
    W,
    alu,
    alux,
    assemble,
    ja,
    jmp,
    ld_abs,
    ld_imm,
    ld_mem,
    ldx_mem,
    ret,
    st,
    tax,
    txa,
)

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPV4_SRC_OFFSET, IPV6_SRC_OFFSET = 12, 8
# Returned for a protocol that is neither: past any group's end, so the kernel's own hash picks.
FALLBACK = 0xFFFFFFFF
# Scratch words.
V0, V1, V2, V3 = 0, 1, 2, 3
MSG = (4, 5, 6, 7)


def _rotl_xor(v: int, bits: int, other: int) -> list[Item]:
    """M[v] = rotl(M[v], bits) ^ M[other]; expects X = M[v] on entry."""
    return [
        txa(),
        alu("rsh", 32 - bits),
        tax(),
        ld_mem(v),
        alu("lsh", bits),
        alux("or"),
        ldx_mem(other),
        alux("xor"),
        st(v),
    ]


def _rotl16(v: int) -> list[Item]:
    return [ld_mem(v), alu("rsh", 16), tax(), ld_mem(v), alu("lsh", 16), alux("or"), st(v)]


def _add(dst: int, src: int) -> list[Item]:
    """M[dst] += M[src], leaving X = M[src]."""
    return [ld_mem(src), tax(), ld_mem(dst), alux("add"), st(dst)]


def _sipround() -> list[Item]:
    """One HalfSipHash round over M[0..3] (see hashing_cbpf._round)."""
    return [
        *_add(V0, V1),
        *_rotl_xor(V1, 5, V0),
        *_rotl16(V0),
        *_add(V2, V3),
        *_rotl_xor(V3, 8, V2),  # leaves A = v3
        ldx_mem(V0),
        alux("add"),
        st(V0),  # v0 += v3
        ld_mem(V3),
        tax(),
        *_rotl_xor(V3, 7, V0),
        *_add(V2, V1),
        *_rotl_xor(V1, 13, V2),
        *_rotl16(V2),
    ]


def _xor_word(v: int, word: int) -> list[Item]:
    return [ld_mem(v), ldx_mem(word), alux("xor"), st(v)]


def _xor_const(v: int, value: int) -> list[Item]:
    return [ld_mem(v), alu("xor", value), st(v)]


def _hash(consts: CbpfConstants) -> list[Item]:
    """A = HalfSipHash-1-3(M[4..7] and the length word)."""
    items: list[Item] = []
    for v, value in zip((V0, V1, V2, V3), consts.v_init, strict=True):
        items += [ld_imm(value), st(v)]
    for word in MSG:
        items += [*_xor_word(V3, word), *_sipround(), *_xor_word(V0, word)]
    items += [*_xor_const(V3, LENGTH_WORD), *_sipround(), *_xor_const(V0, LENGTH_WORD)]
    items += _xor_const(V2, 0xFF)
    for _ in range(3):
        items += _sipround()
    return [*items, ld_mem(V1), ldx_mem(V3), alux("xor")]


def _count(items: list[Item]) -> int:
    return sum(1 for item in items if not isinstance(item, str))


def _tree(runs: tuple[tuple[int, int], ...], labels: Iterator[str]) -> list[Item]:
    """Return the slot of the run holding A, by binary search over the runs' first hashes.

    Each comparison sends A >= boundary to the right half. The right half starts after the whole
    left half, which may be more than 255 instructions away: then the comparison's true branch
    goes through a ``ja`` (32-bit reach) placed just after it.
    """
    if len(runs) == 1:
        return [ret(runs[0][1])]
    mid = len(runs) // 2
    left, right = _tree(runs[:mid], labels), _tree(runs[mid:], labels)
    boundary = runs[mid][0] << BUCKET_SHIFT
    right_label = next(labels)
    if _count(left) <= 255:
        return [jmp("jge", boundary, right_label, None), *left, right_label, *right]
    left_label = next(labels)
    return [
        jmp("jge", boundary, None, left_label),
        ja(right_label),
        left_label,
        *left,
        right_label,
        *right,
    ]


def build(consts: CbpfConstants, slots: int) -> list[CInsn]:
    labels = (f"r{i}" for i in itertools.count())
    net = SKF_NET_OFF
    items: list[Item] = [
        ld_abs(H, SKF_AD_OFF + SKF_AD_PROTOCOL),
        jmp("jeq", ETH_P_IPV6, "ipv6", None),
        jmp("jeq", ETH_P_IP, "ipv4", None),
        ret(FALLBACK),
        "ipv6",
    ]
    for i, word in enumerate(MSG):
        items += [ld_abs(W, net + IPV6_SRC_OFFSET + 4 * i), alu("and", consts.mask6[i]), st(word)]
    items += [
        ja("hash"),
        "ipv4",  # the words of ::ffff:a.b.c.d
        ld_abs(W, net + IPV4_SRC_OFFSET),
        alu("and", consts.mask4),
        st(MSG[3]),
        ld_imm(0),
        st(MSG[0]),
        st(MSG[1]),
        ld_imm(V4_MAPPED_WORD),
        st(MSG[2]),
        "hash",
        *_hash(consts),
        *_tree(table_runs(slots), labels),
    ]
    insns = assemble(items)
    if len(insns) > MAXINSNS:
        raise ValueError(
            f"{slots} slots need {len(insns)} classic BPF instructions; the kernel takes {MAXINSNS}"
        )
    return insns


def _fits(slots: int) -> bool:
    try:
        build(CbpfConstants((0, 0, 0, 0), 0, (0, 0, 0, 0)), slots)
    except ValueError:
        return False
    return True


def max_slots() -> int:
    """The most slots whose program (and every smaller one's) fits in BPF_MAXINSNS."""
    return next((n - 1 for n in range(1, MAX_SLOTS + 1) if not _fits(n)), MAX_SLOTS)


# Pinned by tests/unit/test_cbpf.py against max_slots(); a constant so that the CLI and the
# supervisor need not build 71 programs to learn it.
MAX_CBPF_SLOTS = 71
