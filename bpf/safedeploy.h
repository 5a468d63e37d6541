/* safedeploy: what every BPF program includes (bcc dialect) — the ABI, the maps, process
 * capture, and the decision: find a cgroup's policy, judge a destination, record it.
 *
 * Programs are compiled once, pinned under $SAFEDEPLOY_BPFFS/<source-hash>/ and shared
 * by every policed cgroup. A program finds the policy by walking the ancestors of the
 * current cgroup (nested cgroups inherit their container's policy), then that cgroup's
 * own maps through the outer cg_* maps (maps.h). decide() in ocihook/policy.py is the
 * reference for every verdict here.
 */
#ifndef SAFEDEPLOY_H
#define SAFEDEPLOY_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "abi.h"
#include "maps.h"
#include "proc.h"

/* bcc 0.26's helpers.h lacks this one (helper 123, kernel 5.7+) */
static __u64 (*sd_current_ancestor_cgroup_id)(int level) =
    (void *)BPF_FUNC_get_current_ancestor_cgroup_id;

#define SD_SOCK_RAW 3

static __always_inline void sd_stat(__u32 idx)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline struct sd_cgroup *sd_cgroup_of(__u64 id)
{
    return cgroups.lookup(&id);
}

/* The policy of the nearest policed ancestor (or the cgroup itself). SELF is the cgroup's
 * own id (bpf_get_current_cgroup_id(), bpf_skb_cgroup_id(skb)): a process or socket of the
 * policed cgroup itself, the usual case, costs one lookup. Else ANCESTOR(level)
 * (sd_current_ancestor_cgroup_id, bpf_skb_ancestor_cgroup_id) is walked from the deepest
 * level up, and the first policed one wins. */
#define SD_FIND_POLICY(ANCESTOR, SELF, cgid_out)                             \
    ({                                                                       \
        __u64 self_ = (SELF);                                                \
        struct sd_cgroup *found_ = sd_cgroup_of(self_);                      \
        if (found_) {                                                        \
            *(cgid_out) = self_;                                             \
        } else {                                                             \
            _Pragma("unroll") for (int lvl_ = SD_MAX_DEPTH - 1; lvl_ >= 0; lvl_--) { \
                __u64 id_ = ANCESTOR(lvl_); /* 0 below the cgroup's own level */ \
                if (!id_)                                                    \
                    continue;                                                \
                struct sd_cgroup *p_ = sd_cgroup_of(id_);                    \
                if (p_) {                                                    \
                    found_ = p_; /* the deepest policed one: done */         \
                    *(cgid_out) = id_;                                       \
                    break;                                                   \
                }                                                            \
            }                                                                \
        }                                                                    \
        found_;                                                              \
    })
#define SD_CURRENT_POLICY(cgid_out) SD_FIND_POLICY(sd_current_ancestor_cgroup_id, bpf_get_current_cgroup_id(), cgid_out)
/* the same for a task already read (sd_self_current) */
#define SD_SELF_POLICY(self, cgid_out) SD_FIND_POLICY(sd_current_ancestor_cgroup_id, (self)->cgid, cgid_out)

