/* safedeploy: DNS-aware cgroup_skb programs.
 *
 * egress: every packet leaving a policed cgroup is judged by its real IP destination and
 * protocol (a fast path for packets going where their socket was judged to go); anything
 * sent to port 53 (UDP, UDP-Lite, TCP data; behind IPv4 options or IPv6 extension headers
 * too) is parsed as a DNS query, and a query for a denied name is dropped, so the sender
 * gets EPERM at once instead of waiting for a timeout.
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

#define SD_SKB_ANCESTOR(level) bpf_skb_ancestor_cgroup_id(skb, level)

/* The answer parser is split in tail calls (SD_TAIL_*), each verified on its own. */
BPF_PROG_ARRAY(sd_tails, SD_NTAILS);
/* the egress program's own (a tail call stays within one attach type): the query parser
 * and the verdict on a packet to a DNS port */
BPF_PROG_ARRAY(sd_egress_tails, SD_NETAILS);

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


/* How many bytes of a question name to load at off of a message of len bytes: at most
 * SD_NAME_BUF, masked for the verifier (1..SD_NAME_BUF); 0 when none are there. */
static __always_inline __u32 sd_qname_span(__u32 len, __u32 off)
{
    __u32 avail = len > off ? len - off : 0;
    if (avail == 0)
        return 0;
    __u32 n = avail > SD_NAME_BUF ? SD_NAME_BUF : avail;
    n -= 1;
    asm volatile("%0 &= %1" : "+r"(n) : "i"(SD_NAME_MASK));
    return n + 1;
}

/* The question name loaded into s->wire (n bytes, no compression allowed there): parse it
 * into s->q and judge it. Returns the name's wire length, or 0 when it cannot be parsed
 * (compression in the question, bad or over-long labels, a dot inside a label, truncation). */
static __always_inline __u32 sd_parse_wire_qname(__u32 tables, struct sd_scratch *s, __u32 n)
{
    sd_name_start(s, 0);
    for (int i = 0; i < SD_NAME_BUF; i++) {
        __u32 pos = s->pos;
        if (pos >= n)
            break;
        int r = sd_name_byte(s, s->wire[pos & SD_NAME_MASK]);
        s->pos = pos + 1;
        if (r) {
            s->done = r > 0;
            break;
        }
    }
    return sd_name_end(tables, s) ? s->pos : 0;
}

/* The question name at off of a packet (a query at egress). */
static __always_inline __u32 sd_parse_qname(struct __sk_buff *skb, __u32 off, __u32 tables, struct sd_scratch *s)
{
    __u32 n = sd_qname_span(skb->len, off);
    if (!n || bpf_skb_load_bytes(skb, off, s->wire, n) < 0)
        return 0;
    return sd_parse_wire_qname(tables, s, n);
}

/* The question name at off of the message buffer (an answer's question). */
static __always_inline __u32 sd_parse_qname_mb(struct sd_msgbuf *mb, __u32 off, __u32 tables, struct sd_scratch *s)
{
    __u32 n = sd_qname_span(mb->len, off);
    if (!n || sd_mb_load(mb, off, s->wire, n) < 0)
        return 0;
    return sd_parse_wire_qname(tables, s, n);
}

/* Parse a possibly compressed name at off of the message buffer (an answer's owner name)
 * into s->q and judge it. Pointers must point backwards (no loops) and at most 16 are
 * followed. Returns 1 when parsed. */
