/* safedeploy: DNS-aware cgroup_skb programs.
 *
 * egress: a DNS query (UDP/53 or the first segment of TCP/53, IPv4 and IPv6) is parsed in
 * the kernel; a query for a denied name is dropped, so the sender gets EPERM at once
 * instead of waiting for a timeout.
 * ingress: the answer to a query is parsed (A/AAAA records of the answer section, behind
 * any CNAMEs, owner names compressed or not) and each address is learned for its TTL
 * together with the queried name, so connect() can judge the address by that name.
 *
 * Non-DNS packets leave after a few loads. Loops are bounded; big buffers live in the
 * per-CPU scratch map; variable-length loads are masked for the verifier.
 */
#include "safedeploy.h"
#include "dns.h"
#include "dns_stream.h"

#define SD_ETH_P_IP 0x0800
#define SD_ETH_P_IPV6 0x86DD
#define SD_MAX_LABELS_SKIP 32

#define SD_SKB_ANCESTOR(level) bpf_skb_ancestor_cgroup_id(skb, level)

/* The cheap test every packet takes: could it be DNS (port 53 in the right direction)?
 * Direct packet reads, no helper calls; 1 also when the headers are not in the linear
 * part (then sd_dns_locate decides). */
static __always_inline int sd_maybe_dns(struct __sk_buff *skb, int to_dns)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    __u8 *h = data;
    __u32 l4;
    __u8 proto;
    if (skb->protocol == bpf_htons(SD_ETH_P_IP)) {
        if ((void *)(h + 20) > end)
            return 1;
        l4 = (h[0] & 0x0f) * 4;
        proto = h[9];
    } else if (skb->protocol == bpf_htons(SD_ETH_P_IPV6)) {
        if ((void *)(h + 40) > end)
            return 1;
        l4 = 40;
        proto = h[6];
    } else {
        return 0;
    }
    if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
        return 0;
    asm volatile("%0 &= 0x3c" : "+r"(l4));
    __u8 *ports = h + l4;
    if ((void *)(ports + 4) > end)
        return 1;
    __u16 port = to_dns ? ((ports[2] << 8) | ports[3]) : ((ports[0] << 8) | ports[1]);
    return port == SD_DNS_PORT;
}

/* Find a DNS message. to_dns: the packet goes to port 53 (egress query), else it comes
 * from port 53 (ingress answer). Fills the peer (the resolver) into d, *off = DNS header. */
static __always_inline int sd_dns_locate(struct __sk_buff *skb, int to_dns, struct sd_dest *d, __u32 *off)
{
    __u32 l4 = 0;
    __u8 proto = 0;
    if (skb->protocol == bpf_htons(SD_ETH_P_IP)) {
        __u8 hdr[20];
        if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)) < 0)
            return 0;
        if ((hdr[6] & 0x1f) || hdr[7]) /* a non-first fragment */
            return 0;
        l4 = (hdr[0] & 0x0f) * 4;
        proto = hdr[9];
        d->addr[2] = bpf_htonl(0xffff);
        __builtin_memcpy(&d->addr[3], to_dns ? &hdr[16] : &hdr[12], 4);
        d->family = 4;
    } else if (skb->protocol == bpf_htons(SD_ETH_P_IPV6)) {
        __u8 hdr[40];
        if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)) < 0)
            return 0;
        l4 = 40;
        proto = hdr[6];
        __builtin_memcpy(d->addr, to_dns ? &hdr[24] : &hdr[8], 16);
        d->family = sd_is_v4mapped(d->addr) ? 4 : 6;
    } else {
        return 0;
    }
    __u8 ports[4];
    if (proto != IPPROTO_UDP && proto != IPPROTO_TCP)
        return 0;
    if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
        return 0;
    __u16 port = to_dns ? ((ports[2] << 8) | ports[3]) : ((ports[0] << 8) | ports[1]);
    if (port != SD_DNS_PORT)
        return 0;
    if (proto == IPPROTO_UDP) {
        *off = l4 + 8;
    } else {
        __u8 doff;
        if (bpf_skb_load_bytes(skb, l4 + 12, &doff, 1) < 0)
            return 0;
        *off = l4 + (doff >> 4) * 4 + 2; /* skip the 2-byte length prefix */
    }
    if (*off + 12 > skb->len)
        return 0; /* no DNS header here (e.g. a bare TCP ACK) */
    d->proto = proto;
    d->port = SD_DNS_PORT;
    return 1;
}

