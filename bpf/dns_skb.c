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

#define SD_ETH_P_IP 0x0800
#define SD_ETH_P_IPV6 0x86DD
#define SD_DNS_PORT 53
#define SD_MAX_ANSWERS 16
#define SD_MAX_LABELS_SKIP 32

#define SD_SKB_ANCESTOR(level) bpf_skb_ancestor_cgroup_id(skb, level)

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

/* Parse the question name at off into s->q: lower-cased dotted text, the hash of every
 * label-aligned suffix (shortest first, the full name last) and, on the way, the query
 * verdict (the longest matching base wins: s->found, s->qv_*). *full gets the full name's
 * hash. Returns the name's wire length, or 0 when it cannot be parsed (compression in the
 * question, bad or over-long labels, a dot inside a label, truncation). */
static __always_inline __u32 sd_parse_qname(struct __sk_buff *skb, __u32 off, __u64 cgid, struct sd_scratch *s,
                                            __u64 *full)
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

    s->pos = 0;
    s->out = 0;
    s->rem = 0;
    s->done = 0;
    s->found = 0;
    for (int i = 0; i < SD_NAME_BUF; i++) {
        __u32 pos = s->pos;
        if (pos >= n)
            break;
        __u8 c = s->wire[pos & 0xff];
        s->pos = pos + 1;
        __u32 rem = s->rem;
        __u32 out = s->out;
        if (out >= SD_NAME_MAX)
            break;
        if (rem == 0) {
            if (c == 0) {
                s->done = 1;
                break;
            }
            if (c > 63)
                break; /* a compression pointer or a bad length */
            s->rem = c;
            if (out) {
                s->q.name[out & 0xff] = '.';
                s->out = out + 1;
            }
        } else {
            if (c == '.')
                break; /* a dot inside a label would fake a label boundary */
            if (c >= 'A' && c <= 'Z')
                c += 'a' - 'A';
            s->q.name[out & 0xff] = c;
            s->out = out + 1;
            s->rem = rem - 1;
        }
    }
    __u32 len = s->out;
    if (!s->done || len == 0 || len > SD_NAME_MAX)
        return 0;
    s->q.len = len;

    s->h = SD_FNV_OFFSET;
    s->k = 0;
    for (int j = 0; j < SD_NAME_BUF; j++) {
        int i = (int)len - 1 - j;
        if (i < 0)
            break;
        __u8 c = s->q.name[i & 0xff];
        __u64 h = s->h;
        if (c == '.') {
            struct sd_name_val *v = sd_name_lookup(cgid, h, SD_NAME_WILD, 0, 0);
            if (v) {
                s->qv_rule = v->rule;
                s->qv_verdict = v->verdict;
                s->found = 1;
            }
            __u32 k = s->k;
            if (k < SD_MAX_SUFFIXES)
                s->q.hashes[k & (SD_MAX_SUFFIXES - 1)] = h;
            s->k = k + 1;
        }
        s->h = (h ^ c) * SD_FNV_PRIME;
    }
    __u64 h = s->h;
    *full = h;
    struct sd_name_val *v = sd_name_lookup(cgid, h, SD_NAME_EXACT, 0, 0);
    if (v) {
        s->qv_rule = v->rule;
        s->qv_verdict = v->verdict;
        s->found = 1;
    }
    __u32 k = s->k;
    if (k < SD_MAX_SUFFIXES) {
        s->q.hashes[k & (SD_MAX_SUFFIXES - 1)] = h;
        s->q.nhash = k + 1;
    } else {
        s->q.nhash = 0; /* too many labels to judge its addresses by name */
    }
    return s->pos;
}

static __always_inline void sd_remember_name(__u64 cgid, struct sd_scratch *s, __u32 name_id)
{
    struct sd_qname_key qk = {};
    qk.cgid = cgid;
    qk.name_id = name_id;
    qnames.update(&qk, &s->q);
}

