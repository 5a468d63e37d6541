/* safedeploy: DNS over TCP as a stream (bcc dialect) — the per-connection state shared by
 * the sock_ops and sk_msg programs of dns_stream.c (what the process writes) and the
 * cgroup_skb ingress programs of dns_rx.h (what the resolver answers).
 *
 * A policed process's TCP connection to port 53 is marked at connect (sd_socks, socket
 * local storage: the cgroup whose policy judges it). Once established it is put into the
 * dns_socks sockhash, whose sk_msg program judges every message the process writes; and
 * from then on the ingress program follows the resolver's byte stream (rx_*: where the next
 * segment starts, where the current answer message stands), so that every answer message
 * is read whole however it is cut into segments. No program sits on the socket's receive
 * path: the kernel's receive side of sockmaps (sk_skb) can fail a blocking read with EAGAIN
 * while a segment waits for its parser, which glibc takes for a failed lookup.
 */
#ifndef SD_DNS_STREAM_H
#define SD_DNS_STREAM_H

struct sd_sock {
    __u64 cgid;         /* the policed cgroup of the process that connected */
    __u32 streamed;     /* 1: writes go through sd_stream_msg (in dns_socks, and it saw one) */
    /* the answer stream, followed by the ingress program (dns_rx.h) */
    __u32 rx_on;        /* 1: established; rx_next is set */
    __u32 rx_next;      /* sequence number of the next byte to follow */
    __u32 rx_have;      /* bytes of the current message seen so far (its 2-byte length excluded) */
    __u16 rx_mlen;      /* the current message's length, once rx_pfx == 2 */
    __u8 rx_pfx;        /* bytes of the current message's length prefix seen (0..2) */
    __u8 rx_pfx0;       /* its first byte */
    __u8 rx_cut;        /* the current message is not kept (longer than SD_MSGBUF, no room) */
    __u8 rx_lost;       /* the stream can no longer be followed: nothing more is learned from it */
    __u8 tx_seen;       /* tx_lo is set: sd_stream_msg ran on this connection */
    __u8 pad[5];
    /* what the process wrote, as sequence numbers (sd_stream_msg, with the kernel's
     * tcp_sock.write_seq): [tx_lo, tx_hi) went through the sk_msg program and was judged
     * there. Egress judges any other byte per packet (bytes queued by a write that began
     * before the connection entered the sockhash; bytes the kernel let through on a verdict
     * left over from an interrupted write). */
    __u32 tx_lo;
    __u32 tx_hi;
    __u32 tx_msg;       /* where the last judged message starts (tx_hi - its length) */
};
BPF_SK_STORAGE(sd_socks, struct sd_sock);

/* A connection starts with nothing followed, nothing held and nothing streamed. */
static __always_inline void sd_sock_reset(struct sd_sock *ss, __u64 cgid)
{
    __builtin_memset(ss, 0, sizeof(*ss));
    ss->cgid = cgid;
}

#ifdef SD_OFF_TCP_WRITE_SEQ
#define SD_TX_ACCOUNTED 1
#else
#define SD_TX_ACCOUNTED 0 /* no kernel BTF: the streamed mark alone (see docs/policy.md) */
#endif

/* The bytes the sk_msg program judged and let through, by sequence number: the byte of
 * sequence s is at b[s % SD_TXRING] while s is among the last SD_TXRING - 1 judged bytes.
 * The program lets a message through only while every byte not yet acknowledged fits
 * (write_seq + the message - snd_una < SD_TXRING), so every byte TCP may still (re)send is
 * here. Egress compares a segment it would let through unjudged with these bytes: after
 * a push the kernel failed (an interrupted write that sent none of its judged message), the
 * kernel lets the next write's bytes through on the old verdict, without the program, in
 * the very sequence range that was judged; they differ from what was judged, so egress
 * judges them per packet. Twice SD_TXRING: a masked offset plus a masked length fit. */
#define SD_TXRING 4096
struct sd_txring {
    __u8 b[2 * SD_TXRING];
};
BPF_SK_STORAGE(sd_txring, struct sd_txring);
_Static_assert(sizeof(struct sd_txring) == 2 * SD_TXRING, "a masked offset plus a masked length must fit");
_Static_assert((SD_TXRING & (SD_TXRING - 1)) == 0, "SD_TXRING is a power of two (masks)");

/* an answer message that arrived in pieces, put together until its last byte is in; twice
 * SD_MSGBUF so that the verifier can see a masked offset plus a masked length fit. Created
 * only for a message that spans segments. */