/* Parse the question name at off (no compression allowed there) into s->q and judge it.
 * Returns the name's wire length, or 0 when it cannot be parsed (compression in the
 * question, bad or over-long labels, a dot inside a label, truncation). */
static __always_inline __u32 sd_parse_qname(struct __sk_buff *skb, __u32 off, __u64 cgid, struct sd_scratch *s)
{
    __u32 avail = skb->len > off ? skb->len - off : 0;
    if (avail == 0)
        return 0;
    __u32 n = avail > SD_NAME_BUF ? SD_NAME_BUF : avail;
    n -= 1;
    asm volatile("%0 &= 0xff" : "+r"(n));
    n += 1;
    if (bpf_skb_load_bytes(skb, off, s->wire, n) < 0)
        return 0;
    sd_name_start(s, 0);
    for (int i = 0; i < SD_NAME_BUF; i++) {
        __u32 pos = s->pos;
        if (pos >= n)
            break;
        int r = sd_name_byte(s, s->wire[pos & 0xff]);
        s->pos = pos + 1;
        if (r) {
            s->done = r > 0;
            break;
        }
    }
    return sd_name_end(cgid, s) ? s->pos : 0;
}

/* Parse a possibly compressed name at off (an answer's owner name) into s->q and judge
 * it. Pointers must point backwards (no loops) and at most 16 are followed. Returns 1
 * when parsed. */
#define SD_MAX_JUMPS 16
static __always_inline int sd_parse_name_at(struct __sk_buff *skb, __u32 dns_off, __u32 off, __u64 cgid,
                                            struct sd_scratch *s)
{
    sd_name_start(s, off);
    s->skipped = 0; /* pointers followed */
    for (int i = 0; i < SD_NAME_BUF + SD_MAX_JUMPS; i++) {
        __u32 pos = s->pos;
        __u8 c[2];
        if (bpf_skb_load_bytes(skb, pos, c, 1) < 0)
            break;
        if (s->rem == 0 && (c[0] & 0xc0) == 0xc0) {
            if (bpf_skb_load_bytes(skb, pos + 1, &c[1], 1) < 0)
                break;
            __u32 target = dns_off + (((__u32)(c[0] & 0x3f) << 8) | c[1]);
            __u32 jumps = s->skipped;
            if (target >= pos || jumps >= SD_MAX_JUMPS)
                break;
            s->skipped = jumps + 1;
            s->pos = target;
            continue;
        }
        int r = sd_name_byte(s, c[0]);
        s->pos = pos + 1;
        if (r) {
            s->done = r > 0;
            break;
        }
    }
    return sd_name_end(cgid, s);
}

/* A packet of a raw socket: it bypassed connect/sendmsg, so drop it unless the policy
 * allows raw sockets (sd_sock_create refuses most of them at creation already). */
static __always_inline int sd_raw_egress(struct __sk_buff *skb)
{
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(SD_SKB_ANCESTOR, &cgid);
    if (!pol || pol->allow_raw)
        return 1;
    struct sd_dest d = {};
    if (skb->protocol == bpf_htons(SD_ETH_P_IP)) {
        __u8 hdr[20];
        if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)) < 0)
            return 0;
        d.addr[2] = bpf_htonl(0xffff);
        __builtin_memcpy(&d.addr[3], &hdr[16], 4);
        d.proto = hdr[9];
        d.family = 4;
    } else {
        __u8 hdr[40];
        if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)) < 0)
            return 0;
        __builtin_memcpy(d.addr, &hdr[24], 16);
        d.proto = hdr[6];
        d.family = 6;
    }
    return sd_rule_return(cgid, pol, &d, SD_DENY, SD_RULE_RAW, SD_KIND_SOCKET);
}

/* What both DNS programs need first: the DNS message, the policy of the socket's cgroup,
 * this program's scratch slot and the 12-byte DNS header. NULL: not ours to look at. */
struct sd_dns_ctx {
    struct sd_dest d;
    __u32 off;
    __u64 cgid;
    struct sd_cgroup *pol;
    __u8 hdr[12];
};