#define SD_MAX_JUMPS 16
static __always_inline int sd_parse_name_at(struct sd_msgbuf *mb, __u32 off, __u32 tables, struct sd_scratch *s)
{
    sd_name_start(s, off);
    s->skipped = 0; /* pointers followed */
    for (int i = 0; i < SD_NAME_BUF + SD_MAX_JUMPS; i++) {
        __u32 pos = s->pos;
        __u8 c[2];
        if (sd_mb_byte(mb, pos, &c[0]) < 0)
            break;
        if (s->rem == 0 && (c[0] & 0xc0) == 0xc0) {
            if (sd_mb_byte(mb, pos + 1, &c[1]) < 0)
                break;
            __u32 target = ((__u32)(c[0] & 0x3f) << 8) | c[1];
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
    return sd_name_end(tables, s);
}

/* Copy len bytes at off of the skb (a DNS message) into the message buffer; a message
 * longer than SD_MSGBUF is copied as far as it fits (trunc). 0 when nothing was copied. */
static __always_inline int sd_mb_fill(struct __sk_buff *skb, struct sd_msgbuf *mb, __u32 off, __u32 len)
{
    mb->len = 0;
    mb->trunc = len > SD_MSGBUF;
    if (len == 0)
        return 0;
    __u32 n = len > SD_MSGBUF ? SD_MSGBUF : len;
    n -= 1;
    asm volatile("%0 &= %1" : "+r"(n) : "i"(SD_MSGBUF - 1));
    n += 1;
    if (bpf_skb_load_bytes(skb, off, mb->b, n) < 0)
        return 0;
    mb->len = n;
    return 1;
}

/* What egress needs of a packet: its real destination and protocol, its ports, and
 * whether it carries a source route. */
struct sd_pkt {
    struct sd_dest d;   /* the IP destination; proto = the L4 protocol; port = destination port */
    __u32 l4;           /* offset of the L4 header */
    __u16 sport;
    __u8 has_ports;     /* TCP/UDP/UDP-Lite whose header is in this packet (not a later fragment) */
    __u8 srcroute;      /* an IPv6 routing header or an IPv4 LSRR/SSRR option */
    __u8 options;       /* IPv4 options or IPv6 extension headers */
    /* a packet to a DNS port with DNS data: the query's verdict (sd_dns_query) */
    __u8 dns;
    __u8 dns_verdict;
    __u16 dns_rule;
    __u16 txid;
    __u8 dns_flags;     /* the DNS header's third byte */
    __u8 parsed;        /* sd_parse_pkt succeeded */
    __u8 unjudged;      /* TCP data the stream programs never judged, urgent data, UDP GSO: refused */
    __u8 byref;         /* DNS data in pages the process can still change (sd_skb_byref): refused */
    __u32 dns_name_id;
    __u64 cgid;         /* the policed cgroup (egress: for the tail calls) */
    __u64 skbaddr;      /* sd_skb_byref: the kernel's sk_buff, as a number */
};

/* in map memory, not on the stack: the verifier then sees the parse results as unknown
 * values and verifies the rest of the program once, not once per parsing path */
#define SD_PKT_EGRESS 0     /* one slot per direction: an ingress program may interrupt egress */
#define SD_PKT_INGRESS 1
BPF_PERCPU_ARRAY(pktscratch, struct sd_pkt, 2);

#define SD_MAX_EXTHDRS 8
#define SD_NH_HOP 0
#define SD_NH_ROUTING 43
#define SD_NH_FRAGMENT 44
#define SD_NH_AH 51
#define SD_NH_DSTOPTS 60

static __always_inline int sd_is_exthdr(__u8 nh)
{
    return nh == SD_NH_HOP || nh == SD_NH_ROUTING || nh == SD_NH_FRAGMENT || nh == SD_NH_AH || nh == SD_NH_DSTOPTS;
}

/* Parse the IP header (IPv4 options, IPv6 extension headers walked to the L4 header): the
 * one IP parser of the packet programs. p->d is the peer: the destination of an egress
 * packet, the source of an ingress one (ingress: a constant); p->d.port its port, p->sport
 * the local one. Egress also looks for source routes. 0: the packet cannot be parsed
 * (truncated, or more than SD_MAX_EXTHDRS headers). */
static __always_inline int sd_parse_pkt(struct __sk_buff *skb, struct sd_pkt *p, const int ingress)
{
    __u32 l4;
    __u8 proto;
    int later = 0; /* a fragment other than the first: no L4 header */
    if (skb->protocol == bpf_htons(SD_ETH_P_IP)) {
        __u8 hdr[20];
        if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)) < 0)
            return 0;
        l4 = (hdr[0] & 0x0f) * 4;
        if (l4 < 20)
            return 0;
        later = (hdr[6] & 0x1f) || hdr[7];
        proto = hdr[9];
        p->d.addr[2] = bpf_htonl(0xffff);
        __builtin_memcpy(&p->d.addr[3], ingress ? &hdr[12] : &hdr[16], 4);
        p->d.family = 4;
        if (l4 > 20)
            p->options = 1;
        if (l4 > 20 && !ingress) {
            __u32 slot = SD_OPTS_EGRESS;
            struct sd_opts *o = optscratch.lookup(&slot);
            __u32 olen = l4 - 20;
            if (!o || olen > 40)
                return 0;
            olen -= 1;
            asm volatile("%0 &= %1" : "+r"(olen) : "i"(SD_OPTS_MASK));
            olen += 1;
            if (bpf_skb_load_bytes(skb, 20, o->b, olen) < 0)
                return 0;
            o->len = olen;
            p->srcroute = sd_v4_srcroute(o);
        }
    } else if (skb->protocol == bpf_htons(SD_ETH_P_IPV6)) {
        __u8 hdr[40];
        if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)) < 0)
            return 0;
        proto = hdr[6];
        __builtin_memcpy(p->d.addr, ingress ? &hdr[8] : &hdr[24], 16);
        p->d.family = sd_is_v4mapped(p->d.addr) ? 4 : 6;
        l4 = 40;
        for (int i = 0; i < SD_MAX_EXTHDRS; i++) {
            if (!sd_is_exthdr(proto))
                break;
            __u8 e[4];
            if (bpf_skb_load_bytes(skb, l4, e, sizeof(e)) < 0)
                return 0;
            p->options = 1;
            if (proto == SD_NH_FRAGMENT) {
                later = (((__u16)e[2] << 8) | e[3]) & 0xfff8;
                proto = e[0];
                l4 += 8;
                if (later)
                    break;
                continue;
            }
            if (proto == SD_NH_ROUTING)
                p->srcroute = 1; /* any routing type: segment routing (4), type 2, ... */
            l4 += proto == SD_NH_AH ? ((__u32)e[1] + 2) * 4 : ((__u32)e[1] + 1) * 8;
            proto = e[0];
        }
        if (!later && sd_is_exthdr(proto))
            return 0; /* more extension headers than we walk */
    } else {
        return 0;
    }
    p->d.proto = proto;
    p->l4 = l4;
    if (!later && (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == SD_IPPROTO_UDPLITE)) {
        __u8 ports[4];
        if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
            return 0;
        __u16 src = ((__u16)ports[0] << 8) | ports[1];
        __u16 dst = ((__u16)ports[2] << 8) | ports[3];
        p->sport = ingress ? dst : src;
        p->d.port = ingress ? src : dst;
        p->has_ports = 1;
    }
    return 1;
}

/* Is addr:port/proto the socket's own peer? A connected socket's peer is what its connect
 * was judged for (connect4/6 judge the address the kernel really uses), and an accepted
 * connection's peer is the one that connected to it. Only TCP and UDP, whose connect runs
 * the connect programs (UDP-Lite's does not: its packets are judged at egress). */
static __always_inline int sd_peer_match(struct bpf_sock *sk, __u32 *a, __u8 proto, __u16 port)
{
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return 0;
    if (sk->protocol != proto || bpf_ntohs(sk->dst_port) != port || port == 0)
        return 0;
    if (sk->family == SD_AF_INET6)
        return a[0] == SD_SK_U32(sk, dst_ip6[0]) && a[1] == SD_SK_U32(sk, dst_ip6[1]) &&
               a[2] == SD_SK_U32(sk, dst_ip6[2]) && a[3] == SD_SK_U32(sk, dst_ip6[3]);
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff) && a[3] == sk->dst_ip4;
}

/* Was this exact destination judged for the socket: its peer, or the destination of its
 * last unconnected sendmsg (sk_judged)? */
