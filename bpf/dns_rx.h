/* safedeploy: the answers of a policed DNS-over-TCP connection, followed as a byte stream by
 * the cgroup_skb ingress program (bcc dialect; included by dns_skb.c).
 *
 * TCP answers are length-prefixed messages (RFC 1035 4.2.2) cut into segments anywhere.
 * Per connection (sd_sock, dns_stream.h) the ingress program keeps the sequence number of
 * the next byte it follows and where the current message stands: its length prefix, the
 * bytes seen of it. A segment is followed from that byte on:
 *   - a segment ahead of what TCP has received (out of order) is dropped: TCP sends it
 *     again, in order (DNS connections only);
 *   - bytes already followed (a retransmission) are skipped;
 *   - bytes that went by unseen make the connection lost: it teaches nothing more.
 * A message wholly inside the segment is copied into msgbuf; one in pieces is put together
 * in sd_asm. Each whole message is then walked like a datagram's (sd_dns_begin, the record
 * walker, sd_dns_learn), and sd_dns_rx goes on with the rest of the segment. The kernel
 * allows 33 tail calls per packet: a message that cannot be walked within them is counted
 * as cut (not learned: fail closed) and the framing goes on.
 */
#ifndef SD_DNS_RX_H
#define SD_DNS_RX_H

#define SD_RX_STEPS 16          /* messages (or message pieces) framed per run of sd_dns_rx */
#define SD_RX_WALK_CALLS 5      /* tail calls a message needs: begin, walker, learn, store, back to sd_dns_rx */

/* The full socket of an ingress TCP packet, NULL for anything else. */
static __always_inline struct bpf_sock *sd_rx_sk(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 0;
    sk = bpf_sk_fullsock(sk);
    if (!sk || sk->protocol != IPPROTO_TCP)
        return 0;
    return sk;
}

static __always_inline void sd_rx_lose(struct sd_sock *ss)
{
    if (!ss->rx_lost) {
        ss->rx_lost = 1;
        sd_stat(SD_STAT_STREAM_LOST);
    }
}

/* One ingress segment of a followed connection: sequence it, then frame its bytes
 * (sd_dns_rx). Returns the ingress verdict (0 drops the segment). */
static __always_inline int sd_rx_segment(struct __sk_buff *skb, struct bpf_sock *sk, struct sd_sock *ss,
                                         struct sd_pkt *p, __u32 pay)
{
    if (ss->rx_lost)
        return 1;
    if (p->d.proto != IPPROTO_TCP)
        return 1;
    __u8 sq[4];
    if (bpf_skb_load_bytes(skb, p->l4 + 4, sq, sizeof(sq)) < 0)
        return 1;
    __u32 seq = ((__u32)sq[0] << 24) | ((__u32)sq[1] << 16) | ((__u32)sq[2] << 8) | sq[3];
    __u32 len = skb->len;
    struct bpf_tcp_sock *tp = bpf_tcp_sock(sk);
    if (tp && (__s32)(seq - tp->rcv_nxt) > 0) {
        sd_stat(SD_STAT_STREAM_REORDERED);
        return 0;
    }
    __u32 at = ss->rx_next;
    if ((__s32)(seq - at) > 0) {
        sd_rx_lose(ss); /* TCP took bytes this program never saw */
        return 1;
    }
    __u32 n = len - pay;
    if ((__s32)(seq + n - at) <= 0)
        return 1; /* followed already */
    ss->rx_next = seq + n;
    __u64 cgid = ss->cgid;
    __u32 slot = SD_SCRATCH_INGRESS;
    struct sd_scratch *s = scratch.lookup(&slot);
    struct sd_cgroup *pol = sd_cgroup_of(cgid);
    if (!s || !pol)
        return 1; /* the policy was released */
    s->seg_pos = pay + (at - seq);
    s->seg_end = len;
    s->tc = 0;
    s->rx_cuts = 0;
    s->rx = 1;
    s->cgid = cgid;
    s->tables = pol->tables;
    s->family = p->d.family;
    s->proto = IPPROTO_TCP;
    __builtin_memcpy(s->resolver, p->d.addr, sizeof(s->resolver));
    sd_tail(skb, s, SD_TAIL_RX);
    sd_rx_lose(ss); /* sd_dns_rx is missing */
    return 1;
}

/* After a message of the stream: frame the rest of the segment. */
static __always_inline int sd_rx_next(struct __sk_buff *skb, struct sd_scratch *s)
{
    if (!s->rx)
        return 1;
    if (s->tc < SD_TAIL_BUDGET)
        sd_tail(skb, s, SD_TAIL_RX);
    struct bpf_sock *sk = sd_rx_sk(skb);
    struct sd_sock *ss = sk ? sd_socks.sk_storage_get(sk, 0, 0) : 0;
    if (ss)
        sd_rx_lose(ss); /* the rest of the segment goes by unframed */
    return 1;
}