static __always_inline struct sd_scratch *sd_dns_begin(struct __sk_buff *skb, int to_dns, __u32 slot,
                                                       struct sd_dns_ctx *c)
{
    if (!sd_maybe_dns(skb, to_dns) || !sd_dns_locate(skb, to_dns, &c->d, &c->off))
        return 0;
    /* stream path (dns_stream.c): TCP sockets in dns_socks have every message judged and
     * every answer read whole there; a segment need not start at a message */
    if (c->d.proto == IPPROTO_TCP && sd_stream_owns(skb))
        return 0;
    c->pol = SD_FIND_POLICY(SD_SKB_ANCESTOR, &c->cgid);
    if (!c->pol)
        return 0;
    if (bpf_skb_load_bytes(skb, c->off, c->hdr, sizeof(c->hdr)) < 0)
        return 0;
    return scratch.lookup(&slot);
}

int sd_dns_egress(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;
    if (sk) {
        sk = bpf_sk_fullsock(sk);
        if (sk && sk->type == SD_SOCK_RAW)
            return sd_raw_egress(skb);
    }
    struct sd_dns_ctx c = {};
    struct sd_scratch *s = sd_dns_begin(skb, 1, SD_SCRATCH_EGRESS, &c);
    if (!s)
        return 1;
    struct sd_cgroup *pol = c.pol;
    __u64 cgid = c.cgid;
    __u32 off = c.off;
    __u8 *hdr = c.hdr;
    if (hdr[2] & 0x80)
        return 1; /* QR: a response going out (a DNS server in the container) */
    __u8 opcode = (hdr[2] >> 3) & 0x0f;
    __u16 qdcount = (hdr[4] << 8) | hdr[5];

    __u32 wire_len = 0;
    if (opcode == 0 && qdcount == 1)
        wire_len = sd_parse_qname(skb, off + 12, cgid, s);

    __u8 verdict;
    __u16 rule;
    __u32 name_id = 0;
    if (!wire_len) {
        /* unparseable: never a silent allow when the policy denies any name */
        sd_stat(SD_STAT_DNS_MALFORMED);
        verdict = (pol->dflt == SD_DENY || pol->name_denies) ? SD_DENY : SD_ALLOW;
        rule = SD_RULE_MALFORMED;
    } else {
        verdict = sd_query_verdict(pol, s, &rule);
        name_id = sd_name_id(cgid, s); /* the report shows the name */
    }
    if ((bpf_get_current_pid_tgid() >> 32) == 0) /* a TCP retransmission from kernel context */
        return verdict == SD_ALLOW || pol->mode == SD_MODE_AUDIT;
    struct sd_why why = {};
    why.rule = rule;
    why.name_id = name_id;
    int ret = sd_verdict_return(cgid, pol, &c.d, verdict, &why, SD_KIND_DNS);
    if (ret && name_id)
        sd_pending_put(cgid, c.d.addr, ((__u16)hdr[0] << 8) | hdr[1], name_id);
    return ret;
}

/* Learn the addresses of the DNS answer at off (its header) from resolver: shared by the
 * cgroup_skb ingress program (a UDP datagram, a TCP segment) and the sk_skb stream verdict
 * (a whole TCP message, dns_stream.c). Returns 1. */
static __always_inline int sd_dns_answer(struct __sk_buff *skb, __u64 cgid, __u32 off, __u32 *resolver,
                                         struct sd_scratch *s)
{
    __u8 hdr[12];
    if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
        return 1;
    if (!(hdr[2] & 0x80) || (hdr[3] & 0x0f))
        return 1; /* not a response, or an error response */
    if (((hdr[4] << 8) | hdr[5]) != 1)
        return 1;
    __u16 ancount = (hdr[6] << 8) | hdr[7];

    __u32 wire_len = sd_parse_qname(skb, off + 12, cgid, s);
    if (!wire_len)
        return 1; /* not judged by name: its addresses are not learned */
    __u32 name_id = sd_known_name_id(cgid, s);
    if (!sd_pending_take(cgid, resolver, ((__u16)hdr[0] << 8) | hdr[1], name_id))
        return 1; /* no such question went to that resolver from here: nothing to learn */
    /* learned-as-denied only when a rule denies the name (a name that merely falls to the
     * default is judged at connect by CIDR rules and the default, as decide() does) */
    __u8 qverdict = (s->found && s->qv_verdict == SD_DENY) ? SD_DENY : SD_ALLOW;
    __u16 qrule = s->found ? s->qv_rule : SD_RULE_DEFAULT;
    __u32 question = off + 12;