static __always_inline int sd_dest_judged(struct bpf_sock *sk, __u32 *a, __u8 proto, __u16 port)
{
    struct sd_sk *st = 0;
    if (proto == IPPROTO_UDP)
        st = sk_judged.sk_storage_get(sk, 0, 0);
    if (st) {
        __u8 peer = st->peer;
        if (peer == SD_PEER_DENIED || (peer == SD_PEER_ALLOWED && st->sent_gen != st->peer_gen))
            return 0; /* connected to a denied peer, or nothing sent yet (sd_udp_connect): judged in full */
    }
    if (sd_peer_match(sk, a, proto, port))
        return 1;
    if (proto != IPPROTO_UDP)
        st = sk_judged.sk_storage_get(sk, 0, 0);
    if (!st)
        return 0;
    return (st->flags & SD_SK_JUDGED) && st->proto == proto && st->port == port && st->addr[0] == a[0] && st->addr[1] == a[1] &&
           st->addr[2] == a[2] && st->addr[3] == a[3];
}

/* The fast path: a plain packet (no IPv4 options, no IPv6 extension headers, headers in
 * the linear data) going exactly where its socket was judged to go, not to or from port 53.
 * Direct packet reads, the socket's own fields, at most one socket-storage lookup. */
static __always_inline int sd_fast_pass(struct __sk_buff *skb, struct bpf_sock *sk)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    __u8 *h = data;
    __u8 *ports;
    __u8 proto;
    __u32 a[4];
    if (skb->protocol == bpf_htons(SD_ETH_P_IP)) {
        if ((void *)(h + 24) > end)
            return 0;
        if (h[0] != 0x45 || (h[6] & 0x1f) || h[7])
            return 0;
        proto = h[9];
        a[0] = 0;
        a[1] = 0;
        a[2] = bpf_htonl(0xffff);
        __builtin_memcpy(&a[3], h + 16, 4);
        ports = h + 20;
    } else if (skb->protocol == bpf_htons(SD_ETH_P_IPV6)) {
        if ((void *)(h + 44) > end)
            return 0;
        proto = h[6];
        __builtin_memcpy(a, h + 24, 16);
        ports = h + 40;
    } else {
        return 0;
    }
    __u16 sport = ((__u16)ports[0] << 8) | ports[1];
    __u16 dport = ((__u16)ports[2] << 8) | ports[3];
    if (dport == SD_DNS_PORT || sport == SD_DNS_PORT)
        return 0;
    return sd_dest_judged(sk, a, proto, dport);
}

/* sd_dest_judged for a parsed packet (its ports are known). */
static __always_inline int sd_judged_match(struct bpf_sock *sk, struct sd_pkt *p)
{
    if (!p->has_ports)
        return 0;
    return sd_dest_judged(sk, p->d.addr, p->d.proto, p->d.port);
}

/* An ingress packet from port 53 (UDP, TCP) parsed into p: the offset of its payload
 * (a datagram's DNS message, a TCP segment's data), 0 when it is not one or has none. */
static __always_inline __u32 sd_dns_locate(struct __sk_buff *skb, struct sd_pkt *p)
{
    __builtin_memset(p, 0, sizeof(*p));
    if (!sd_parse_pkt(skb, p, 1) || !p->has_ports || p->d.port != SD_DNS_PORT)
        return 0;
    __u32 off = p->l4 + 8;
    if (p->d.proto == IPPROTO_TCP) {
        __u8 doff = 0;
        if (bpf_skb_load_bytes(skb, p->l4 + 12, &doff, 1) < 0)
            return 0;
        off = p->l4 + (doff >> 4) * 4;
    } else if (p->d.proto != IPPROTO_UDP) {
        return 0;
    }
    return off < skb->len ? off : 0;
}

/* A TCP segment whose data all went through the stream programs (dns_stream.h). */
static __always_inline int sd_tcp_streamed(struct __sk_buff *skb, struct sd_pkt *p)
{
    if (p->d.proto != IPPROTO_TCP)
        return SD_STREAM_PARSE;
    __u8 th[14];
    if (bpf_skb_load_bytes(skb, p->l4, th, sizeof(th)) < 0)
        return SD_STREAM_PARSE;
    /* urgent data (MSG_OOB): the resolver takes the urgent byte out of the stream, and reads
     * every later message one byte off from what was judged (found by an attacker) */
    if (th[13] & SD_TCP_URG)
        return SD_STREAM_UNJUDGED;
    __u32 seq = ((__u32)th[4] << 24) | ((__u32)th[5] << 16) | ((__u32)th[6] << 8) | th[7];
    __u32 pay = p->l4 + (th[12] >> 4) * 4;
    __u32 len = skb->len > pay ? skb->len - pay : 0;
    struct bpf_sock *sk = skb->sk;
    if (sk)
        sk = bpf_sk_fullsock(sk);
    if (!sk)
        return SD_STREAM_PARSE;
    int c = sd_stream_class(sk, seq, len, 1);
    if (c != SD_STREAM_OWNED || !SD_TX_ACCOUNTED || !len || sd_stream_same(skb, sk, pay, seq, len))
        return c;
    /* in the judged range but not the bytes judged there: classed as bytes nobody judged
     * (a failed push that sent none of the last message is parsed: the resolver reads a new
     * message at their start) */
    return sd_stream_class(sk, seq, len, 0);
}

/* A query refused whatever it asks and whatever the policy (rule: why). */
static __always_inline void sd_refuse_query(struct sd_pkt *p, __u16 rule)
{
    if (rule == SD_RULE_MALFORMED)
        sd_stat(SD_STAT_DNS_MALFORMED);
    p->dns_verdict = SD_DENY;
    p->dns_rule = rule;
    p->txid = 0;
    p->dns_flags = 0;
}