static __always_inline int sd_is_v4mapped(const __u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

/* Best of two CIDR matches: longest prefix, then deny, then lowest rule index. */
static __always_inline struct sd_cidr_val *sd_better(struct sd_cidr_val *a, struct sd_cidr_val *b)
{
    if (!a)
        return b;
    if (!b)
        return a;
    if (a->plen != b->plen)
        return a->plen > b->plen ? a : b;
    if (a->verdict != b->verdict)
        return a->verdict == SD_DENY ? a : b;
    return a->rule <= b->rule ? a : b;
}

struct sd_dest {
    __u32 addr[4];
    __u16 port;
    __u8 proto;
    __u8 family;
};

/* Why a verdict: the deciding rule and what the report says about the name behind it. */
struct sd_why {
    __u16 rule;         /* rule index, or SD_RULE_* */
    __u8 flags;         /* SD_EVF_* */
    __u8 unlisted;      /* 1: the address was learned (TTL not passed) from a lookup of a name
                         * no rule covers: a refusal by the default has its own errno */
    __u32 name_id;      /* the name the address was learned from (qnames id), or 0 */
    __u32 target_id;    /* the denied CNAME target behind a deny, or 0 */
};

/* Best of two name matches: the longer (more specific) name, then deny, then the lowest
 * rule index. */
static __always_inline struct sd_name_val *sd_better_name(struct sd_name_val *a, struct sd_name_val *b)
{
    if (!a)
        return b;
    if (!b)
        return a;
    if (a->nlen != b->nlen)
        return a->nlen > b->nlen ? a : b;
    if (a->verdict != b->verdict)
        return a->verdict == SD_DENY ? a : b;
    return a->rule <= b->rule ? a : b;
}

/* The name rule deciding a connection to an address learned from the name q: the most
 * specific rule for (proto, port) or for (proto, any port). The trie key is built in the
 * caller's per-CPU scratch slot (too big for the stack). */
static __always_inline int sd_name_verdict(__u32 tables, struct sd_name_key *q, __u8 proto, __u16 port,
                                           __u32 slot, struct sd_name_val *out)
{
    void *names = cg_names.lookup(&tables);
    struct sd_scratch *s = scratch.lookup(&slot);
    if (!names || !s)
        return 0;
    __builtin_memcpy(&s->key, q, sizeof(s->key));
    s->key.proto = proto;
    s->key.port = port;
    struct sd_name_val *by_port = bpf_map_lookup_elem(names, &s->key);
    s->key.port = 0;
    struct sd_name_val *any_port = bpf_map_lookup_elem(names, &s->key);
    struct sd_name_val *best = sd_better_name(by_port, any_port);
    if (!best)
        return 0;
    *out = *best;
    return 1;
}

/* Verdict of the policy pol for dest (decide() in ocihook/policy.py is the reference);
 * *why receives the deciding rule and the learned name. slot: the caller's per-CPU scratch
 * slot. */
static __always_inline __u8 sd_decide(struct sd_cgroup *pol, struct sd_dest *d, __u32 slot, struct sd_why *why)
{
    __u32 tables = pol->tables;
    struct sd_addr a = {};
    __builtin_memcpy(a.addr, d->addr, sizeof(a.addr));
    if (pol->has_resolvers && d->port == 53) {
        void *resolvers = cg_resolvers.lookup(&tables);
        why->rule = SD_RULE_RESOLVERS;
        return resolvers && bpf_map_lookup_elem(resolvers, &a) ? SD_ALLOW : SD_DENY;
    }
    struct sd_cidr_val *best = 0;
    void *cidrs = cg_cidrs.lookup(&tables);
    if (cidrs) {
        struct sd_cidr_key k = {};
        k.prefixlen = SD_CIDR_FIXED_BITS + 128;
        k.proto = d->proto;
        k.port = d->port;
        __builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
        struct sd_cidr_val *by_port = bpf_map_lookup_elem(cidrs, &k);
        k.port = 0;
        struct sd_cidr_val *any_port = bpf_map_lookup_elem(cidrs, &k);
        best = sd_better(by_port, any_port);
    }

    /* the name this address was learned from (a DNS answer), while its TTL lasts */
    struct sd_name_val nv = {};
    int have_name = 0;
    void *learned = cg_learned.lookup(&tables);
    struct sd_learned *l = learned ? bpf_map_lookup_elem(learned, &a) : 0;
    if (l) {
        why->name_id = l->name_id;
        if (l->expires_ns < bpf_ktime_get_boot_ns()) {
            why->flags |= SD_EVF_EXPIRED; /* named in the report, judged without it */
        } else if (l->verdict == SD_DENY) {
            /* learned from an answer that involved a denied name (e.g. through a CNAME) */
            why->target_id = l->target_id;
            nv.rule = l->rule;
            nv.verdict = SD_DENY;
            have_name = 1;
        } else {
            why->unlisted = l->rule == SD_RULE_DEFAULT; /* the question matched no rule */
            __u32 id = l->name_id;
            void *qnames = cg_qnames.lookup(&tables);
            struct sd_name_key *q = qnames ? bpf_map_lookup_elem(qnames, &id) : 0;
            if (q)
                have_name = sd_name_verdict(tables, q, d->proto, d->port, slot, &nv);
        }
    }
    if (have_name && best) {
        /* both decide: if they agree the name rule decides, else the deny one */
        if (nv.verdict == best->verdict || nv.verdict == SD_DENY) {
            why->rule = nv.rule;
            return nv.verdict;
        }
        why->rule = best->rule;
        return best->verdict;
    }
    if (have_name) {
        why->rule = nv.rule;
        return nv.verdict;
    }
    if (best) {
        why->rule = best->rule;
        return best->verdict;
    }
    why->rule = SD_RULE_DEFAULT;
    return pol->dflt;
}

/* Does the task running on this CPU belong to the policed cgroup? Not always: packets
 * sent in softirq context (TCP retransmissions, timers, ACKs) run on whatever task the
 * CPU interrupted. Only a task inside the cgroup is named in a record. */
static __always_inline int sd_current_in(__u64 cgid)
{
    if (bpf_get_current_cgroup_id() == cgid)
        return 1;
    _Pragma("unroll") for (int lvl = 0; lvl < SD_MAX_DEPTH; lvl++) {
        __u64 id = sd_current_ancestor_cgroup_id(lvl);
        if (!id)
            break;
        if (id == cgid)
            return 1;
    }
    return 0;
}

/* Decisions made in the calling task's own syscall (connect, sendmsg, bind, setsockopt),
 * whose policy was found through that task's cgroup: the task is in the cgroup, no need to
 * ask (a helper call less per connect). Packets and streams may be sent by anyone. */
#define SD_KIND_BY_TASK(kind) \
    ((kind) == SD_KIND_CONNECT || (kind) == SD_KIND_SENDMSG || (kind) == SD_KIND_BIND || (kind) == SD_KIND_SOCKOPT)

/* Count a decision exactly (cgstats) and keep its details (events or blocked map of the
 * cgroup, in its table set `tables`) while its quota lasts. who: the process an answer's
 * query came from; self: the current task, already read by a program judging its own
 * syscall; neither: the current task if it belongs to the cgroup, else no process. */
static __always_inline void sd_record_as(__u64 cgid, __u32 tables, struct sd_dest *d, struct sd_why *why, __u8 ev,
                                         __u8 kind, struct sd_pending_val *who, struct sd_self *self)
{
    struct sd_cgstats *st = cgstats.lookup(&cgid);
    if (st) {
        if (ev == SD_EV_ALLOWED)
            __sync_fetch_and_add(&st->allowed, 1);
        else if (ev == SD_EV_BLOCKED)
            __sync_fetch_and_add(&st->blocked, 1);
        else
            __sync_fetch_and_add(&st->would_block, 1);
    }
    struct sd_event_key k = {};
    __builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
    /* who: a process named by the caller (an answer's asker), else the current task when
     * it belongs to the cgroup */
    int mine = who ? who->pid != 0 : self || SD_KIND_BY_TASK(kind) || sd_current_in(cgid);
    if (who) {
        k.pid = who->pid;
        k.pstart = who->pstart;
    } else if (self) {
        k.pid = self->pid;
        k.pstart = self->pstart;
    } else if (mine) {
        struct sd_self cur;
        sd_self_current(&cur);
        k.pid = cur.pid;
        k.pstart = cur.pstart;
    }
    k.port = d->port;
    k.rule = why->rule;
    k.verdict = ev;
    k.kind = kind;
    k.proto = d->proto;
    k.family = d->family;
    k.name_id = why->name_id;
    k.target_id = why->target_id;
    k.flags = why->flags;
    __u64 now = bpf_ktime_get_boot_ns();
    void *m;
    if (ev != SD_EV_ALLOWED) {
        struct sd_live *live_ev = live.ringbuf_reserve(sizeof(struct sd_live));
        if (live_ev) {
            live_ev->cgid = cgid;
            __builtin_memcpy(&live_ev->k, &k, sizeof(k));
            live_ev->ts_ns = now;
            if (who)
                __builtin_memcpy(live_ev->comm, who->comm, sizeof(live_ev->comm));
            else if (mine)
                bpf_get_current_comm(&live_ev->comm, sizeof(live_ev->comm));
            live.ringbuf_submit(live_ev, 0);
        } else {
            sd_stat(SD_STAT_LIVE_UNREAD);
        }
        m = cg_blocked.lookup(&tables);
    } else {
        m = cg_events.lookup(&tables);
    }
    if (!m)
        return;
    struct sd_event_val *v = bpf_map_lookup_elem(m, &k);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        v->last_ns = now;
        return;
    }
    struct sd_event_val nv = {};
    nv.count = 1;
    nv.first_ns = now;
    nv.last_ns = now;
    if (who && mine) { /* captured when it asked */
        nv.uid = who->uid;
        __builtin_memcpy(nv.comm, who->comm, sizeof(nv.comm));
    } else if (mine) {
        nv.uid = (__u32)bpf_get_current_uid_gid();
        bpf_get_current_comm(&nv.comm, sizeof(nv.comm));
        sd_capture_proc(cgid, tables, k.pid, k.pstart);
    } else {
        nv.uid = 0xffffffff; /* no process: a packet the kernel sent on the cgroup's behalf */
    }
    if (bpf_map_update_elem(m, &k, &nv, BPF_NOEXIST) != 0) {
        v = bpf_map_lookup_elem(m, &k); /* lost a race with another CPU */
        if (v) {
            __sync_fetch_and_add(&v->count, 1);
        } else {
            sd_stat(SD_STAT_EVENTS_DROPPED);
            if (st) {
                if (ev == SD_EV_ALLOWED)
                    __sync_fetch_and_add(&st->events_dropped, 1);
                else
                    __sync_fetch_and_add(&st->blocked_dropped, 1);
            }
        }
    }
}

