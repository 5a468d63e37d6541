/* safedeploy: DNS over TCP judged as a stream of length-prefixed messages (RFC 1035 4.2.2).
 *
 * sd_stream_sockops (cgroup sock_ops, attached per policed cgroup like the other programs):
 *   at connect() to port 53 by a policed process, remember the cgroup in the socket's
 *   storage and open its answer-parsing state; once established, put the socket into
 *   the dns_socks sockhash. Nothing else: other TCP sockets never enter the sockhash.
 * sd_stream_msg (sk_msg verdict on dns_socks): runs on what the process writes, before it
 *   reaches TCP. It sees one whole message at a time: while the 2-byte length or the
 *   message is incomplete the bytes are corked (held, the write succeeds) until later
 *   writes complete it; a judged message is let through alone (apply_bytes) and the
 *   program runs again on what follows. A denied query fails the write with EACCES and
 *   nothing of it reaches the resolver (and, by the kernel's sk_msg semantics, every later
 *   write on that connection fails too: the client closes it).
 * sd_stream_parse / sd_stream_answers (sk_skb stream parser and verdict on dns_socks): the
 *   kernel's strparser hands every answer message whole to the verdict, which learns its
 *   addresses by the packet ingress program's rules (sd_stream_learn). Answers always pass.
 */
#include "safedeploy.h"
#include "dns.h"
#include "dns_stream.h"

#define SD_TCP_CLOSE 7          /* BPF_TCP_CLOSE */
#define SD_AF_INET6 10

/* The peer (the resolver) of an sk_msg or sk_skb context into d, IPv4 as ::ffff:a.b.c.d.
 * A macro: the fields are read straight from the context (the verifier refuses loads
 * through a pointer into it, so the compiler must not merge the two branches' loads). */
#define SD_SOCK_PEER(ctx, d)                                        \
    do {                                                            \
        if ((ctx)->family == SD_AF_INET6) {                         \
            (d)->addr[0] = (ctx)->remote_ip6[0];                    \
            (d)->addr[1] = (ctx)->remote_ip6[1];                    \
            (d)->addr[2] = (ctx)->remote_ip6[2];                    \
            __u32 a3_ = (ctx)->remote_ip6[3];                       \
            asm volatile("" : "+r"(a3_)); /* no load merged */      \
            (d)->addr[3] = a3_;                                     \
            (d)->family = sd_is_v4mapped((d)->addr) ? 4 : 6;        \
        } else {                                                    \
            (d)->addr[2] = bpf_htonl(0xffff);                       \
            __u32 a4_ = (ctx)->remote_ip4;                          \
            asm volatile("" : "+r"(a4_));                           \
            (d)->addr[3] = a4_;                                     \
            (d)->family = 4;                                        \
        }                                                           \
        (d)->proto = IPPROTO_TCP;                                   \
        (d)->port = SD_DNS_PORT;                                    \
    } while (0)

int sd_stream_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* in connect(): the current task is the policed process */
        if (bpf_ntohl(skops->remote_port) != SD_DNS_PORT)
            return 1;
        __u64 cgid = 0;
        struct sd_cgroup *pol = SD_FIND_POLICY(sd_current_ancestor_cgroup_id, &cgid);
        struct bpf_sock *sk = skops->sk;
        if (!pol || !sk)
            return 1;
        struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
        if (!ss)
            return 1; /* not streamed: the per-packet parsers judge it */
        ss->cgid = cgid;
        __u64 ck = bpf_get_socket_cookie(skops);
        struct sd_stream st = {};
        st.cgid = cgid;
        sd_streams.update(&ck, &st);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        struct bpf_sock *sk = skops->sk;
        if (!sk)
            return 1;
        struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, 0);
        if (!ss)
            return 1;
        /* not streamed yet: a write that began before this (TCP Fast Open, a send blocked
         * on the handshake) still leaves through plain TCP, and the per-packet parser must
         * judge it. sd_stream_msg marks the socket when it sees its first write. */
        __u64 ck = bpf_get_socket_cookie(skops);
        if (!sd_streams.lookup(&ck))
            return 1; /* no answer-parsing state (sd_streams full): left to the packet parsers */
        dns_socks.sock_hash_update(skops, &ck, BPF_NOEXIST);
        return 1;
    }
    if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == SD_TCP_CLOSE) {
        __u64 ck = bpf_get_socket_cookie(skops);
        sd_streams.delete(&ck);
    }
    return 1;
}