/* Does this packet's data sit where the sending process can still change it after egress
 * judged it? Data sent by reference (splice or vmsplice, sendfile of a file it can write,
 * MSG_ZEROCOPY, io_uring's zero-copy send) is judged here from the process's pages, then
 * waits in a queue (a qdisc, the device's ring) while the process rewrites them: the
 * resolver would read a query nobody judged. The kernel marks such an skb in its shared
 * info (SKBFL_SHARED_FRAG, and SKBFL_ZEROCOPY_ENABLE for user pages). A datagram the kernel
 * fragments after this hook is a chain of skbs (the shared info's frag_list), each with
 * shared info of its own: such a packet is refused whole (found by an attacker: 40 bytes
 * of IP options and a small MTU put every byte of a spliced query in the chain). A
 * cgroup_skb context is the kernel's sk_buff; its address goes through map memory to
 * become a number the program may read from (a privileged loader: the verifier lets
 * pointers become numbers). Without kernel BTF the offsets are unknown and nothing is
 * refused (docs/security.md). Fails closed: a read that fails counts as shared. */
static __always_inline int sd_skb_byref(struct __sk_buff *skb, struct sd_pkt *pp)
{
#if defined(SD_OFF_SKB_HEAD) && defined(SD_OFF_SKB_END) && defined(SD_OFF_SHINFO_FLAGS) && \
    defined(SD_OFF_SHINFO_FRAG_LIST)
    pp->skbaddr = (__u64)(long)skb;
    __u64 a = *(volatile __u64 *)&pp->skbaddr;
    __u64 head = 0, chain = 0;
    __u32 end = 0; /* sk_buff_data_t: an offset from head on 64-bit kernels */
    __u8 flags = 0;
    if (bpf_probe_read_kernel(&head, sizeof(head), (void *)(a + SD_OFF_SKB_HEAD)) < 0 ||
        bpf_probe_read_kernel(&end, sizeof(end), (void *)(a + SD_OFF_SKB_END)) < 0 ||
        bpf_probe_read_kernel(&flags, sizeof(flags), (void *)(head + end + SD_OFF_SHINFO_FLAGS)) < 0 ||
        bpf_probe_read_kernel(&chain, sizeof(chain), (void *)(head + end + SD_OFF_SHINFO_FRAG_LIST)) < 0)
        return 1;
    return chain != 0 || (flags & (SD_SKBFL_SHARED_FRAG | SD_SKBFL_ZEROCOPY_ENABLE)) != 0;
#else
    return 0;
#endif
}

/* A packet to a DNS port: judged as a query, whatever its header says. A query the kernel
 * cannot parse (QR set, another opcode, not exactly one question, a bad name, truncated)
 * is denied when the policy denies any name or defaults to deny. Returns 0 when the
 * packet carries no DNS data (a bare TCP segment): nothing to judge. */
static __always_inline int sd_dns_query(struct __sk_buff *skb, struct sd_pkt *p, __u64 cgid, struct sd_cgroup *pol)
{
    __u32 slot = SD_SCRATCH_EGRESS;
    struct sd_scratch *s = scratch.lookup(&slot);
    if (!s)
        return 0;
    __u32 off = p->l4 + 8;
    int whole = 1;
    if ((p->unjudged || p->byref) && p->d.proto != IPPROTO_TCP) {
        /* a UDP GSO send (sd_egress_judge), or data the process can still change */
        sd_refuse_query(p, p->unjudged ? SD_RULE_MALFORMED : SD_RULE_ZEROCOPY);
        return 1;
    }
    if (p->d.proto == IPPROTO_TCP) {
        __u8 doff = 0;
        bpf_skb_load_bytes(skb, p->l4 + 12, &doff, 1);
        __u32 payload = p->l4 + (doff >> 4) * 4;
        if (payload >= skb->len)
            return 0; /* no data (SYN, ACK, FIN): nothing is asked */
        off = payload + 2; /* skip the 2-byte length prefix */
        /* not streamed (TCP Fast Open data, a connection from before the policy): only a
         * segment that is exactly one whole message can be judged; more messages, or a piece
         * of one, could carry a query nobody judged */
        __u8 len2[2] = {};
        bpf_skb_load_bytes(skb, payload, len2, 2);
        whole = 2 + (((__u32)len2[0] << 8) | len2[1]) == skb->len - payload;
        if (p->unjudged || p->byref) {
            /* bytes of a judged stream nobody judged where the resolver does not read a new
             * message, or urgent data: refused whatever the policy (sd_tcp_streamed); bytes
             * the process can still change: refused whatever they hold (sd_skb_byref) */
            sd_refuse_query(p, p->unjudged ? SD_RULE_MALFORMED : SD_RULE_ZEROCOPY);
            return 1;
        }
    }
    __u8 hdr[12] = {};
    __u32 wire_len = 0;
    if (whole && off + 12 <= skb->len && bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) == 0) {
        __u8 opcode = (hdr[2] >> 3) & 0x0f;
        __u16 qdcount = (hdr[4] << 8) | hdr[5];
        if (!(hdr[2] & 0x80) && opcode == 0 && qdcount == 1)
            wire_len = sd_parse_qname(skb, off + 12, pol->tables, s);
    }
    p->txid = ((__u16)hdr[0] << 8) | hdr[1];
    p->dns_flags = hdr[2];
    if (!wire_len) {
        /* unparseable: never a silent allow when the policy denies any name */
        sd_stat(SD_STAT_DNS_MALFORMED);
        p->dns_verdict = (pol->dflt == SD_DENY || pol->name_denies) ? SD_DENY : SD_ALLOW;
        p->dns_rule = SD_RULE_MALFORMED;
    } else {
        __u16 rule = SD_RULE_DEFAULT;
        p->dns_verdict = sd_query_verdict(pol, s, &rule);
        p->dns_rule = rule;
        p->dns_name_id = sd_name_id(cgid, pol->tables, s); /* the report shows the name */
    }
    return 1;
}

/* The addresses and ports of a refusal (ocihook/refuser.py answers REFUSED from the resolver
 * to the client) from the packet of a DNS exchange: the client is the packet's source
 * (a query, at egress) or its destination (an answer, at ingress). In map memory: a
 * refusal carries a question, which does not fit the stack. 0: the packet is too short. */