static __always_inline void sd_record_who(__u64 cgid, __u32 tables, struct sd_dest *d, struct sd_why *why, __u8 ev,
                                          __u8 kind, struct sd_pending_val *who)
{
    sd_record_as(cgid, tables, d, why, ev, kind, who, 0);
}

static __always_inline void sd_record(__u64 cgid, __u32 tables, struct sd_dest *d, struct sd_why *why, __u8 ev, __u8 kind)
{
    sd_record_as(cgid, tables, d, why, ev, kind, 0, 0);
}

/* Record, and turn the verdict into the program's return value (1 pass, 0 EPERM). self: the
 * current task when already read (else 0). */
static __always_inline int sd_verdict_return_as(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 verdict,
                                                struct sd_why *why, __u8 kind, struct sd_self *self)
{
    sd_stat(SD_STAT_DECISIONS);
    if (verdict == SD_ALLOW) {
        sd_record_as(cgid, pol->tables, d, why, SD_EV_ALLOWED, kind, 0, self);
        return 1;
    }
    sd_stat(SD_STAT_DENIED);
    if (pol->mode == SD_MODE_AUDIT) {
        sd_record_as(cgid, pol->tables, d, why, SD_EV_WOULD_BLOCK, kind, 0, self);
        return 1;
    }
    sd_record_as(cgid, pol->tables, d, why, SD_EV_BLOCKED, kind, 0, self);
    return 0;
}