/* Parse the question name of the query whose DNS header is at offset 2 of msg (len bytes
 * of message) and judge it into s. Returns the name's wire length, 0 when unparseable. */
static __always_inline __u32 sd_msg_qname(struct sk_msg_md *msg, __u64 cgid, __u32 len, struct sd_scratch *s)
{
    __u32 n = len > 12 + SD_NAME_BUF ? 12 + SD_NAME_BUF : len;
    if (bpf_msg_pull_data(msg, 2, 2 + n, 0))
        return 0;
    __u8 *data = msg->data;
    __u8 *end = msg->data_end;
    sd_name_start(s, 0);
    for (int i = 0; i < SD_NAME_BUF; i++) {
        __u32 pos = s->pos;
        __u8 *p = data + 12 + (pos & 0xff);
        if ((void *)(p + 1) > (void *)end)
            break;
        int r = sd_name_byte(s, *p);
        s->pos = pos + 1;
        if (r) {
            s->done = r > 0;
            break;
        }
    }
    return sd_name_end(cgid, s) ? s->pos : 0;
}

int sd_stream_msg(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, 0);
    if (!ss)
        return SK_PASS;
    ss->streamed = 1; /* from now on this program sees what is written: skip the per-packet parsers */
    __u64 cgid = ss->cgid;
    struct sd_cgroup *pol = sd_cgroup_of(cgid);
    if (!pol)
        return SK_PASS; /* the policy was released */
    __u32 size = msg->size;
    bpf_msg_apply_bytes(msg, 0); /* 0: the verdict covers all that is left */
    bpf_msg_cork_bytes(msg, 0);
    /* An incomplete message is held until `need` bytes are there (cork): the verdict is
     * then ignored and the program runs again on the whole. If the kernel cannot hold
     * more (its scatterlist is full) it does not cork and the verdict applies: DROP. */
    if (size < 2) {
        bpf_msg_cork_bytes(msg, 2);
        return SK_DROP;
    }
    if (bpf_msg_pull_data(msg, 0, 2, 0))
        return SK_DROP;
    __u8 *p = msg->data;
    if ((void *)(p + 2) > (void *)msg->data_end)
        return SK_DROP;
    __u32 len = ((__u32)p[0] << 8) | p[1];
    __u32 need = 2 + len;
    if (size < need) {
        bpf_msg_cork_bytes(msg, need);
        return SK_DROP;
    }
    __u32 slot = SD_SCRATCH_MSG;
    struct sd_scratch *s = stream_scratch.lookup(&slot);
    if (!s)
        return SK_DROP;
    struct sd_dest d = {};
    SD_SOCK_PEER(msg, &d);

    __u8 hdr[12] = {};
    int have_hdr = 0;
    if (len >= 12 && bpf_msg_pull_data(msg, 2, 14, 0) == 0) {
        __u8 *h = msg->data;
        if ((void *)(h + 12) <= (void *)msg->data_end) {
            __builtin_memcpy(hdr, h, 12);
            have_hdr = 1;
        }
    }
    /* anything written to port 53 is judged as a query, as over UDP: the QR bit set, another
     * opcode or not exactly one question make it unparseable */
    __u32 wire = 0;
    if (have_hdr && !(hdr[2] & 0x80) && ((hdr[2] >> 3) & 0x0f) == 0 && hdr[4] == 0 && hdr[5] == 1)
        wire = sd_msg_qname(msg, cgid, len, s);

    __u8 verdict;
    __u16 rule;
    __u32 name_id = 0;
    if (!wire) {
        /* unparseable: never a silent allow when the policy denies any name */
        sd_stat(SD_STAT_DNS_MALFORMED);
        verdict = (pol->dflt == SD_DENY || pol->name_denies) ? SD_DENY : SD_ALLOW;
        rule = SD_RULE_MALFORMED;
    } else {
        verdict = sd_query_verdict(pol, s, &rule); /* as over UDP (dns_skb.c) */
        name_id = sd_name_id(cgid, s);
    }
    struct sd_why why = {};
    why.rule = rule;
    why.name_id = name_id;
    if (!sd_verdict_return(cgid, pol, &d, verdict, &why, SD_KIND_DNS))
        return SK_DROP; /* apply_bytes 0: the rest of this write goes with it (EACCES) */
    if (name_id)
        sd_pending_put(cgid, d.addr, ((__u16)hdr[0] << 8) | hdr[1], name_id);
    bpf_msg_apply_bytes(msg, need);
    return SK_PASS;
}