static __always_inline int sd_refusal_of(struct __sk_buff *skb, struct sd_refusal *r, __u32 *resolver,
                                         __u16 cport, __u16 rport, int client_is_dst)
{
    __builtin_memset(r, 0, sizeof(*r));
    __builtin_memcpy(r->resolver, resolver, sizeof(r->resolver));
    if (skb->protocol == bpf_htons(SD_ETH_P_IP)) {
        r->client[2] = bpf_htonl(0xffff);
        r->family = 4;
        if (bpf_skb_load_bytes(skb, client_is_dst ? 16 : 12, &r->client[3], 4) < 0) /* iphdr daddr/saddr */
            return 0;
    } else {
        r->family = 6;
        if (bpf_skb_load_bytes(skb, client_is_dst ? 24 : 8, r->client, 16) < 0) /* ipv6hdr daddr/saddr */
            return 0;
    }
    r->cport = cport;
    r->rport = rport;
    return 1;
}

/* A refused UDP query, queued for userspace to answer REFUSED in the resolver's name (the
 * client's send already failed with EPERM; dig and friends would wait for an answer). */
static __always_inline void sd_queue_refusal(struct __sk_buff *skb, struct sd_cgroup *pol, struct sd_pkt *p)
{
    __u32 tables = pol->tables;
    void *q = cg_refusals.lookup(&tables);
    __u32 slot = SD_SCRATCH_EGRESS;
    struct sd_scratch *s = scratch.lookup(&slot);
    if (!q || !s || !sd_refusal_of(skb, &s->ref, p->d.addr, p->sport, p->d.port, 0))
        return;
    s->ref.txid = p->txid;
    s->ref.flags = p->dns_flags;
    bpf_map_push_elem(q, &s->ref, BPF_EXIST);
}

/* The full judgement of a packet that did not take the fast path, on the parse results in
 * pp (and pp->dns: the query's verdict for a packet to a DNS port): one decision, one
 * record. A refused UDP query is queued for the refuser. */
static __always_inline int sd_egress_verdict(struct __sk_buff *skb, struct bpf_sock *sk, __u64 cgid,
                                             struct sd_cgroup *pol, struct sd_pkt *pp)
{
    struct sd_pkt p = *pp;
    int raw = sk->type == SD_SOCK_RAW;
    int judged = 0;
    __u8 verdict = SD_DENY;
    struct sd_why why = {};
    why.rule = SD_RULE_DEFAULT;
    __u8 kind = SD_KIND_PACKET;
    int dns = 0;
    if (!p.parsed) {
        why.rule = SD_RULE_MALFORMED;
    } else if (p.srcroute && !pol->allow_srcroute) {
        why.rule = SD_RULE_SRCROUTE;
    } else if (raw && !pol->allow_raw) {
        why.rule = SD_RULE_RAW;
        kind = SD_KIND_SOCKET;
    } else if (p.has_ports && p.sport == SD_DNS_PORT && !pol->serve_dns) {
        why.rule = SD_RULE_SERVE_DNS; /* an answer made in here must not teach anyone */
    } else {
        judged = !raw && sd_judged_match(sk, &p);
        verdict = SD_ALLOW;
        if (!judged)
            verdict = sd_decide_as(pol, &p.d, sd_judged_proto(pol, p.d.proto), SD_SCRATCH_EGRESS, &why);
        if (verdict == SD_ALLOW && p.dns) {
            dns = 1;
            kind = SD_KIND_DNS;
            verdict = p.dns_verdict;
            why.rule = p.dns_rule;
            why.name_id = p.dns_name_id;
            why.target_id = 0;
            why.flags = 0;
        }
        if (judged && !dns)
            return 1;
    }
    int ret = sd_verdict_return(cgid, pol, &p.d, verdict, &why, kind);
    if (!ret && p.dns && p.d.proto == IPPROTO_UDP)
        sd_queue_refusal(skb, pol, &p);
    if (ret && dns && why.name_id)
        sd_pending_put(cgid, pol->tables, p.d.addr, p.txid, why.name_id);
    if (ret && !judged && !raw && p.has_ports && !p.options)
        sd_judged_put(sk, &p.d, p.d.proto, SD_SK_JUDGED);
    if (ret && !raw && p.has_ports && !p.options && sd_peer_match(sk, p.d.addr, p.d.proto, p.d.port)) {
        struct sd_sk *st = sk_judged.sk_storage_get(sk, 0, 0);
        if (st && st->peer == SD_PEER_ALLOWED)
            st->sent_gen = st->peer_gen; /* the connected peer's first packet is recorded */
    }
    return ret;
}

/* Stage 1 of the full judgement: parse the packet into the egress pkt scratch. A packet to
 * a DNS port with data goes on in tail calls: the query parser (sd_egress_query), then the
 * verdict (sd_egress_dns); the rest is judged here. The name parser in a program of its
 * own keeps each program's verification small (sd_egress needed 825,508 processed
 * instructions of the kernel's 1,000,000 with it). */
static __always_inline int sd_egress_judge(struct __sk_buff *skb, struct bpf_sock *sk)
{
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(SD_SKB_ANCESTOR, bpf_skb_cgroup_id(skb), &cgid);
    if (!pol)
        return 1;
    __u32 slot = SD_PKT_EGRESS;
    struct sd_pkt *pp = pktscratch.lookup(&slot);
    if (!pp)
        return 0;
    __builtin_memset(pp, 0, sizeof(*pp));
    pp->parsed = sd_parse_pkt(skb, pp, 0);
    pp->cgid = cgid;
    /* a streamed TCP connection's queries were judged whole as they were written (stream
     * path, dns_stream.c): its segments need not start at a message */
    if (pp->parsed && pp->has_ports && pp->d.port == SD_DNS_PORT) {
        int c = sd_tcp_streamed(skb, pp);
        /* data in pages someone can still change is refused whatever its class (the stream
         * program's own pushes are copies: never shared) */
        pp->byref = sd_skb_byref(skb, pp);
        if (c != SD_STREAM_OWNED || pp->byref) {
            pp->unjudged = c == SD_STREAM_UNJUDGED;
            /* UDP GSO (UDP_SEGMENT, by setsockopt or per message): the kernel cuts this
             * skb into several datagrams after egress, each a message of its own for the
             * resolver, and only the first would be parsed (found by an attacker). TCP
             * segmentation keeps the byte stream the resolver reads as it was judged. */
            if (pp->d.proto != IPPROTO_TCP && skb->gso_size)
                pp->unjudged = 1;
            sd_egress_tails.call(skb, SD_ETAIL_QUERY);
            return 0; /* the query parser is missing: nothing to a DNS port leaves unjudged */
        }
    }
    return sd_egress_verdict(skb, sk, cgid, pol, pp);
}

