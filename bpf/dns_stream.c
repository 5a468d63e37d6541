/* safedeploy: DNS over TCP judged as a stream of length-prefixed messages (RFC 1035 4.2.2).
 *
 * sd_stream_sockops (cgroup sock_ops, attached per policed cgroup like the other programs):
 *   at connect() to port 53 by a policed process, remember the cgroup in the socket's
 *   storage; once established, put the socket into the dns_socks sockhash and start
 *   following the resolver's answers (dns_rx.h: the ingress program reads them as a
 *   stream). Nothing else: other TCP sockets never enter the sockhash.
 * sd_stream_msg (sk_msg verdict on dns_socks): runs on what the process writes, before it
 *   reaches TCP. It sees one whole message at a time: while the 2-byte length or the
 *   message is incomplete the bytes are corked (held, the write succeeds) until later
 *   writes complete it; a judged message is let through alone (apply_bytes) and the
 *   program runs again on what follows. A denied query fails the write with EACCES and
 *   nothing of it reaches the resolver (and, by the kernel's sk_msg semantics, every later
 *   write on that connection fails too: the client closes it).
 */
#include "safedeploy.h"
#include "dns.h"
#include "dns_stream.h"

#define SD_AF_INET6 10

/* The peer (the resolver) of an sk_msg context into d, IPv4 as ::ffff:a.b.c.d.
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
        /* in connect(): the current task is the policed process. Only connections to port 53
         * have state (other sockets pay one compare); a socket that connects to port 53 again
         * (connect(AF_UNSPEC), then connect()) starts from nothing: no framing, held bytes or
         * streamed mark of the old connection carries over into the new stream. A DNS socket
         * that connects elsewhere keeps stale state nobody reads: the ingress program follows
         * only packets from port 53, and the sockhash only takes port-53 connections. */
        if (bpf_ntohl(skops->remote_port) != SD_DNS_PORT)
            return 1;
        struct bpf_sock *sk = skops->sk;
        if (!sk)
            return 1;
        __u64 cgid = 0;
        struct sd_cgroup *pol = SD_CURRENT_POLICY(&cgid);
        struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, pol ? BPF_SK_STORAGE_GET_F_CREATE : 0);
        if (ss)
            sd_sock_reset(ss, pol ? cgid : 0); /* none: not streamed, the per-packet parsers judge it */
        return 1;
    }
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        if (bpf_ntohl(skops->remote_port) != SD_DNS_PORT)
            return 1;
        struct bpf_sock *sk = skops->sk;
        if (!sk)
            return 1;
        struct sd_sock *ss = sd_socks.sk_storage_get(sk, 0, 0);
        if (!ss)
            return 1;
        if (!ss->cgid)
            return 1; /* connected when no policy applied */
        /* the resolver's first byte is the next one TCP expects: follow answers from there,
         * with no message begun */
        sd_sock_reset(ss, ss->cgid);
        ss->rx_next = skops->rcv_nxt;
        ss->rx_on = 1;
        /* not streamed yet: a write that began before this (TCP Fast Open, a send blocked
         * on the handshake) still leaves through plain TCP, and the per-packet parser must
         * judge it. sd_stream_msg marks the socket when it sees its first write. */
        __u64 ck = bpf_get_socket_cookie(skops);
        dns_socks.sock_hash_update(skops, &ck, BPF_NOEXIST);
        return 1;
    }
    return 1;
}

/* Parse the question name of the query whose DNS header is at offset 2 of msg (len bytes
 * of message) and judge it into s. Returns the name's wire length, 0 when unparseable. */
