/* safedeploy: cgroup socket programs — connect(2) for TCP/UDP and unconnected UDP
 * sendmsg(2), IPv4 and IPv6 (sock_addr), and socket(2) for raw sockets (sock_create).
 * Returning 0 makes the syscall fail with EPERM at once. */
#include "safedeploy.h"

static __always_inline int sd_sock_addr(struct bpf_sock_addr *ctx, struct sd_dest *d, __u8 kind)
{
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(sd_current_ancestor_cgroup_id, &cgid);
    if (!pol)
        return 1;
    __u32 proto = ctx->protocol;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return 1; /* other protocols are out of scope of connect/sendmsg rules */
    d->proto = proto;
    d->port = bpf_ntohs((__u16)ctx->user_port);
    return sd_enforce(cgid, pol, d, SD_SCRATCH_SOCK, kind);
}

static __always_inline int sd_v4(struct bpf_sock_addr *ctx, __u8 kind)
{
    struct sd_dest d = {};
    d.addr[2] = bpf_htonl(0xffff);
    d.addr[3] = ctx->user_ip4;
    d.family = 4;
    return sd_sock_addr(ctx, &d, kind);
}

static __always_inline int sd_v6(struct bpf_sock_addr *ctx, __u8 kind)
{
    struct sd_dest d = {};
    d.addr[0] = ctx->user_ip6[0];
    d.addr[1] = ctx->user_ip6[1];
    d.addr[2] = ctx->user_ip6[2];
    d.addr[3] = ctx->user_ip6[3];
    /* ::ffff:a.b.c.d is judged as the IPv4 address it is */
    d.family = sd_is_v4mapped(d.addr) ? 4 : 6;
    return sd_sock_addr(ctx, &d, kind);
}

/* Raw IP sockets write their own headers past every connect/sendmsg rule: refused at
 * creation unless the policy allows them (the egress program drops their packets too). */
int sd_sock_create(struct bpf_sock *sk)
{
    if (sk->type != SD_SOCK_RAW)
        return 1;
    __u64 cgid = 0;
    struct sd_cgroup *pol = SD_FIND_POLICY(sd_current_ancestor_cgroup_id, &cgid);
    if (!pol || pol->allow_raw)
        return 1;
    struct sd_dest d = {};
    d.family = sk->family == 10 /* AF_INET6 */ ? 6 : 4;
    if (d.family == 4)
        d.addr[2] = bpf_htonl(0xffff); /* 0.0.0.0: no destination yet */
    d.proto = sk->protocol;
    return sd_rule_return(cgid, pol, &d, SD_DENY, SD_RULE_RAW, SD_KIND_SOCKET);
}

int sd_connect4(struct bpf_sock_addr *ctx) { return sd_v4(ctx, SD_KIND_CONNECT); }
int sd_connect6(struct bpf_sock_addr *ctx) { return sd_v6(ctx, SD_KIND_CONNECT); }
int sd_sendmsg4(struct bpf_sock_addr *ctx) { return sd_v4(ctx, SD_KIND_SENDMSG); }
int sd_sendmsg6(struct bpf_sock_addr *ctx) { return sd_v6(ctx, SD_KIND_SENDMSG); }
