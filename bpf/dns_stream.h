/* safedeploy: DNS over TCP as a stream (bcc dialect) — the maps shared by the stream
 * programs of dns_stream.c and the one question the packet programs ask them.
 *
 * A policed process's TCP connection to port 53 is marked at connect (sd_socks, socket
 * local storage: the cgroup whose policy judges it) and, once established, put into the
 * dns_socks sockhash: the sk_msg program judges every message the process writes, the
 * sk_skb stream parser and verdict read every answer message. sd_streams keeps, per
 * socket (by cookie), where the next answer message starts (the stream parser does not
 * tell a program the offset of a message inside its skb, see dns_stream.c).
 */
#ifndef SD_DNS_STREAM_H
#define SD_DNS_STREAM_H

struct sd_sock {
    __u64 cgid;         /* the policed cgroup of the process that connected */
    __u32 streamed;     /* 1: writes go through sd_stream_msg (in dns_socks, and it saw one) */
    __u32 pad;
};
BPF_SK_STORAGE(sd_socks, struct sd_sock);

/* the sockets whose DNS messages are judged by the stream programs, by socket cookie */
BPF_SOCKHASH(dns_socks, __u64, 65536);

/* answer-side parsing state, by socket cookie; deleted when the socket closes */
struct sd_stream {
    __u64 cgid;
    __u32 off;          /* offset in the current skb of the message being parsed */
    __u32 mlen;         /* its length, the 2-byte prefix included */
    __u32 tail;         /* bytes after the last whole message in its skb: the next one */
    __u32 hold;         /* 1: the parser asked for more bytes, off stays */
};
BPF_F_TABLE("hash", __u64, struct sd_stream, sd_streams, 65536, BPF_F_NO_PREALLOC);

/* per-CPU scratch of the stream programs: sk_msg runs in process context and may be
 * interrupted by the sk_skb verdict (softirq), so each has its own slot */
#define SD_SCRATCH_MSG 0
#define SD_SCRATCH_STRM 1
BPF_PERCPU_ARRAY(stream_scratch, struct sd_scratch, 2);

/* Is this TCP packet's socket judged by the stream programs? Then the per-packet DNS
 * parsers of dns_skb.c leave it alone (a segment need not start at a message). */
static __always_inline int sd_stream_owns(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 0;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return 0;
    struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, 0);
    return ss && ss->streamed;
}

#endif /* SD_DNS_STREAM_H */