int sd_dns_egress(struct __sk_buff *skb)
{
    struct sd_dest d = {};
    __u32 off = 0;
    if (!sd_dns_locate(skb, 1, &d, &off))
        return 1;
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(SD_SKB_ANCESTOR, &cgid);
    if (!pol)
        return 1;
    __u32 slot = SD_SCRATCH_EGRESS;
    struct sd_scratch *s = scratch.lookup(&slot);
    if (!s)
        return 1;
    __u8 hdr[12];
    if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
        return 1;
    if (hdr[2] & 0x80)
        return 1; /* QR: a response going out (a DNS server in the container) */
    __u8 opcode = (hdr[2] >> 3) & 0x0f;
    __u16 qdcount = (hdr[4] << 8) | hdr[5];

    __u32 wire_len = 0;
    __u64 full = 0;
    if (opcode == 0 && qdcount == 1)
        wire_len = sd_parse_qname(skb, off + 12, cgid, s, &full);

    __u8 verdict;
    __u16 rule;
    __u32 name_id = 0;
    if (!wire_len) {
        /* unparseable: never a silent allow when the policy denies any name */
        sd_stat(SD_STAT_DNS_MALFORMED);
        verdict = (pol->dflt == SD_DENY || pol->name_denies) ? SD_DENY : SD_ALLOW;
        rule = SD_RULE_MALFORMED;
    } else {
        verdict = s->found ? s->qv_verdict : pol->dflt;
        rule = s->found ? s->qv_rule : SD_RULE_DEFAULT;
        name_id = (__u32)full;
        sd_remember_name(cgid, s, name_id); /* the report shows the name */
    }
    return sd_verdict_return(cgid, pol, &d, verdict, rule, SD_KIND_DNS, name_id);
}

static __always_inline void sd_learn(__u64 cgid, __u32 *addr, __u32 name_id, __u8 verdict, __u32 ttl)
{
    struct sd_addr_key k = {};
    k.cgid = cgid;
    __builtin_memcpy(k.addr, addr, sizeof(k.addr));
    __u64 now = bpf_ktime_get_boot_ns();
    struct sd_learned *old = learned.lookup(&k);
    if (old && old->verdict == SD_DENY && verdict == SD_ALLOW && old->expires_ns > now)
        return; /* an address of a denied name stays denied until its TTL ends */
    if (ttl < SD_TTL_MIN_S)
        ttl = SD_TTL_MIN_S;
    if (ttl > SD_TTL_MAX_S)
        ttl = SD_TTL_MAX_S;
    struct sd_learned v = {};
    v.expires_ns = now + (__u64)ttl * 1000000000ULL;
    v.name_id = name_id;
    v.verdict = verdict;
    learned.update(&k, &v);
}

int sd_dns_ingress(struct __sk_buff *skb)
{
    struct sd_dest d = {};
    __u32 off = 0;
    if (!sd_dns_locate(skb, 0, &d, &off))
        return 1;
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(SD_SKB_ANCESTOR, &cgid);
    if (!pol)
        return 1;
    __u32 slot = SD_SCRATCH_INGRESS;
    struct sd_scratch *s = scratch.lookup(&slot);
    if (!s)
        return 1;
    __u8 hdr[12];
    if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
        return 1;
    if (!(hdr[2] & 0x80) || (hdr[3] & 0x0f))
        return 1; /* not a response, or an error response */
    if (((hdr[4] << 8) | hdr[5]) != 1)
        return 1;
    __u16 ancount = (hdr[6] << 8) | hdr[7];

    __u64 full = 0;
    __u32 wire_len = sd_parse_qname(skb, off + 12, cgid, s, &full);
    if (!wire_len || !s->q.nhash)
        return 1; /* not judged by name: its addresses are not learned */
    __u8 verdict = s->found ? s->qv_verdict : pol->dflt;
    __u32 name_id = (__u32)full;
    sd_remember_name(cgid, s, name_id);

    s->aoff = off + 12 + wire_len + 4;
    for (int a = 0; a < SD_MAX_ANSWERS; a++) {
        if (a >= ancount)
            break;
        s->skipped = 0;
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
        __u32 addr[4] = {};
        if (type == 1 && rdlen == 4) {
            addr[2] = bpf_htonl(0xffff);
            if (bpf_skb_load_bytes(skb, aoff, &addr[3], 4) < 0)
                return 1;
            sd_learn(cgid, addr, name_id, verdict, ttl);
        } else if (type == 28 && rdlen == 16) {
            if (bpf_skb_load_bytes(skb, aoff, addr, 16) < 0)
                return 1;
            sd_learn(cgid, addr, name_id, verdict, ttl);
        }
        s->aoff = aoff + rdlen;
    }
    return 1;
}
