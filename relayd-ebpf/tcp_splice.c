// SPDX-License-Identifier: GPL-2.0-or-later
//
// sockmap fast path for the relay's TCP allocations (tcp_fast_path = "sockmap").
//
// When an allocation pairs connection A with connection B, relayd inserts
//   np_socks[cookie(A)] = B   and   np_socks[cookie(B)] = A
// (cookie = SO_COOKIE). Inserting a socket into the map attaches this stream verdict program
// to it, so every segment that arrives on A is handed to B's send side by the kernel, without
// a copy through relayd. np_bytes[cookie] counts what each socket had redirected, which is
// how relayd accounts bytes per allocation and knows when it may propagate a FIN (the kernel
// does not: relayd watches for end of stream and shuts the peer down itself).
//
// A segment whose socket has no peer entry (an allocation being torn down) is passed to the
// socket's receive queue, where relayd reads and forwards it, instead of being dropped.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, __u32);
} np_socks SEC(".maps");

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
    if (bpf_sk_redirect_hash(skb, &np_socks, &cookie, 0) != SK_PASS)
        return SK_PASS;
    __u64 *bytes = bpf_map_lookup_elem(&np_bytes, &cookie);
    if (bytes)
        __sync_fetch_and_add(bytes, len);
    return SK_PASS;
}

char _license[] SEC("license") = "GPL";