static __always_inline int sd_verdict_return(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 verdict,
                                             struct sd_why *why, __u8 kind)
{
    return sd_verdict_return_as(cgid, pol, d, verdict, why, kind, 0);
}

/* A verdict with only a rule behind it (no name). */
static __always_inline int sd_rule_return(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 verdict,
                                          __u16 rule, __u8 kind)
{
    struct sd_why why = {};
    why.rule = rule;
    return sd_verdict_return(cgid, pol, d, verdict, &why, kind);
}

#define SD_AF_INET6 10

static __always_inline void sd_judged_put(struct bpf_sock *sk, struct sd_dest *d, __u8 proto, __u8 flags)
{
    struct sd_sk *st = sk_judged.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return;
    __builtin_memcpy(st->addr, d->addr, sizeof(st->addr));
    st->port = d->port;
    st->proto = proto;
    st->flags = flags; /* the peer fields are not touched: see struct sd_sk */
}

/* A 32-bit field of a struct bpf_sock at its own offset (clang would otherwise compute
 * a pointer into the socket, which the verifier refuses). */
#define SD_SK_U32(sk, field)                                                                  \
    ({                                                                                        \
        __u32 v_;                                                                             \
        asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(v_) : "r"(sk), "i"(__builtin_offsetof(struct bpf_sock, field))); \
        v_;                                                                                   \
    })