/* The stream parser: the length of the message starting in this skb. The kernel gives the
 * program the skb the message starts in (or, while the length is incomplete, that skb with
 * the next ones appended) but not the message's offset inside it: sd_streams tracks it —
 * the bytes after the last whole message (tail) are where the next one starts. */
int sd_stream_parse(struct __sk_buff *skb)
{
    __u64 ck = bpf_get_socket_cookie(skb);
    struct sd_stream *st = sd_streams.lookup(&ck);
    __u32 len = skb->len;
    if (!st)
        return len; /* cannot happen (sockops checks): hand the bytes on as they came */
    __u32 off = 0;
    if (st->hold)
        off = st->off;
    else if (st->tail && st->tail <= len)
        off = len - st->tail;
    st->tail = 0;
    st->off = off;
    st->hold = 0;
    if (off + 2 > len) {
        st->hold = 1;
        return 0; /* more bytes needed */
    }
    __u8 h[2];
    if (bpf_skb_load_bytes(skb, off, h, 2) < 0)
        return -1;
    __u32 mlen = 2 + (((__u32)h[0] << 8) | h[1]);
    st->mlen = mlen;
    return mlen;
}

/* Learn the addresses of the DNS answer whose header is at off of a whole answer message
 * (skb of the stream verdict): the same walk as the packet path (dns_skb.c), in tail calls
 * of sk_skb programs (sd_stream_tails), up to SD_MAX_ANSWERS addresses. Same rules: only the
 * answer to a pending question teaches, a denied CNAME chain end makes every address
 * learned as denied, several other owners teach nothing. */
static __always_inline void sd_stream_learn(struct __sk_buff *skb, __u64 cgid, __u32 off, struct sd_dest *d,
                                            struct sd_scratch *s)
{
    if (sd_answer_begin(skb, cgid, off, d, s))
        sd_stream_tails.call(skb, SD_TAIL_ANSWERS); /* the walker is missing: nothing is learned */
}

/* The answer walker and its end, as sk_skb programs (see sd_walk_answers in dns_skb.c). */
int sd_stream_walk(struct __sk_buff *skb)
{
    __u32 slot = SD_SCRATCH_STRM;
    struct sd_scratch *s = stream_scratch.lookup(&slot);
    return s ? sd_walk_answers(skb, s, 1) : SK_PASS;
}

int sd_stream_finish(struct __sk_buff *skb)
{
    __u32 slot = SD_SCRATCH_STRM;
    struct sd_scratch *s = stream_scratch.lookup(&slot);
    if (s)
        sd_learn_answer(skb, s);
    return SK_PASS;
}

int sd_stream_answers(struct __sk_buff *skb)
{
    __u64 ck = bpf_get_socket_cookie(skb);
    struct sd_stream *st = sd_streams.lookup(&ck);
    if (!st)
        return SK_PASS;
    __u32 off = st->off;
    __u32 end = off + st->mlen;
    st->tail = skb->len > end ? skb->len - end : 0;
    __u64 cgid = st->cgid;
    if (!sd_cgroup_of(cgid))
        return SK_PASS;
    __u32 slot = SD_SCRATCH_STRM;
    struct sd_scratch *s = stream_scratch.lookup(&slot);
    if (!s)
        return SK_PASS;
    struct sd_dest d = {};
    SD_SOCK_PEER(skb, &d);
    sd_stream_learn(skb, cgid, off + 2, &d, s);
    return SK_PASS;
}