    s->aoff = off + 12 + wire_len + 4;
    s->naddr = 0;
    s->owner = 0;
    s->mixed = 0;
    for (int a = 0; a < SD_MAX_ANSWERS; a++) {
        if (a >= ancount)
            break;
        s->skipped = 0;
        __u32 owner = s->aoff;
        for (int l = 0; l < SD_MAX_LABELS_SKIP; l++) { /* the owner name */
            __u8 b;
            __u32 at = s->aoff;
            if (bpf_skb_load_bytes(skb, at, &b, 1) < 0)
                return 1;
            if ((b & 0xc0) == 0xc0) {
                s->aoff = at + 2;
                s->skipped = 1;
                break;
            }
            if (b == 0) {
                s->aoff = at + 1;
                s->skipped = 1;
                break;
            }
            s->aoff = at + 1 + b;
        }
        if (!s->skipped)
            return 1;
        __u32 aoff = s->aoff;
        __u8 rr[10];
        if (bpf_skb_load_bytes(skb, aoff, rr, sizeof(rr)) < 0)
            return 1;
        __u16 type = (rr[0] << 8) | rr[1];
        __u32 ttl = ((__u32)rr[4] << 24) | ((__u32)rr[5] << 16) | ((__u32)rr[6] << 8) | rr[7];
        __u16 rdlen = (rr[8] << 8) | rr[9];
        aoff += 10;
        __u32 n = s->naddr;
        int got = 0;
        if (n < SD_MAX_ANSWERS && type == 1 && rdlen == 4) {
            s->addrs[n & (SD_MAX_ANSWERS - 1)].a[0] = 0;
            s->addrs[n & (SD_MAX_ANSWERS - 1)].a[1] = 0;
            s->addrs[n & (SD_MAX_ANSWERS - 1)].a[2] = bpf_htonl(0xffff);
            got = bpf_skb_load_bytes(skb, aoff, &s->addrs[n & (SD_MAX_ANSWERS - 1)].a[3], 4) == 0;
        } else if (n < SD_MAX_ANSWERS && type == 28 && rdlen == 16) {
            got = bpf_skb_load_bytes(skb, aoff, s->addrs[n & (SD_MAX_ANSWERS - 1)].a, 16) == 0;
        }
        if (got) {
            s->addrs[n & (SD_MAX_ANSWERS - 1)].ttl = ttl;
            s->naddr = n + 1;
            /* whose address is it: the question's, or the end of a CNAME chain's? */
            __u8 ptr[2] = {};
            bpf_skb_load_bytes(skb, owner, ptr, 2);
            __u16 p = ((__u16)ptr[0] << 8) | ptr[1];
            if (owner != question && p != (0xc000 | 12)) {
                if (!s->owner) {
                    s->owner = owner;
                    s->owner_ptr = p;
                } else if (s->owner_ptr != p) {
                    s->mixed = 1;
                }
            }
        }
        s->aoff = aoff + rdlen;
    }
    if (s->mixed)
        return 1; /* addresses of several other owners: learn none of them */
    /* addresses at the end of a CNAME chain: that name must not be a denied one in disguise */
    __u8 verdict = qverdict;
    __u16 rule = qrule;
    __u32 target_id = 0;
    __u32 chain_end = s->owner;
    if (chain_end) {
        if (!sd_parse_name_at(skb, off, chain_end, cgid, s)) {
            verdict = SD_DENY; /* an owner we cannot read is not trusted */
            rule = SD_RULE_MALFORMED;
        } else if (s->found && s->qv_verdict == SD_DENY) {
            verdict = SD_DENY;
            rule = s->qv_rule;
            target_id = sd_name_id(cgid, s); /* the report names the denied target too */
        }
    }
    for (int i = 0; i < SD_MAX_ANSWERS; i++) {
        if (i >= s->naddr)
            break;
        sd_learn_via(cgid, s->addrs[i & (SD_MAX_ANSWERS - 1)].a, name_id, target_id, verdict, rule,
                     s->addrs[i & (SD_MAX_ANSWERS - 1)].ttl);
    }
    return 1;
}

int sd_dns_ingress(struct __sk_buff *skb)
{
    struct sd_dns_ctx c = {};
    struct sd_scratch *s = sd_dns_begin(skb, 0, SD_SCRATCH_INGRESS, &c);
    if (!s)
        return 1;
    return sd_dns_answer(skb, c.cgid, c.off, c.d.addr, s);
}