/* The stage-1 results of this packet, and its policy again (by the cgroup stage 1 found). */
static __always_inline struct sd_pkt *sd_egress_stage(struct sd_cgroup **pol)
{
    __u32 slot = SD_PKT_EGRESS;
    struct sd_pkt *pp = pktscratch.lookup(&slot);
    *pol = pp ? sd_cgroup_of(pp->cgid) : 0;
    return *pol ? pp : 0;
}

/* Egress tail call 1: the query in a packet to a DNS port (sd_dns_query), then the verdict. */
int sd_egress_query(struct __sk_buff *skb)
{
    struct sd_cgroup *pol;
    struct sd_pkt *pp = sd_egress_stage(&pol);
    if (!pp)
        return 0;
    pp->dns = sd_dns_query(skb, pp, pp->cgid, pol);
    sd_egress_tails.call(skb, SD_ETAIL_VERDICT);
    return 0;
}

/* Egress tail call 2: the verdict on a packet to a DNS port. */
int sd_egress_dns(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;
    if (sk)
        sk = bpf_sk_fullsock(sk); /* stage 1 found a full socket */
    struct sd_cgroup *pol;
    struct sd_pkt *pp = sd_egress_stage(&pol);
    if (!pp || !sk)
        return 0;
    return sd_egress_verdict(skb, sk, pp->cgid, pol, pp);
}

/* Every packet that leaves a policed cgroup. */
int sd_egress(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return 1; /* timewait sockets: ACKs and RSTs of a closed connection */
    if (sk->state == BPF_TCP_LISTEN)
        return 1; /* a listener (the kernel runs SYN-ACKs of its request sockets as the listener's) */
    if (sk->type != SD_SOCK_RAW && sd_fast_pass(skb, sk))
        return 1;
    return sd_egress_judge(skb, sk);
}

/* The start of learning the answer in the message buffer, from resolver d: a response
 * (NOERROR, one question) to a pending question of this cgroup. Fills the walk's state in s
 * for sd_walk_answers; 0 when there is nothing to learn. Shared by the datagram path
 * (below) and the TCP answer stream (sd_dns_rx, dns_stream.c). */
static __always_inline int sd_answer_begin(struct sd_msgbuf *mb, __u64 cgid, __u32 tables, struct sd_dest *d,
                                           struct sd_scratch *s)
{
    __u8 hdr[SD_DNS_HDR];
    if (sd_mb_load(mb, 0, hdr, sizeof(hdr)) < 0)
        return 0;
    if (!(hdr[2] & 0x80) || (hdr[3] & 0x0f))
        return 0; /* not a response, or an error response */
    if (((hdr[4] << 8) | hdr[5]) != 1)
        return 0;
    __u32 wire_len = sd_parse_qname_mb(mb, SD_DNS_HDR, tables, s);
    if (!wire_len)
        return 0; /* not judged by name: its addresses are not learned */
    __u32 name_id = sd_known_name_id(tables, s);
    if (!sd_pending_take(tables, d->addr, ((__u16)hdr[0] << 8) | hdr[1], name_id, &s->who))
        return 0; /* no such question went to that resolver from here: nothing to learn */
    /* learned-as-denied only when a rule denies the name (a name that merely falls to the
     * default is judged at connect by CIDR rules and the default, as decide() does) */
    s->qverdict = (s->found && s->qv_verdict == SD_DENY) ? SD_DENY : SD_ALLOW;
    s->qrule = s->found ? s->qv_rule : SD_RULE_DEFAULT;
    s->aoff = SD_DNS_HDR + wire_len + 4;
    s->qend = s->aoff;
    s->naddr = 0;
    s->owner = 0;
    s->mixed = 0;
    s->cut = 0;
    s->a_left = (hdr[6] << 8) | hdr[7];
    s->cgid = cgid;
    s->tables = tables;
    s->name_id = name_id;
    s->family = d->family;
    s->proto = d->proto;
    __builtin_memcpy(s->resolver, d->addr, sizeof(s->resolver));
    return 1;
}

/* The ingress walk's state: its scratch slot and the message buffer (NULL if either is
 * missing, which cannot happen: both are arrays). */
static __always_inline struct sd_scratch *sd_walk_state(struct sd_msgbuf **mb)
{
    __u32 slot = SD_SCRATCH_INGRESS, zero = 0;
    *mb = msgbuf.lookup(&zero);
    return *mb ? scratch.lookup(&slot) : 0;
}

/* A tail call counted against the kernel's per-packet budget (s->tc). Returns only when
 * the program is missing or the budget is spent. */
static __always_inline void sd_tail(struct __sk_buff *skb, struct sd_scratch *s, __u32 index)
{
    s->tc = s->tc + 1;
    sd_tails.call(skb, index);
}

/* The resolver an answer walk is reading, as a destination for a record. */
static __always_inline void sd_walk_resolver(struct sd_scratch *s, struct sd_dest *d)
{
    __builtin_memcpy(d->addr, s->resolver, sizeof(d->addr));
    d->port = SD_DNS_PORT;
    d->proto = s->proto;
    d->family = s->family;
}