/* A whole message is in msgbuf: walk it if the budget allows (else it is cut). */
static __always_inline void sd_rx_walk(struct __sk_buff *skb, struct sd_scratch *s)
{
    if (s->tc + SD_RX_WALK_CALLS > SD_TAIL_BUDGET) {
        s->rx_cuts = 1; /* more messages in this segment than the budget walks */
        return;
    }
    sd_tail(skb, s, SD_TAIL_BEGIN);
}

/* Frame the segment's bytes from s->seg_pos: length prefixes, messages. */
int sd_dns_rx(struct __sk_buff *skb)
{
    struct sd_msgbuf *mb;
    struct sd_scratch *s = sd_walk_state(&mb);
    struct bpf_sock *sk = sd_rx_sk(skb);
    if (!s || !mb || !sk)
        return 1;
    struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, 0);
    if (!ss)
        return 1;
    for (int i = 0; i < SD_RX_STEPS; i++) {
        __u32 pos = s->seg_pos;
        __u32 end = s->seg_end;
        if (pos >= end)
            break;
        if (ss->rx_pfx < 2) {
            __u8 c[2] = {};
            if (ss->rx_pfx == 0 && pos + 2 <= end) {
                if (bpf_skb_load_bytes(skb, pos, c, 2) < 0)
                    break;
                pos += 2;
            } else {
                if (bpf_skb_load_bytes(skb, pos, &c[1], 1) < 0)
                    break;
                pos += 1;
                if (ss->rx_pfx == 0) {
                    ss->rx_pfx0 = c[1];
                    ss->rx_pfx = 1;
                    s->seg_pos = pos;
                    continue;
                }
                c[0] = ss->rx_pfx0;
            }
            ss->rx_mlen = ((__u16)c[0] << 8) | c[1];
            ss->rx_pfx = 2;
            ss->rx_have = 0;
            ss->rx_cut = 0;
            s->seg_pos = pos;
        }
        __u32 mlen = ss->rx_mlen;
        __u32 have = ss->rx_have;
        __u32 avail = end > pos ? end - pos : 0;
        __u32 take = mlen - have;
        if (take > avail)
            take = avail;
        if (have == 0 && take == mlen) {
            /* the whole message is in this segment */
            s->seg_pos = pos + mlen;
            ss->rx_pfx = 0;
            if (mlen && sd_mb_fill(skb, mb, pos, mlen))
                sd_rx_walk(skb, s);
            continue;
        }
        /* a message in pieces: keep what fits of it */
        struct sd_asm *as = sd_asm.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (!as)
            ss->rx_cut = 1;
        __u32 keep = have < SD_MSGBUF ? SD_MSGBUF - have : 0;
        if (keep > take)
            keep = take;
        if (as && !ss->rx_cut && keep) {
            __u32 o = have & (SD_MSGBUF - 1);
            __u32 k = keep - 1;
            asm volatile("%0 &= %1" : "+r"(k) : "i"(SD_MSGBUF - 1));
            k += 1;
            if (bpf_skb_load_bytes(skb, pos, &as->b[o], k) < 0)
                ss->rx_cut = 1;
        }
        s->seg_pos = pos + take;
        ss->rx_have = have + take;
        if (have + take < mlen)
            continue; /* the rest comes in later segments */
        ss->rx_pfx = 0;
        if (ss->rx_cut || !as) {
            s->rx_cuts = 1; /* recorded once, below or by the next sd_dns_begin */
            continue;
        }
        __u32 n = mlen > SD_MSGBUF ? SD_MSGBUF : mlen;
        n -= 1;
        asm volatile("%0 &= %1" : "+r"(n) : "i"(SD_MSGBUF - 1));
        n += 1;
        if (bpf_probe_read_kernel(mb->b, n, as->b) < 0)
            continue;
        mb->len = n;
        mb->trunc = mlen > SD_MSGBUF;
        sd_rx_walk(skb, s);
    }
    if (s->rx_cuts) {
        s->rx_cuts = 0;
        sd_record_cut(s, 0);
    }
    if (s->seg_pos < s->seg_end && s->tc < SD_TAIL_BUDGET)
        sd_tail(skb, s, SD_TAIL_RX); /* more to frame: another run */
    if (s->seg_pos < s->seg_end)
        sd_rx_lose(ss);
    return 1;
}

#endif /* SD_DNS_RX_H */
