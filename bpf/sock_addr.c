/* safedeploy: cgroup socket programs — connect(2) for TCP/UDP and unconnected UDP
 * sendmsg(2), IPv4 and IPv6 (sock_addr), bind(2) to port 53 (sock_addr), socket(2) for raw
 * sockets and protocols the policy does not name (sock_create), source routes set with
 * setsockopt(2) (sockopt).
 * Returning 0 makes the syscall fail with EPERM at once. */
#include "safedeploy.h"

/* connect(2) of a UDP socket sends nothing: getaddrinfo() connects a UDP socket to each
 * candidate address to sort them (RFC 6724) and never sends. So it is not an attempt to
 * reach anyone, and it is not recorded, allowed or denied: the socket is marked, and egress
 * judges and records what it really sends. A denied peer's datagrams are all judged in full
 * (the first is refused with EPERM and recorded); an allowed peer's first datagram is
 * judged in full and recorded, the rest take the fast path. */
static __always_inline int sd_udp_connect(struct bpf_sock_addr *ctx, __u64 cgid, struct sd_cgroup *pol,
                                          struct sd_dest *d, __u8 jproto, struct sd_self *self)
{
    struct sd_why why = {};
    why.rule = SD_RULE_DEFAULT;
    __u8 verdict = sd_decide_as(pol, d, jproto, SD_SCRATCH_SOCK, &why);
    struct bpf_sock *sk = ctx->sk;
    struct sd_sk *st = sk ? sk_judged.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE) : 0;
    if (!st)
        return sd_verdict_return_as(cgid, pol, d, verdict, &why, SD_KIND_CONNECT, self); /* judged here, then */
    /* connected again: only the new peer's verdict counts. The generation first, then the
     * verdict: egress reads the verdict first (sd_dest_judged). */
    st->peer_gen = st->peer_gen + 1;
    st->peer = verdict == SD_ALLOW ? SD_PEER_ALLOWED : SD_PEER_DENIED;
    return 1;
}

static __always_inline int sd_sock_addr(struct bpf_sock_addr *ctx, struct sd_dest *d, __u8 kind)
{
    struct sd_self self;
    sd_self_current(&self);
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_SELF_POLICY(&self, &cgid);
    if (!pol)
        return 0; /* these programs run only for sockets of policed cgroups: a connect or send
                   * by a task under no policy (the kernel worker that opens an MPTCP subflow
                   * to an address a peer announced, a process the socket was handed to) is
                   * judged by no rule, so it is refused (unrecorded: no policy to record in) */
    __u32 proto = ctx->protocol;
    d->proto = proto == SD_IPPROTO_MPTCP ? IPPROTO_TCP : proto;
    if (!d->port)
        d->port = bpf_ntohs((__u16)ctx->user_port);
    if (kind == SD_KIND_CONNECT && d->proto == IPPROTO_UDP)
        return sd_udp_connect(ctx, cgid, pol, d, sd_judged_proto(pol, proto), &self);
    struct sd_why why = {};
    why.rule = SD_RULE_DEFAULT;
    __u8 verdict = sd_decide_as(pol, d, sd_judged_proto(pol, proto), SD_SCRATCH_SOCK, &why);
    int ret = sd_verdict_return_as(cgid, pol, d, verdict, &why, kind, &self);
    /* connect_error: the refusal's errno (else EPERM); an address only an unlisted name
     * resolved to (no rule covers the name, the default denies the address) has its own */
    __u32 err = pol->connect_errno;
    if (why.rule == SD_RULE_DEFAULT && why.unlisted)
        err = pol->unlisted_errno;
    if (!ret && err && err < 4096)
        bpf_set_retval(-(int)err);
    /* an unconnected send: remember where it was judged to go, for the egress fast path (a
     * connected socket's peer is its judged destination already) */
    if (ret && kind == SD_KIND_SENDMSG && (d->proto == IPPROTO_UDP || d->proto == SD_IPPROTO_UDPLITE)) {
        struct bpf_sock *sk = ctx->sk;
        if (sk)
            sd_judged_put(sk, d, d->proto, SD_SK_JUDGED);
    }
    return ret;
}

/* The address the kernel really uses for an unspecified IPv4 destination (0.0.0.0): the
 * socket's bound source address, else 127.0.0.1 (ip_route_output_key_hash_rcu). */
static __always_inline __u32 sd_any4(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    __u32 src = 0;
    if (sk) {
        if (sk->family == SD_AF_INET6) {
            if (SD_SK_U32(sk, src_ip6[0]) == 0 && SD_SK_U32(sk, src_ip6[1]) == 0 &&
                SD_SK_U32(sk, src_ip6[2]) == bpf_htonl(0xffff))
                src = SD_SK_U32(sk, src_ip6[3]);
        } else {
            src = sk->src_ip4;
        }
    }
    return src ? src : bpf_htonl(0x7f000001);
}