/* An answer with more than the walk covers (addresses, records, or TCP messages in one
 * segment): counted, and recorded in the cgroup's report (rule SD_RULE_ANSWER_CUT, the
 * queried name when known). */
static __always_inline void sd_record_cut(struct sd_scratch *s, __u32 name_id)
{
    sd_stat(SD_STAT_ANSWERS_CUT);
    struct sd_dest d = {};
    sd_walk_resolver(s, &d);
    struct sd_why why = {};
    why.rule = SD_RULE_ANSWER_CUT;
    why.name_id = name_id;
    sd_record(s->cgid, s->tables, &d, &why, SD_EV_ALLOWED, SD_KIND_DNS);
}

#include "dns_rx.h"

/* The walk's resolver, cgroup and budget into s, then the question (sd_dns_begin). */
static __always_inline void sd_answer_walk(struct __sk_buff *skb, struct sd_scratch *s, __u64 cgid, __u32 tables,
                                           struct sd_dest *d)
{
    s->cgid = cgid;
    s->tables = tables;
    s->family = d->family;
    s->proto = d->proto;
    __builtin_memcpy(s->resolver, d->addr, sizeof(s->resolver));
    sd_tail(skb, s, SD_TAIL_BEGIN);
}

int sd_dns_ingress(struct __sk_buff *skb)
{
    if (!sd_maybe_dns(skb, 0))
        return 1;
    __u32 pslot = SD_PKT_INGRESS;
    struct sd_pkt *p = pktscratch.lookup(&pslot);
    if (!p)
        return 1;
    __u32 off = sd_dns_locate(skb, p);
    if (!off)
        return 1;
    /* a policed process's DNS-over-TCP connection: its answers are followed as a stream */
    struct bpf_sock *sk = sd_rx_sk(skb);
    struct sd_sock *ss = sk ? sd_socks.sk_storage_get(sk, 0, 0) : 0;
    if (ss && ss->rx_on)
        return sd_rx_segment(skb, sk, ss, p, off);
    struct sd_dest d = p->d;
    if (d.proto == IPPROTO_TCP)
        off += 2; /* a connection not followed as a stream (made before the policy came): the
                   * message at the segment's start, after its 2-byte length */
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(SD_SKB_ANCESTOR, bpf_skb_cgroup_id(skb), &cgid);
    struct sd_msgbuf *mb;
    struct sd_scratch *s = sd_walk_state(&mb);
    if (!pol || !s || !mb)
        return 1;
    if (off >= skb->len || !sd_mb_fill(skb, mb, off, skb->len - off))
        return 1;
    s->tc = 0;
    s->rx_cuts = 0;
    s->rx = 0;
    sd_answer_walk(skb, s, cgid, pol->tables, &d);
    return 1; /* the programs are missing: nothing learned */
}

/* The question of the answer in msgbuf: start the walk when it answers a pending query. */
int sd_dns_begin(struct __sk_buff *skb)
{
    struct sd_msgbuf *mb;
    struct sd_scratch *s = sd_walk_state(&mb);
    if (!s || !mb)
        return 1;
    if (s->rx_cuts) { /* a message of this segment cut before this one */
        s->rx_cuts = 0;
        sd_record_cut(s, 0);
    }
    struct sd_dest d = {};
    __builtin_memcpy(d.addr, s->resolver, sizeof(d.addr));
    d.family = s->family;
    d.proto = s->proto;
    d.port = SD_DNS_PORT;
    if (sd_answer_begin(mb, s->cgid, s->tables, &d, s))
        sd_tail(skb, s, SD_TAIL_ANSWERS);
    return sd_rx_next(skb, s); /* nothing to learn from this one (or the walker is missing) */
}

/* Walk up to SD_RECORDS_PER_CALL answer records (the state is in the scratch slot s), then
 * go on in a tail call of the walker, or finish with sd_learn_answer. The walk goes on
 * while the tail calls it still needs (itself, the end, and the TCP stream's next message)
 * fit in the kernel's budget; records past that are cut. */
static __always_inline int sd_walk_answers(struct __sk_buff *skb, struct sd_msgbuf *mb, struct sd_scratch *s)
{
    for (int a = 0; a < SD_RECORDS_PER_CALL; a++) {
        __u32 left = s->a_left;
        if (left == 0)
            break;
        s->a_left = left - 1;
        if (!sd_answer_record(mb, s, SD_MAX_ANSWERS)) {
            if (!mb->trunc)
                return sd_rx_next(skb, s); /* malformed: nothing learned */
            s->cut = 1; /* the message goes on past what the buffer holds */
            s->a_left = 0;
            break;
        }
    }
    if (s->a_left) {
        if (s->tc + 3 + s->rx <= SD_TAIL_BUDGET) { /* itself, learn, store (and the stream's next) */
            sd_tail(skb, s, SD_TAIL_ANSWERS);
            return 1; /* the walker is missing: nothing learned */
        }
        s->cut = 1; /* more records than the walk covers */
    }
    sd_tail(skb, s, SD_TAIL_LEARN);
    return 1;
}

/* The end of an answer: report a cut, check the CNAME chain's end; 1 when its addresses are
 * to be learned (as s->l_verdict, s->l_rule, s->l_target: sd_dns_store). */
static __always_inline int sd_learn_answer(struct sd_msgbuf *mb, struct sd_scratch *s)
{
    __u64 cgid = s->cgid;
    __u32 tables = s->tables;
    s->l_drop = 0;
    if (s->cut)
        sd_record_cut(s, s->name_id);
    if (s->mixed)
        return 0; /* addresses of several other owners: learn none of them */
    /* addresses at the end of a CNAME chain: that name must not be a denied one in disguise */
    __u8 verdict = s->qverdict;
    __u16 rule = s->qrule;
    __u32 target_id = 0;
    __u32 chain_end = s->owner;
    if (chain_end) {
        if (!sd_parse_name_at(mb, chain_end, tables, s)) {
            verdict = SD_DENY; /* an owner we cannot read is not trusted */
            rule = SD_RULE_MALFORMED;
        } else if (s->found && s->qv_verdict == SD_DENY) {
            verdict = SD_DENY;
            rule = s->qv_rule;
            target_id = sd_name_id(cgid, tables, s); /* the report names the denied target too */
        }
    }
    s->l_verdict = verdict;
    s->l_rule = rule;
    s->l_target = target_id;
    /* a UDP answer whose chain ends in a denied name fails the lookup as the denied name's own
     * would: dropped, its client answered REFUSED (sd_block_answer). Over TCP the answer is
     * part of a stream: it goes on, its addresses learned as denied. */
    s->l_drop = target_id && !s->rx && s->proto == IPPROTO_UDP;
    return 1;
}

