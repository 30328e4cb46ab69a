// SPDX-License-Identifier: GPL-2.0-or-later
//
// sockmap fast path for the relay's TCP allocations (tcp_fast_path = "sockmap").
//
// When an allocation pairs connection A with connection B, relayd fills, in this order:
//   np_bytes[cookie(A)] = np_bytes[cookie(B)] = 0       byte counters
//   np_peer[cookie(A)] = cookie(B), and back            who talks to whom
//   np_peers[cookie(A)] = A, np_peers[cookie(B)] = B     the redirect targets
//   np_socks[cookie(A)] = A, np_socks[cookie(B)] = B     this inserts attach the program
// (cookie = SO_COOKIE). Only np_socks has the stream verdict program attached, so a socket
// is handed to the program only once its peer is already a redirect target: a segment never
// finds its peer missing, and what arrives on a socket before its own attach stays in its
// receive queue, which the kernel hands to the program, in order, with the next segment.
// From then on every segment that arrives on A goes to B's send side inside the kernel,
// without a copy through relayd. np_bytes counts what each socket had redirected: relayd's
// per-allocation accounting, and how it knows when it may propagate a FIN (the kernel does
// not: relayd watches for end of stream and shuts the peer down itself).
//
// A segment whose socket has no peer (an allocation being torn down) is passed to the
// socket's receive side, where relayd reads and forwards it, instead of being dropped.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u32);
} np_socks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u32);
} np_peers SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u64);
} np_peer SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u64);
} np_bytes SEC(".maps");

SEC("sk_skb/stream_verdict")
int np_tcp_splice(struct __sk_buff *skb)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    __u32 len = skb->len;
    // A bare FIN comes as an empty buffer. Redirected, it makes the peer's sender fail
    // (a send of 0 bytes counts as a broken pipe) and the peer socket then errs with EPIPE.
    // TCP has already taken the FIN into account: the empty buffer carries nothing to keep.
    if (len == 0)
        return SK_DROP;
    __u64 *peer = bpf_map_lookup_elem(&np_peer, &cookie);
    if (!peer)
        return SK_PASS;
    __u64 target = *peer;
    if (bpf_sk_redirect_hash(skb, &np_peers, &target, 0) != SK_PASS)
        return SK_PASS;
    __u64 *bytes = bpf_map_lookup_elem(&np_bytes, &cookie);
    if (bytes)
        __sync_fetch_and_add(bytes, len);
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
