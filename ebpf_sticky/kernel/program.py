"""The selection program, written with ``asm``: address → SipHash-1-3 → bucket → slot → socket.

Mirrors ``hashing.py`` step for step (same message words, same rounds), and ``bpf/select.c`` for
the bcc loader. Maps it uses (created by ``router.py``):

* ``socks``    REUSEPORT_SOCKARRAY, slot → listening socket.
* ``table``    ARRAY of two entries, each a whole bucket table (BUCKETS u16 slot numbers, 8 KiB):
               a compact table stays in cache, where one slot per 8-byte array element would cost
               a cache miss per connection (see hashing.BUCKETS for the measurements).
* ``live``     ARRAY of one u32: which of the two tables is live. The router writes the idle
               table, then flips this word, so no connection ever sees a half-written table.
* ``counters`` PERCPU_ARRAY of u64: selections per slot, and failures at index MAX_SLOTS.

It is attached for migration as well (``BPF_SK_REUSEPORT_SELECT_OR_MIGRATE``): when a retired slot's
socket closes, the kernel asks it where each handshake still in flight should go, and it picks
as for any client (from the moving socket's remote address when there is no packet to read).

On any failure the program returns SK_PASS without selecting, which lets the kernel pick by its own
hash: a connection is never refused because of the program, and the failure is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hashing import BUCKETS, MAX_SLOTS, ProgramConstants
from .asm import (
    DW,
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    R9,
    R10,
    H,
    Insn,
    Item,
    W,
    alu32,
    alu64,
    alu64r,
    assemble,
    call,
    exit_,
    ja,
    jmp,
    ld_imm64,
    ld_map_fd,
    ldx,
    mov,
    movr,
    stx,
)

# struct sk_reuseport_md offsets and the values read there.
CTX_LEN = 16
CTX_ETH_PROTOCOL = 20
CTX_MIGRATING_SK = 48
# struct bpf_sock offsets: a socket's family and its remote address (the client's).
SK_FAMILY, SK_DST_IP4, SK_DST_IP6 = 4, 52, 56
AF_INET, AF_INET6 = 2, 10
ETH_P_IP_BE = 0x0008  # htons(0x0800) as the u32 context field reads on little-endian
ETH_P_IPV6_BE = 0xDD86  # htons(0x86DD)
# Helpers.
HELPER_MAP_LOOKUP_ELEM = 1
HELPER_SKB_LOAD_BYTES_RELATIVE = 68
HELPER_SK_SELECT_REUSEPORT = 82
HDR_START_NET = 1
# Source address offsets in the network header.
IPV4_SRC_OFFSET, IPV6_SRC_OFFSET = 12, 8
SK_PASS = 1
FAILURE_INDEX = MAX_SLOTS
V4_MAPPED_HIGH = 0xFFFF << 16
LENGTH_WORD = 16 << 56

# Stack layout (offsets from r10).
ADDR = -16  # 16 bytes of source address
KEY = -20  # u32 map key
SLOT = -24  # u32 slot key for bpf_sk_select_reuseport


@dataclass(frozen=True)
class MapFds:
    socks: int
    table: int
    live: int
    counters: int


def _rotl(reg: int, bits: int, tmp: int) -> list[Item]:
    return [movr(tmp, reg), alu64("lsh", reg, bits), alu64("rsh", tmp, 64 - bits), alu64r("or", reg, tmp)]


def _sipround(v0: int, v1: int, v2: int, v3: int, tmp: int) -> list[Item]:
    return [
        alu64r("add", v0, v1),
        *_rotl(v1, 13, tmp),
        alu64r("xor", v1, v0),
        *_rotl(v0, 32, tmp),
        alu64r("add", v2, v3),
        *_rotl(v3, 16, tmp),
        alu64r("xor", v3, v2),
        alu64r("add", v0, v3),
        *_rotl(v3, 21, tmp),
        alu64r("xor", v3, v0),
        alu64r("add", v2, v1),
        *_rotl(v1, 17, tmp),
        alu64r("xor", v1, v2),
        *_rotl(v2, 32, tmp),
    ]


def _load_source(offset: int, length: int) -> list[Item]:
    """bpf_skb_load_bytes_relative(ctx, offset, fp+ADDR, length, BPF_HDR_START_NET)."""
    return [
        movr(R1, R6),
        mov(R2, offset),
        movr(R3, R10),
        alu64("add", R3, ADDR),
        mov(R4, length),
        mov(R5, HDR_START_NET),
        call(HELPER_SKB_LOAD_BYTES_RELATIVE),
        jmp("jne", R0, 0, "fail"),
    ]


def _lookup(map_fd: int, key_reg: int, null_target: str) -> list[Item]:
    """r0 = bpf_map_lookup_elem(map, &key_reg), jumping to null_target when absent."""
    return [
        stx(W, R10, key_reg, KEY),
        *ld_map_fd(R1, map_fd),
        movr(R2, R10),
        alu64("add", R2, KEY),
        call(HELPER_MAP_LOOKUP_ELEM),
        jmp("jeq", R0, 0, null_target),
    ]


def _migrating_client() -> list[Item]:
    """A connection moving off a closing listener (attached for migration, 5.14+) may come with no
    packet to read: a handshake whose SYN-ACK timer fired, or one from the accept queue. Then the
    client's address is the moving socket's remote end; copy it where the packet's would be, so
    the client lands on the slot the table gives it like any other. With a packet (the final ACK
    of a handshake), read the packet as always."""
    return [
        ldx(DW, R2, R6, CTX_MIGRATING_SK),
        jmp("jeq", R2, 0, "packet"),
        ldx(W, R3, R6, CTX_LEN),
        jmp("jne", R3, 0, "packet"),
        ldx(W, R3, R2, SK_FAMILY),
        jmp("jeq", R3, AF_INET, "sk_ipv4"),
        jmp("jne", R3, AF_INET6, "fail"),
        *(
            item
            for i in range(0, 16, 4)
            for item in (ldx(W, R3, R2, SK_DST_IP6 + i), stx(W, R10, R3, ADDR + i))
        ),
        # An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d: hash it as IPv4, as its
        # packets are.
        ldx(DW, R3, R10, ADDR),
        jmp("jne", R3, 0, "ipv6_address"),
        ldx(H, R3, R10, ADDR + 8),
        jmp("jne", R3, 0, "ipv6_address"),
        ldx(H, R3, R10, ADDR + 10),
        jmp("jne", R3, 0xFFFF, "ipv6_address"),
        ldx(W, R3, R10, ADDR + 12),
        stx(W, R10, R3, ADDR),
        ja("ipv4_address"),
        "sk_ipv4",
        ldx(W, R3, R2, SK_DST_IP4),
        stx(W, R10, R3, ADDR),
        ja("ipv4_address"),
    ]


def build(consts: ProgramConstants, fds: MapFds) -> list[Insn]:
    v0, v1, v2, v3, tmp = R0, R1, R2, R3, R4
    m0, m1 = R8, R7
    hash_rounds: list[Item] = []
    for m in (m0, m1, tmp):
        hash_rounds += [alu64r("xor", v3, m), *_sipround(v0, v1, v2, v3, R5), alu64r("xor", v0, m)]
    items: list[Item] = [
        movr(R6, R1),
        *_migrating_client(),
        "packet",
        ldx(W, R2, R6, CTX_ETH_PROTOCOL),
        jmp("jeq", R2, ETH_P_IP_BE, "ipv4"),
        jmp("jeq", R2, ETH_P_IPV6_BE, "ipv6"),
        ja("fail"),
        "ipv4",
        # m0 = 0, m1 = masked address << 32 | 0xffff0000: the words of ::ffff:a.b.c.d.
        *_load_source(IPV4_SRC_OFFSET, 4),
        "ipv4_address",
        ldx(W, m1, R10, ADDR),
        alu32("and", m1, consts.mask4),
        alu64("lsh", m1, 32),
        *ld_imm64(R1, V4_MAPPED_HIGH),
        alu64r("or", m1, R1),
        mov(m0, 0),
        ja("hash"),
        "ipv6",
        *_load_source(IPV6_SRC_OFFSET, 16),
        "ipv6_address",
        ldx(DW, m0, R10, ADDR),
        ldx(DW, m1, R10, ADDR + 8),
        *ld_imm64(R1, consts.mask6[0]),
        alu64r("and", m0, R1),
        *ld_imm64(R1, consts.mask6[1]),
        alu64r("and", m1, R1),
        "hash",
        *ld_imm64(v0, consts.v_init[0]),
        *ld_imm64(v1, consts.v_init[1]),
        *ld_imm64(v2, consts.v_init[2]),
        *ld_imm64(v3, consts.v_init[3]),
        *ld_imm64(tmp, LENGTH_WORD),
        *hash_rounds,
        alu64("xor", v2, 0xFF),
        *_sipround(v0, v1, v2, v3, R5),
        *_sipround(v0, v1, v2, v3, R5),
        *_sipround(v0, v1, v2, v3, R5),
        alu64r("xor", v0, v1),
        alu64r("xor", v0, v2),
        alu64r("xor", v0, v3),
        alu64("and", v0, BUCKETS - 1),
        alu64("lsh", v0, 1),
        movr(R7, R0),  # byte offset of the bucket's u16 in a table
        # slot = tables[live][bucket]
        mov(R1, 0),
        *_lookup(fds.live, R1, "fail"),
        ldx(W, R1, R0, 0),
        *_lookup(fds.table, R1, "fail"),
        alu64r("add", R0, R7),
        ldx(H, R9, R0, 0),
        stx(W, R10, R9, SLOT),
        movr(R1, R6),
        *ld_map_fd(R2, fds.socks),
        movr(R3, R10),
        alu64("add", R3, SLOT),
        mov(R4, 0),
        call(HELPER_SK_SELECT_REUSEPORT),
        jmp("jeq", R0, 0, "count"),
        "fail",
        mov(R9, FAILURE_INDEX),
        "count",
        *_lookup(fds.counters, R9, "done"),
        ldx(DW, R1, R0, 0),
        alu64("add", R1, 1),
        stx(DW, R0, R1, 0),
        "done",
        mov(R0, SK_PASS),
        exit_(),
    ]
    return assemble(items)