static __always_inline int sd_v4(struct bpf_sock_addr *ctx, __u8 kind)
{
    struct sd_dest d = {};
    d.addr[2] = bpf_htonl(0xffff);
    d.addr[3] = ctx->user_ip4;
    if (d.addr[3] == 0)
        d.addr[3] = sd_any4(ctx);
    d.family = 4;
    return sd_sock_addr(ctx, &d, kind);
}

/* The IPv6 address of a sock_addr call; ::ffff:a.b.c.d is the IPv4 address it is (family 4). */
static __always_inline void sd_dest6(struct bpf_sock_addr *ctx, struct sd_dest *d)
{
    d->addr[0] = ctx->user_ip6[0];
    d->addr[1] = ctx->user_ip6[1];
    d->addr[2] = ctx->user_ip6[2];
    d->addr[3] = ctx->user_ip6[3];
    d->family = sd_is_v4mapped(d->addr) ? 4 : 6;
}

static __always_inline int sd_v6(struct bpf_sock_addr *ctx, __u8 kind)
{
    struct sd_dest d = {};
    sd_dest6(ctx, &d);
    if (d.family == 4 && d.addr[3] == 0) {
        d.addr[3] = sd_any4(ctx); /* ::ffff:0.0.0.0 */
    } else if (d.family == 6 && !(d.addr[0] | d.addr[1] | d.addr[2] | d.addr[3])) {
        /* :: is ::1 (tcp_v6_connect, __ip6_datagram_connect, udpv6_sendmsg), or
         * 127.0.0.1 for a socket bound to a v4-mapped address */
        struct bpf_sock *sk = ctx->sk;
        if (sk && SD_SK_U32(sk, src_ip6[0]) == 0 && SD_SK_U32(sk, src_ip6[1]) == 0 &&
            SD_SK_U32(sk, src_ip6[2]) == bpf_htonl(0xffff)) {
            d.addr[2] = bpf_htonl(0xffff);
            d.addr[3] = bpf_htonl(0x7f000001);
            d.family = 4;
        } else {
            d.addr[3] = bpf_htonl(1);
        }
    }
    return sd_sock_addr(ctx, &d, kind);
}

/* Sockets that bypass connect/sendmsg rules or that the rules do not cover: raw IP sockets
 * (unless raw_sockets: allow) and IP protocols other than TCP, UDP, UDP-Lite and MPTCP
 * (ICMP ping sockets, SCTP, DCCP...) unless the policy names them in `protocols:`.
 * The egress program judges their packets too (e.g. a socket made before the policy). */
int sd_sock_create(struct bpf_sock *sk)
{
    __u32 proto = sk->protocol;
    int raw = sk->type == SD_SOCK_RAW;
    if (!raw && (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == SD_IPPROTO_UDPLITE ||
                 proto == SD_IPPROTO_MPTCP))
        return 1;
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_CURRENT_POLICY(&cgid);
    if (!pol)
        return 1;
    if (raw ? pol->allow_raw : sd_proto_named(pol, proto))
        return 1;
    struct sd_dest d = {};
    d.family = sk->family == SD_AF_INET6 ? 6 : 4;
    if (d.family == 4)
        d.addr[2] = bpf_htonl(0xffff); /* 0.0.0.0: no destination yet */
    d.proto = proto;
    return sd_rule_return(cgid, pol, &d, SD_DENY, raw ? SD_RULE_RAW : SD_RULE_PROTOCOL, SD_KIND_SOCKET);
}

/* sendmsg without an address on a connected UDP socket runs this hook too when the message
 * carries IP-level ancillary data (IP_TOS, IP_PKTINFO, IPV6_TCLASS...): the kernel then sends
 * to the socket's peer, and the hook sees 0.0.0.0:0 (an explicit port 0 fails with EINVAL
 * before the hook). Judge the peer, not the unspecified address. */
static __always_inline int sd_sendmsg_to_peer(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    __u16 port = bpf_ntohs((__u16)sk->dst_port);
    if (port == 0)
        return 1; /* no peer: the kernel refuses the send (EDESTADDRREQ) */
    struct sd_dest d = {};
    if (sk->family == SD_AF_INET6) {
        d.addr[0] = SD_SK_U32(sk, dst_ip6[0]);
        d.addr[1] = SD_SK_U32(sk, dst_ip6[1]);
        d.addr[2] = SD_SK_U32(sk, dst_ip6[2]);
        d.addr[3] = SD_SK_U32(sk, dst_ip6[3]);
        d.family = sd_is_v4mapped(d.addr) ? 4 : 6;
    } else {
        d.addr[2] = bpf_htonl(0xffff);
        d.addr[3] = sk->dst_ip4;
        d.family = 4;
    }
    d.port = port;
    return sd_sock_addr(ctx, &d, SD_KIND_SENDMSG);
}