struct sd_asm {
    __u8 b[2 * SD_MSGBUF];
};
BPF_SK_STORAGE(sd_asm, struct sd_asm);
_Static_assert(sizeof(struct sd_asm) == 2 * SD_MSGBUF, "a masked offset plus a masked length must fit");

/* the sockets whose DNS messages are judged by the stream programs, by socket cookie */
BPF_SOCKHASH(dns_socks, __u64, 65536);

/* per-CPU scratch of the sk_msg program (process context: not shared with the packet
 * programs' slots, which may interrupt it) */
#define SD_SCRATCH_MSG 0
BPF_PERCPU_ARRAY(stream_scratch, struct sd_scratch, 1);

/* What egress does with the bytes [seq, seq + len) of a TCP segment to a DNS port:
 * SD_STREAM_PARSE: judge them per packet (one whole message: bytes written before the
 *   connection entered the sockhash, or a connection the stream programs do not follow);
 * SD_STREAM_OWNED: they lie in what the sk_msg program judged, if they are the bytes it kept
 *   (sd_stream_same, the caller's check): let them through as they are;
 * SD_STREAM_UNJUDGED: bytes of a judged stream that the program never saw (the kernel let
 *   them through on a verdict left over from a failed push) and that do not start where the
 *   resolver reads a new message: a message parsed from their start would not be the one
 *   the resolver reads (a push that sent part of a message desynchronises the two), so they
 *   are refused whatever they hold. */
#define SD_STREAM_PARSE 0
#define SD_STREAM_OWNED 1
#define SD_STREAM_UNJUDGED 2
static __always_inline int sd_stream_class(struct bpf_sock *sk, __u32 seq, __u32 len, int may_own)
{
    struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, 0);
    if (!ss || !ss->streamed)
        return SD_STREAM_PARSE;
    if (!SD_TX_ACCOUNTED)
        return SD_STREAM_OWNED;
    if (!ss->tx_seen || (__s32)(seq + len - ss->tx_lo) <= 0)
        return SD_STREAM_PARSE; /* all before the program's first message */
    if (may_own && (__s32)(seq - ss->tx_lo) >= 0 && (__s32)(seq + len - ss->tx_hi) <= 0 &&
        (__s32)(ss->tx_hi - seq) < SD_TXRING)
        return SD_STREAM_OWNED; /* inside what was judged, as far back as the kept bytes reach */
    /* exactly the span of the last judged message, whose push sent none of it: the resolver
     * reads a new message there and the next one where the program does, so one whole message
     * parsed from there is what it reads. Any other span would move the resolver's next
     * message start inside what was judged (found by an attacker: a shorter allowed message
     * there, then the judged message's own trailing bytes, which hid a denied query). */
    return seq == ss->tx_msg && seq + len == ss->tx_hi ? SD_STREAM_PARSE : SD_STREAM_UNJUDGED;
}

/* Are the len bytes of this segment's payload (at offset pay, sequence seq) the bytes the
 * sk_msg program judged for those sequence numbers (sd_txring)? len < SD_TXRING (the caller
 * got SD_STREAM_OWNED from sd_stream_class). SD_CMP_CHUNK bytes per step, one branch each
 * (the verifier follows at most 8192 jumps on a path), then the last bytes one by one. */
#define SD_CMP_CHUNK 16
static __always_inline int sd_stream_same(struct __sk_buff *skb, struct bpf_sock *sk, __u32 pay, __u32 seq, __u32 len)
{
    struct sd_txring *r = sd_txring.sk_storage_get(sk, 0, 0);
    if (!r)
        return 0;
    __u8 buf[SD_CMP_CHUNK];
    __u32 i = 0;
    for (int k = 0; k < SD_TXRING / SD_CMP_CHUNK; k++) {
        if (i + SD_CMP_CHUNK > len)
            break;
        if (bpf_skb_load_bytes(skb, pay + i, buf, SD_CMP_CHUNK) < 0)
            return 0;
        __u8 diff = 0;
#pragma unroll
        for (int j = 0; j < SD_CMP_CHUNK; j++)
            diff |= buf[j] ^ r->b[(seq + i + j) & (SD_TXRING - 1)];
        if (diff)
            return 0;
        i += SD_CMP_CHUNK;
    }
    for (int k = 0; k < SD_CMP_CHUNK; k++) {
        if (i >= len)
            return 1;
        if (bpf_skb_load_bytes(skb, pay + i, buf, 1) < 0)
            return 0;
        if (buf[0] != r->b[(seq + i) & (SD_TXRING - 1)])
            return 0;
        i++;
    }
    return i >= len;
}

#endif /* SD_DNS_STREAM_H */