static __always_inline __u32 sd_msg_qname(struct sk_msg_md *msg, __u32 tables, __u32 len, struct sd_scratch *s)
{
    __u32 n = len > 12 + SD_NAME_BUF ? 12 + SD_NAME_BUF : len;
    if (bpf_msg_pull_data(msg, 2, 2 + n, 0))
        return 0;
    __u8 *data = msg->data;
    __u8 *end = msg->data_end;
    sd_name_start(s, 0);
    for (int i = 0; i < SD_NAME_BUF; i++) {
        __u32 pos = s->pos;
        __u8 *p = data + 12 + (pos & SD_NAME_MASK);
        if ((void *)(p + 1) > (void *)end)
            break;
        int r = sd_name_byte(s, *p);
        s->pos = pos + 1;
        if (r) {
            s->done = r > 0;
            break;
        }
    }
    return sd_name_end(tables, s) ? s->pos : 0;
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
    /* where this message starts in the stream: what earlier verdicts let through is in TCP's
     * queue already, what is held (corked) is not */
    __u32 ws = 0, una = 0;
#ifdef SD_OFF_TCP_WRITE_SEQ
    struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
    if (!tp || bpf_probe_read_kernel(&ws, sizeof(ws), (void *)tp + SD_OFF_TCP_WRITE_SEQ) < 0 ||
        bpf_probe_read_kernel(&una, sizeof(una), (void *)tp + SD_OFF_TCP_SND_UNA) < 0)
        return SK_DROP;
    if (!ss->tx_seen) {
        ss->tx_lo = ws; /* anything before this went by unjudged: egress judges it per packet */
        ss->tx_hi = ws;
        ss->tx_seen = 1;
    }
#endif
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
    if (SD_TX_ACCOUNTED && ws != ss->tx_hi) {
        /* bytes this program never saw left since its last verdict: the kernel let a write
         * through on the verdict of a push that sent part of its message (it lets as many
         * bytes through as the whole message had). The resolver reads them as part of the
         * stream, so no message from here on starts where it reads one (found by an attacker:
         * judged as a message, the gap's bytes were compared with ring slots of 4 KB earlier).
         * Egress refuses them (past what was judged); this program refuses the rest. */
        sd_stat(SD_STAT_DNS_MALFORMED);
        struct sd_why gap = {};
        gap.rule = SD_RULE_MALFORMED;
        if (!sd_verdict_return(cgid, pol, &d, SD_DENY, &gap, SD_KIND_DNS))
            return SK_DROP;
        ss->tx_hi = ws; /* audit mode: follow the stream from here */
    }
    if (SD_TX_ACCOUNTED && (need >= SD_TXRING || ws + need - una >= SD_TXRING)) {
        /* egress could not compare all that TCP may still send with what was judged
         * (sd_txring): refused, whatever the policy (a query is a few dozen bytes) */
        sd_stat(SD_STAT_DNS_MALFORMED);
        struct sd_why big = {};
        big.rule = SD_RULE_MALFORMED;
        if (!sd_verdict_return(cgid, pol, &d, SD_DENY, &big, SD_KIND_DNS))
            return SK_DROP;
        ss->tx_msg = ws; /* audit mode: let it through, unkept (egress records what differs) */
        ss->tx_hi = ws + need;
        bpf_msg_apply_bytes(msg, need);
        return SK_PASS;
    }

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
        wire = sd_msg_qname(msg, pol->tables, len, s);

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
        name_id = sd_name_id(cgid, pol->tables, s);
    }
    struct sd_why why = {};
    why.rule = rule;
    why.name_id = name_id;
    if (!sd_verdict_return(cgid, pol, &d, verdict, &why, SD_KIND_DNS))
        return SK_DROP; /* apply_bytes 0: the rest of this write goes with it (EACCES) */
    if (name_id)
        sd_pending_put(cgid, pol->tables, d.addr, ((__u16)hdr[0] << 8) | hdr[1], name_id);
#ifdef SD_OFF_TCP_WRITE_SEQ
    /* keep the judged bytes for egress to compare with (sd_txring), in two parts where the
     * ring wraps; need < SD_TXRING (above) */
    struct sd_txring *r = sd_txring.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!r || bpf_msg_pull_data(msg, 0, need, 0))
        return SK_DROP;
    void *data = msg->data;
    __u32 off = ws & (SD_TXRING - 1);
    __u32 n1 = SD_TXRING - off;
    if (n1 > need)
        n1 = need;
    n1 &= SD_TXRING - 1;
    __u32 n2 = (need - n1) & (SD_TXRING - 1);
    if (n1 && bpf_probe_read_kernel(&r->b[off], n1, data) < 0)
        return SK_DROP;
    if (n2 && bpf_probe_read_kernel(&r->b[0], n2, data + n1) < 0)
        return SK_DROP;
#endif
    bpf_msg_apply_bytes(msg, need);
    ss->tx_msg = ws;
    ss->tx_hi = ws + need; /* judged: egress lets these bytes through as they are */
    return SK_PASS;
}