int sd_connect4(struct bpf_sock_addr *ctx) { return sd_v4(ctx, SD_KIND_CONNECT); }
int sd_connect6(struct bpf_sock_addr *ctx) { return sd_v6(ctx, SD_KIND_CONNECT); }
int sd_sendmsg4(struct bpf_sock_addr *ctx)
{
    return ctx->user_port ? sd_v4(ctx, SD_KIND_SENDMSG) : sd_sendmsg_to_peer(ctx);
}
int sd_sendmsg6(struct bpf_sock_addr *ctx)
{
    return ctx->user_port ? sd_v6(ctx, SD_KIND_SENDMSG) : sd_sendmsg_to_peer(ctx);
}

/* bind(2) to port 53: a policed process must not answer DNS queries (its own or anyone's)
 * unless the policy says serve_dns: allow. Answers it could send would otherwise teach the
 * kernel any address for an allowed name. */
static __always_inline int sd_bind(struct bpf_sock_addr *ctx, struct sd_dest *d)
{
    if (ctx->user_port != bpf_htons(53))
        return 1;
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_CURRENT_POLICY(&cgid);
    if (!pol || pol->serve_dns)
        return 1;
    __u32 proto = ctx->protocol;
    d->proto = proto == SD_IPPROTO_MPTCP ? IPPROTO_TCP : proto;
    d->port = 53;
    return sd_rule_return(cgid, pol, d, SD_DENY, SD_RULE_SERVE_DNS, SD_KIND_BIND);
}

int sd_bind4(struct bpf_sock_addr *ctx)
{
    struct sd_dest d = {};
    d.addr[2] = bpf_htonl(0xffff);
    d.addr[3] = ctx->user_ip4;
    d.family = 4;
    return sd_bind(ctx, &d);
}

int sd_bind6(struct bpf_sock_addr *ctx)
{
    struct sd_dest d = {};
    sd_dest6(ctx, &d);
    return sd_bind(ctx, &d);
}

#define SD_SOL_IP 0
#define SD_SOL_SOCKET 1
#define SD_SO_ZEROCOPY 60
#define SD_SOL_IPV6 41
#define SD_IP_OPTIONS 4
#define SD_IPV6_2292PKTOPTIONS 6
#define SD_IPV6_2292RTHDR 5
#define SD_IPV6_RTHDR 57

/* setsockopt(2) of a source route: IP_OPTIONS with LSRR/SSRR, IPV6_RTHDR (any routing
 * type, segment routing included), IPV6_2292RTHDR and IPV6_2292PKTOPTIONS (which can carry
 * one). Refused with EPERM unless the policy says source_routes: allow. Per-message
 * ancillary data (IP_RETOPTS, IPV6_RTHDR cmsgs) is not seen here: egress drops those
 * packets.
 * Turning SO_ZEROCOPY on is refused always: MSG_ZEROCOPY sends the process's own pages,
 * which it can change after egress judged a DNS query in them and before they are read
 * (found by an attacker: a queue between the egress hook and the wire was enough). */
int sd_setsockopt(struct bpf_sockopt *ctx)
{
    int level = ctx->level;
    int name = ctx->optname;
    int bad = 0;
    if (level == SD_SOL_IP && name == SD_IP_OPTIONS) {
        __u32 slot = SD_OPTS_SOCKOPT;
        struct sd_opts *o = optscratch.lookup(&slot);
        if (!o)
            return 0;
        __u8 *p = ctx->optval;
        __u8 *end = ctx->optval_end;
        __u32 len = 0;
        for (int i = 0; i < 40; i++) {
            if (p + i + 1 > end)
                break;
            o->b[i] = p[i];
            len = i + 1;
        }
        o->len = len;
        if (ctx->optlen > 0 && len == 0)
            bad = 1; /* options we cannot see */
        else
            bad = sd_v4_srcroute(o);
    } else if (level == SD_SOL_IPV6 &&
               (name == SD_IPV6_RTHDR || name == SD_IPV6_2292RTHDR || name == SD_IPV6_2292PKTOPTIONS)) {
        bad = ctx->optlen > 0;
    }
    __u16 rule = SD_RULE_SRCROUTE;
    if (level == SD_SOL_SOCKET && name == SD_SO_ZEROCOPY) {
        __u8 *p = ctx->optval;
        __u8 *end = ctx->optval_end;
        bad = 1; /* on, or a value not seen */
        if (ctx->optlen >= 4 && p + 4 <= end && !(p[0] | p[1] | p[2] | p[3]))
            bad = 0; /* turning it off */
        rule = SD_RULE_ZEROCOPY;
    }
    if (!bad)
        return 1;
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_CURRENT_POLICY(&cgid);
    if (!pol || (rule == SD_RULE_SRCROUTE && pol->allow_srcroute))
        return 1;
    struct sd_dest d = {};
    struct bpf_sock *sk = ctx->sk;
    d.family = 4;
    if (sk) {
        d.family = sk->family == SD_AF_INET6 ? 6 : 4;
        d.proto = sk->protocol;
    }
    if (d.family == 4)
        d.addr[2] = bpf_htonl(0xffff);
    return sd_rule_return(cgid, pol, &d, SD_DENY, rule, SD_KIND_SOCKOPT);
}