/* Does the policy name this IP protocol in `protocols:`? */
static __always_inline int sd_proto_named(struct sd_cgroup *pol, __u32 proto)
{
    if (proto > 255)
        return 0;
    return (pol->protos[(proto >> 3) & 31] >> (proto & 7)) & 1;
}

/* The protocol rules are looked up with: UDP-Lite is judged as UDP, MPTCP as TCP, and a
 * protocol the policy names by the rules without ports or protocol (SD_PROTO_OTHER).
 * 0: a protocol the policy does not name. */
static __always_inline __u8 sd_judged_proto(struct sd_cgroup *pol, __u32 proto)
{
    if (proto == IPPROTO_TCP || proto == SD_IPPROTO_MPTCP)
        return IPPROTO_TCP;
    if (proto == IPPROTO_UDP || proto == SD_IPPROTO_UDPLITE)
        return IPPROTO_UDP;
    return sd_proto_named(pol, proto) ? SD_PROTO_OTHER : 0;
}

/* sd_decide for a destination whose protocol is judged as another one (d->proto is what
 * the record shows, jproto what the rules are looked up with; 0: not named, denied). */
static __always_inline __u8 sd_decide_as(struct sd_cgroup *pol, struct sd_dest *d, __u8 jproto, __u32 slot,
                                        struct sd_why *why)
{
    if (!jproto) {
        why->rule = SD_RULE_PROTOCOL;
        return SD_DENY;
    }
    struct sd_dest j = *d;
    j.proto = jproto;
    if (jproto == SD_PROTO_OTHER)
        j.port = 0;
    return sd_decide(pol, &j, slot, why);
}

/* IPv4 options: is there a loose or strict source route (LSRR 0x83, SSRR 0x89)? Options
 * that cannot be walked count as one. o->b holds o->len (<= 40) bytes. */
static __always_inline int sd_v4_srcroute(struct sd_opts *o)
{
    o->i = 0;
    for (int n = 0; n < 40; n++) {
        __u32 i = o->i;
        if (i >= o->len || i >= 40)
            break;
        __u8 t = o->b[i & SD_OPTS_MASK];
        if (t == 0)
            break;
        if (t == 1) {
            o->i = i + 1;
            continue;
        }
        if (t == 0x83 || t == 0x89)
            return 1;
        if (i + 1 >= o->len)
            return 1;
        __u8 l = o->b[(i + 1) & SD_OPTS_MASK];
        if (l < 2)
            return 1;
        o->i = i + l;
    }
    return 0;
}

#endif /* SAFEDEPLOY_H */
