// SPDX-License-Identifier: GPL-2.0-or-later
//
// XDP fast path for the relay's UDP allocations (links over QUIC).
//
// An allocation pairs peer X (talking to relay port A) with peer Y (talking to relay port B).
// relayd fills np_flows when the pair is complete, one entry per direction:
//   {X addr, relay addr, X port, A}  ->  {relay addr, Y addr, B, Y port}
// and this program rewrites each matching packet to leave port B toward Y (and back), fixing
// the IPv4 and UDP checksums incrementally (RFC 1624), then transmits it on the interface the
// kernel's FIB picks. Everything else (other traffic, IP options, fragments, relay hellos,
// packets whose route is unknown) goes up the stack unchanged, where relayd's userspace
// forwarder handles it. All addresses and ports in the maps are in network byte order.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

struct flow_key {
    __u32 saddr;
    __u32 daddr;
    __u16 sport;
    __u16 dport;
};

struct flow_val {
    __u32 saddr;
    __u32 daddr;
    __u16 sport;
    __u16 dport;
    __u32 pad;
    __u64 packets;
    __u64 bytes;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct flow_key);
    __type(value, struct flow_val);
} np_flows SEC(".maps");

// Counters, per CPU: what the program did with the packets of known flows.
enum {
    ST_FORWARDED = 0,   // rewritten and sent by XDP
    ST_PASS_HELLO = 1,  // a relay hello: relayd answers it
    ST_PASS_FIB = 2,    // no route or neighbour yet: the stack forwards it
    ST_PASS_TTL = 3,    // TTL would expire
    ST_MAX = 4,
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, ST_MAX);
    __type(key, __u32);
    __type(value, __u64);
} np_stats SEC(".maps");

// The relay hello's magic (see netport-proto relay.rs) and length.
#define HELLO_LEN 36

static __always_inline void count(__u32 what)
{
    __u64 *c = bpf_map_lookup_elem(&np_stats, &what);
    if (c)
        *c += 1;
}

static __always_inline __u16 fold(__u32 c)
{
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    return (__u16)c;
}

// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
static __always_inline void replace2(__u16 *sum, __u16 old, __u16 new)
{
    __u32 c = (__u16)~*sum;
    c += (__u16)~old;
    c += new;
    *sum = ~fold(c);
}

static __always_inline void replace4(__u16 *sum, __u32 old, __u32 new)
{
    replace2(sum, (__u16)(old & 0xffff), (__u16)(new & 0xffff));
    replace2(sum, (__u16)(old >> 16), (__u16)(new >> 16));
}

SEC("xdp")
int np_udp_relay(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    // Fragments (MF set or an offset) go to the stack, which reassembles them.
    if (ip->frag_off & bpf_htons(0x3fff))
        return XDP_PASS;
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end)
        return XDP_PASS;

    struct flow_key key = {
        .saddr = ip->saddr,
        .daddr = ip->daddr,
        .sport = udp->source,
        .dport = udp->dest,
    };
    struct flow_val *v = bpf_map_lookup_elem(&np_flows, &key);
    if (!v)
        return XDP_PASS;

    __u16 udp_len = bpf_ntohs(udp->len);
    if (udp_len == sizeof(*udp) + HELLO_LEN) {
        unsigned char *p = (void *)(udp + 1);
        if ((void *)(p + 4) <= end && p[0] == 'N' && p[1] == 'P' && p[2] == 'R' && p[3] == '1') {
            count(ST_PASS_HELLO);
            return XDP_PASS;
        }
    }
    if (ip->ttl <= 1) {
        count(ST_PASS_TTL);
        return XDP_PASS;
    }

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = IPPROTO_UDP;
    fib.tot_len = bpf_ntohs(ip->tot_len);
    fib.ipv4_src = v->saddr;
    fib.ipv4_dst = v->daddr;
    fib.ifindex = ctx->ingress_ifindex;
    if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS) {
        count(ST_PASS_FIB);
        return XDP_PASS;
    }

    // IPv4 header: addresses and TTL.
    replace4(&ip->check, ip->saddr, v->saddr);
    replace4(&ip->check, ip->daddr, v->daddr);
    __u16 old_ttl = *(__u16 *)&ip->ttl; // TTL and protocol share a 16-bit word
    ip->ttl -= 1;
    replace2(&ip->check, old_ttl, *(__u16 *)&ip->ttl);

    // UDP: the pseudo-header addresses and the ports. A checksum of 0 means "none" and
    // stays 0; a computed 0 is sent as 0xffff.
    if (udp->check) {
        replace4(&udp->check, ip->saddr, v->saddr);
        replace4(&udp->check, ip->daddr, v->daddr);
        replace2(&udp->check, udp->source, v->sport);
        replace2(&udp->check, udp->dest, v->dport);
        if (!udp->check)
            udp->check = 0xffff;
    }
    ip->saddr = v->saddr;
    ip->daddr = v->daddr;
    udp->source = v->sport;
    udp->dest = v->dport;

    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->bytes, udp_len - sizeof(*udp));
    count(ST_FORWARDED);
    if (fib.ifindex == ctx->ingress_ifindex)
        return XDP_TX;
    return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "GPL";