/* A UDP answer dropped (s->l_drop): recorded (the queried name and the denied chain end);
 * in enforce mode its client is answered REFUSED in the resolver's name by the refuser
 * (sd_queue_refusal's queue, with the question, which glibc wants repeated); in audit mode
 * it goes on, recorded as would-block. 1: drop it. */
static __always_inline int sd_block_answer(struct __sk_buff *skb, struct sd_msgbuf *mb, struct sd_scratch *s)
{
    struct sd_cgroup *pol = sd_cgroup_of(s->cgid);
    int audit = !pol || pol->mode == SD_MODE_AUDIT;
    struct sd_dest d = {};
    sd_walk_resolver(s, &d);
    struct sd_why why = {};
    why.rule = s->l_rule;
    why.name_id = s->name_id;
    why.target_id = s->l_target;
    /* received in whoever's context (the resolver's send on loopback, a softirq): the record
     * names the process that asked */
    sd_record_who(s->cgid, s->tables, &d, &why, audit ? SD_EV_WOULD_BLOCK : SD_EV_BLOCKED, SD_KIND_DNS, &s->who);
    if (audit)
        return 0;
    __u32 tables = s->tables;
    void *q = cg_refusals.lookup(&tables);
    __u32 pslot = SD_PKT_INGRESS; /* this packet's parse (sd_dns_ingress): its local port */
    struct sd_pkt *p = pktscratch.lookup(&pslot);
    __u8 hdr[3];
    if (q && p && sd_refusal_of(skb, &s->ref, s->resolver, p->sport, SD_DNS_PORT, 1) &&
        sd_mb_load(mb, 0, hdr, sizeof(hdr)) == 0) {
        s->ref.txid = ((__u16)hdr[0] << 8) | hdr[1];
        s->ref.flags = hdr[2];
        __u32 qlen = s->qend - SD_DNS_HDR;
        s->ref.qlen = qlen <= SD_REFUSAL_Q ? qlen : 0;
        _Static_assert(SD_DNS_HDR + SD_REFUSAL_Q <= 2 * SD_MSGBUF, "the question's copy stays in the buffer");
        if (bpf_probe_read_kernel(s->ref.q, SD_REFUSAL_Q, &mb->b[SD_DNS_HDR]) == 0)
            bpf_map_push_elem(q, &s->ref, BPF_EXIST);
    }
    return 1;
}

/* Learn the answer's addresses from s->l_next on, as sd_learn_answer decided, at most
 * SD_STORE_PER_CALL of them (each call is verified on its own: 256 iterations of the
 * loop in one program came near the verifier's limit). 1: more are left. */
static __always_inline int sd_store_answer(struct sd_scratch *s)
{
    __u64 cgid = s->cgid;
    __u32 name_id = s->name_id;
    __u32 target_id = s->l_target;
    __u8 verdict = s->l_verdict;
    __u16 rule = s->l_rule;
    __u32 first = s->l_next;
    for (int n = 0; n < SD_STORE_PER_CALL; n++) {
        __u32 i = first + n;
        if (i >= s->naddr || i >= SD_MAX_ANSWERS)
            return 0;
        _Static_assert(SD_MAX_ANSWERS == 256, "the address index mask is 0xff");
        asm volatile("%0 &= 0xff" : "+r"(i)); /* here, not hoisted: clang would index with first */
        sd_learn_via(cgid, s->addrs[i].a, name_id, target_id, verdict, rule, s->addrs[i].ttl);
    }
    s->l_next = first + SD_STORE_PER_CALL;
    return s->l_next < s->naddr;
}

int sd_dns_answers(struct __sk_buff *skb)
{
    struct sd_msgbuf *mb;
    struct sd_scratch *s = sd_walk_state(&mb);
    return s && mb ? sd_walk_answers(skb, mb, s) : 1;
}

int sd_dns_learn(struct __sk_buff *skb)
{
    struct sd_msgbuf *mb;
    struct sd_scratch *s = sd_walk_state(&mb);
    if (!s || !mb)
        return 1;
    if (sd_learn_answer(mb, s)) {
        if (s->l_drop)
            s->l_drop = sd_block_answer(skb, mb, s);
        s->l_next = 0;
        sd_tail(skb, s, SD_TAIL_STORE); /* returns only when sd_dns_store is missing */
        return !s->l_drop;
    }
    if (s->rx && s->tc < SD_TAIL_BUDGET)
        sd_tail(skb, s, SD_TAIL_RX); /* the budget was kept for it (sd_rx_walk) */
    return 1;
}

int sd_dns_store(struct __sk_buff *skb)
{
    struct sd_msgbuf *mb;
    struct sd_scratch *s = sd_walk_state(&mb);
    if (!s)
        return 1;
    if (sd_store_answer(s)) {
        if (s->tc + 1 + s->rx <= SD_TAIL_BUDGET)
            sd_tail(skb, s, SD_TAIL_STORE); /* the next SD_STORE_PER_CALL addresses */
        if (!s->cut)
            sd_record_cut(s, s->name_id); /* no budget left for the rest: not learned, and said so */
    }
    if (s->rx && s->tc < SD_TAIL_BUDGET)
        sd_tail(skb, s, SD_TAIL_RX); /* the budget was kept for it (sd_rx_walk) */
    return !s->l_drop; /* the last program of the walk decides the packet's fate */
}
