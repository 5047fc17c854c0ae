// The selection program in C, for the bcc loader and for readers.
// Mirrors ebpf_sticky/kernel/program.py instruction for instruction in meaning: read the client's
// source address, mask it to its prefix, SipHash-1-3 it with the group's key, look the bucket up in
// the live one of the two bucket tables, select that slot's socket, count.
//
// bcc 0.26 has no reuseport_sockarray table type and does not relocate &map for
// bpf_sk_select_reuseport, so the router creates every map and passes the fds in, as it does for
// the native loader; both loaders then share one set of maps. Constants come as -D flags:
//   SOCKS_FD TABLE_FD LIVE_FD COUNTERS_FD  map fds
//   V0 V1 V2 V3                    SipHash state after keying (hashing.siphash_init)
//   MASK4 MASK6_0 MASK6_1          prefix masks as little-endian words (hashing.program_constants)
//   BUCKETS MAX_SLOTS              table size and the counters' failure index
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                 \
    do {                         \
        v0 += v1;                \
        v1 = ROTL(v1, 13) ^ v0;  \
        v0 = ROTL(v0, 32);       \
        v2 += v3;                \
        v3 = ROTL(v3, 16) ^ v2;  \
        v0 += v3;                \
        v3 = ROTL(v3, 21) ^ v0;  \
        v2 += v1;                \
        v1 = ROTL(v1, 17) ^ v2;  \
        v2 = ROTL(v2, 32);       \
    } while (0)
#define ABSORB(m)     \
    do {              \
        v3 ^= (m);    \
        SIPROUND;     \
        v0 ^= (m);    \
    } while (0)

#define SK_PASS_ 1
#define IPV4_SRC_OFFSET 12
#define IPV6_SRC_OFFSET 8
#define V4_MAPPED_HIGH 0xffff0000ULL
#define V4_MAPPED_LOW 0xffff0000U  // the third word of ::ffff:a.b.c.d, as loaded little-endian
#define AF_INET 2
#define AF_INET6 10
#define LENGTH_WORD (16ULL << 56)

static __always_inline void count(u32 index) {
    u64 *counter = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, COUNTERS_FD), &index);
    if (counter)
        *counter += 1;
}

int select_slot(struct sk_reuseport_md *ctx) {
    u64 addr[2] = {0, 0};
    u64 m0, m1;
    u32 proto = ctx->eth_protocol;
    struct bpf_sock *moving = ctx->migrating_sk;

    // A connection moving off a closing listener (attached for migration, 5.14+) may come with no
    // packet to read: then the client is the moving socket's remote end.
    if (moving && ctx->len == 0) {
        if (moving->family == AF_INET) {
            m0 = 0;
            m1 = ((u64)(moving->dst_ip4 & (u32)MASK4) << 32) | V4_MAPPED_HIGH;
        } else if (moving->family == AF_INET6) {
            addr[0] = ((u64)moving->dst_ip6[1] << 32) | moving->dst_ip6[0];
            addr[1] = ((u64)moving->dst_ip6[3] << 32) | moving->dst_ip6[2];
            if (addr[0] == 0 && (u32)addr[1] == V4_MAPPED_LOW) {  // ::ffff:a.b.c.d, hashed as IPv4
                m0 = 0;
                m1 = ((u64)(moving->dst_ip6[3] & (u32)MASK4) << 32) | V4_MAPPED_HIGH;
            } else {
                m0 = addr[0] & MASK6_0;
                m1 = addr[1] & MASK6_1;
            }
        } else {
            goto fail;
        }
        goto hash;
    }

    if (proto == htons(ETH_P_IP)) {
        u32 v4 = 0;
        if (bpf_skb_load_bytes_relative(ctx, IPV4_SRC_OFFSET, &v4, 4, BPF_HDR_START_NET))
            goto fail;
        m0 = 0;
        m1 = ((u64)(v4 & (u32)MASK4) << 32) | V4_MAPPED_HIGH;
    } else if (proto == htons(ETH_P_IPV6)) {
        if (bpf_skb_load_bytes_relative(ctx, IPV6_SRC_OFFSET, addr, 16, BPF_HDR_START_NET))
            goto fail;
        m0 = addr[0] & MASK6_0;
        m1 = addr[1] & MASK6_1;
    } else {
        goto fail;
    }

hash:;
    u64 v0 = V0, v1 = V1, v2 = V2, v3 = V3;
    ABSORB(m0);
    ABSORB(m1);
    ABSORB(LENGTH_WORD);
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    u32 bucket = (v0 ^ v1 ^ v2 ^ v3) & (BUCKETS - 1);

    u32 zero = 0;
    u32 *live = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, LIVE_FD), &zero);
    if (!live)
        goto fail;
    u16 *table = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, TABLE_FD), live);
    if (!table)
        goto fail;
    u32 key = table[bucket];
    if (bpf_sk_select_reuseport(ctx, (void *)bpf_pseudo_fd(1, SOCKS_FD), &key, 0))
        goto fail;
    count(key);
    return SK_PASS_;
fail:
    count(MAX_SLOTS);
    return SK_PASS_;
}
