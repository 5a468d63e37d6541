/* safedeploy: the one header shared by every BPF program (bcc dialect).
 *
 * Every struct here is mirrored once in userspace, in ocihook/maps.py; a kernel test
 * compares the two layouts with what bcc compiled. Change both together.
 *
 * Programs are compiled once, pinned under $SAFEDEPLOY_BPFFS/<source-hash>/ and shared
 * by every policed cgroup. Per-cgroup state lives in the maps below, keyed by the id of
 * the cgroup the policy was applied to; a program finds it by walking the ancestors of
 * the current cgroup, so nested cgroups inherit their container's policy.
 */
#ifndef SAFEDEPLOY_H
#define SAFEDEPLOY_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

/* bcc 0.26's helpers.h lacks this one (helper 123, kernel 5.7+) */
static __u64 (*sd_current_ancestor_cgroup_id)(int level) =
    (void *)BPF_FUNC_get_current_ancestor_cgroup_id;

#define SD_MAX_DEPTH 16          /* cgroup levels walked to find a policy */
#define SD_RULE_DEFAULT 0xffff   /* event/verdict came from the policy default */
#define SD_RULE_RESOLVERS 0xfffe /* event/verdict came from dns.resolvers */
#define SD_RULE_MALFORMED 0xfffd /* a DNS query the kernel could not parse */
#define SD_RULE_RAW 0xfffc       /* raw_sockets: deny */
#define SD_RULE_SRCROUTE 0xfffb  /* source_routes: deny (IPv6 routing header, IPv4 LSRR/SSRR) */
#define SD_RULE_PROTOCOL 0xfffa  /* an IP protocol the policy does not name in protocols */
#define SD_RULE_SERVE_DNS 0xfff9 /* serve_dns: deny (bind to / send from port 53) */
#define SD_RULE_ANSWER_CUT 0xfff8 /* a DNS answer with more addresses than the kernel learns */

#define SD_ALLOW 0
#define SD_DENY 1

#define SD_MODE_ENFORCE 0
#define SD_MODE_AUDIT 1

#define SD_EV_ALLOWED 0
#define SD_EV_BLOCKED 1
#define SD_EV_WOULD_BLOCK 2

#define SD_KIND_CONNECT 1
#define SD_KIND_SENDMSG 2
#define SD_KIND_DNS 3
#define SD_KIND_SOCKET 4    /* a raw socket: its creation or its packets */
#define SD_KIND_PACKET 5    /* a packet judged at egress by its real destination */
#define SD_KIND_BIND 6      /* bind(2) to port 53 */
#define SD_KIND_SOCKOPT 7   /* setsockopt(2) of a source route */
#define SD_SOCK_RAW 3

#define SD_PROTO_OTHER 255  /* rule entries for IP protocols other than TCP and UDP */
#define SD_IPPROTO_UDPLITE 136
#define SD_IPPROTO_MPTCP 262

#define SD_STAT_EVENTS_DROPPED 0
#define SD_STAT_DECISIONS 1
#define SD_STAT_DENIED 2
#define SD_STAT_DNS_MALFORMED 3
#define SD_STAT_LIVE_UNREAD 4   /* live events not taken because nobody runs `watch` */
#define SD_STAT_ANSWERS_CUT 5   /* DNS answers with more address records than SD_MAX_ANSWERS */
#define SD_NSTATS 6

/* cgroups: u64 cgroup id -> policy header of the cgroup the policy was applied to */
struct sd_cgroup {
    __u8 mode;          /* SD_MODE_* */
    __u8 dflt;          /* SD_ALLOW | SD_DENY: verdict when no rule applies */
    __u8 has_resolvers; /* 1: port-53 traffic only to the resolvers map */
    __u8 name_denies;   /* 1: the policy denies some name (unparseable queries are dropped) */
    __u8 allow_raw;     /* 1: raw IP sockets are allowed (they bypass connect/sendmsg rules) */
    __u8 allow_srcroute; /* 1: source-routed packets (IPv6 routing headers, IPv4 LSRR/SSRR) may leave */
    __u8 serve_dns;     /* 1: the cgroup may bind port 53 and send from it */
    __u8 pad;
    __u8 protos[32];    /* bitmap of the IP protocols (other than TCP/UDP) the policy names */
};

/* cidrs: LPM trie. The fixed part (proto, pad, port, cgid: 96 bits) always matches in
 * full; prefixlen = 96 + the rule's prefix in the IPv6 (v4-mapped) address space. port 0
 * holds rules that cover every port; tcp and udp are separate entries. */
struct sd_cidr_key {
    __u32 prefixlen;
    __u8 proto;         /* IPPROTO_TCP | IPPROTO_UDP */
    __u8 pad;
    __u16 port;         /* host order; 0 = any port */
    __u64 cgid;
    __u32 addr[4];      /* network order; IPv4 as ::ffff:a.b.c.d */
};
#define SD_CIDR_FIXED_BITS 96

struct sd_cidr_val {
    __u16 rule;         /* index of the rule in the policy */
    __u8 verdict;       /* SD_ALLOW | SD_DENY */
    __u8 plen;          /* the rule's prefix length (0..128) */
};

/* resolvers: (cgid, address) -> 1, consulted for port 53 when has_resolvers */
struct sd_addr_key {
    __u64 cgid;
    __u32 addr[4];
};

/* events: aggregation of decisions, drained into the report. Nothing is lost while no
 * one listens; a full map counts SD_STAT_EVENTS_DROPPED instead. */
struct sd_event_key {
    __u64 cgid;         /* cgroup the policy belongs to */
    __u32 addr[4];
    __u32 pid;          /* tgid */
    __u16 port;         /* host order */
    __u16 rule;
    __u8 verdict;       /* SD_EV_* */
    __u8 kind;          /* SD_KIND_* */
    __u8 proto;
    __u8 family;        /* 4 | 6 */
    __u32 name_id;      /* 0, or a key of the names map (DNS) */
};

struct sd_event_val {
    __u64 count;
    __u64 first_ns;     /* CLOCK_BOOTTIME */
    __u64 last_ns;
    __u32 uid;
    __u32 pad;
    char comm[16];
};

/* names: name rules by FNV-1a-64 hash of the *reversed* lower-case base name.
 * proto 0 / port 0 with SD_NAME_QUERY: the verdict for a DNS query of that name;
 * proto tcp|udp, port 0 (any) or a port: the verdict for connections to it. */
struct sd_name_key {
    __u64 cgid;
    __u64 hash;
    __u8 kind;          /* SD_NAME_EXACT | SD_NAME_WILD */
    __u8 proto;         /* 0 for the query verdict */
    __u16 port;
    __u32 pad;
};
#define SD_NAME_EXACT 1
#define SD_NAME_WILD 2

struct sd_name_val {
    __u16 rule;
    __u8 verdict;
    __u8 pad;
};

#define SD_NAME_BUF 256     /* wire-format name buffer (a DNS name is at most 255 bytes) */
#define SD_NAME_MAX 253     /* dotted text */
#define SD_MAX_SUFFIXES 16  /* names with more labels are not learned */

/* qnames: (cgid, name id) -> a queried name: text for reports, suffix hashes (shortest
 * first; the last one is the full name) for judging connects to its learned addresses */
struct sd_qname_key {
    __u64 cgid;
    __u32 name_id;      /* low 32 bits of the full name's hash */
    __u32 pad;
};
struct sd_qname {
    __u64 hashes[SD_MAX_SUFFIXES];
    __u32 nhash;        /* 0: too many labels to judge connects by name */
    __u32 len;
    char name[SD_NAME_BUF];
};

/* learned: (cgid, address) -> the name whose answer carried it, until the TTL ends */
struct sd_learned {
    __u64 expires_ns;   /* CLOCK_BOOTTIME */
    __u32 name_id;
    __u8 verdict;       /* deny when the queried name or a name in its CNAME chain is denied;
                         * a deny is never overwritten before it expires */
    __u8 pad;
    __u16 rule;         /* the rule behind a deny */
};
#define SD_TTL_MIN_S 2
#define SD_TTL_MAX_S 86400

/* Addresses learned per DNS answer. A UDP answer of at most 4096 bytes (the EDNS size
 * resolvers use) holds at most (4096 - 12 - 5 - 2) / 16 = 254 A records (2-byte compressed
 * owner, 10-byte record header, 4 bytes of address); an answer with more address records
 * (only possible over TCP) is cut, counted (SD_STAT_ANSWERS_CUT) and reported. */
#define SD_MAX_ANSWERS 256
#define SD_RECORDS_PER_CALL 16  /* answer records walked per program run (bpf/dns_skb.c) */
#define SD_MAX_CALLS 30         /* tail calls of the record walker: 16 * 31 = 496 records at most */
#define SD_TAIL_ANSWERS 0       /* sd_tails: the record walker (sd_dns_answers) */
#define SD_TAIL_LEARN 1         /* sd_tails: the end of an answer (sd_dns_learn) */
#define SD_NTAILS 2
struct sd_answer {
    __u32 a[4];
    __u32 ttl;
};

/* pending: queries let through, by (cgid, resolver address, DNS id). Only an answer that
 * matches one (same resolver, id and question) teaches addresses: a process cannot widen
 * its own policy by sending itself forged answers from a port 53 of its own. */
struct sd_pending_key {
    __u64 cgid;
    __u32 addr[4];
    __u16 txid;
    __u16 pad;
    __u32 pad2;
};

/* per-CPU scratch: buffers too big for the 512-byte stack, and the state of the parsing
 * loops. The loop state is volatile memory on purpose: the verifier then sees unknown
 * scalars at every iteration, so equivalent states are pruned instead of being explored
 * once per possible byte value. */
struct sd_scratch {
    __u8 wire[SD_NAME_BUF];
    struct sd_qname q;
    struct sd_answer addrs[SD_MAX_ANSWERS];
    volatile __u64 h;
    volatile __u32 pos;
    volatile __u32 out;
    volatile __u32 rem;
    volatile __u32 k;
    volatile __u32 done;
    volatile __u32 found;
    volatile __u32 aoff;
    volatile __u32 owner;       /* offset of the owner name of the answer's addresses, if not the question */
    volatile __u32 naddr;
    volatile __u32 mixed;
    volatile __u32 skipped;
    volatile __u16 owner_ptr;
    volatile __u16 qv_rule;
    volatile __u8 qv_verdict;
    __u8 pad;
    /* the walk over an answer's records, carried from one tail call to the next */
    volatile __u64 cgid;
    volatile __u32 a_left;      /* records not walked yet */
    volatile __u32 calls;
    volatile __u32 dns_off;
    volatile __u32 question;
    volatile __u32 name_id;
    volatile __u32 cut;         /* more address records than SD_MAX_ANSWERS, or records than walked */
    volatile __u16 qrule;
    volatile __u8 qverdict;
    volatile __u8 family;
    volatile __u8 proto;
    __u8 pad2[3];
    __u32 resolver[4];
};

/* live: blocked and would-block decisions as they happen, for `safedeploy watch` */
struct sd_live {
    struct sd_event_key k;
    __u64 ts_ns;        /* CLOCK_BOOTTIME */
    char comm[16];
};

BPF_HASH(cgroups, __u64, struct sd_cgroup, 16384);
/* drops: per policed cgroup, events that found the events map full (shown in its report) */
BPF_HASH(drops, __u64, __u64, 16384);
BPF_RINGBUF_OUTPUT(live, 64);
BPF_LPM_TRIE(cidrs, struct sd_cidr_key, struct sd_cidr_val, 262144);
BPF_HASH(resolvers, struct sd_addr_key, __u8, 16384);
BPF_HASH(events, struct sd_event_key, struct sd_event_val, 65536);
BPF_PERCPU_ARRAY(stats, __u64, SD_NSTATS);
BPF_HASH(names, struct sd_name_key, struct sd_name_val, 262144);
BPF_TABLE("lru_hash", struct sd_qname_key, struct sd_qname, qnames, 16384);
BPF_TABLE("lru_hash", struct sd_addr_key, struct sd_learned, learned, 65536);
/* one slot per program kind: an ingress program may interrupt an egress one on a CPU */
#define SD_SCRATCH_EGRESS 0
#define SD_SCRATCH_INGRESS 1
BPF_PERCPU_ARRAY(scratch, struct sd_scratch, 2);
/* A pending query: never overwritten by another question with the same id (inserted
 * with BPF_NOEXIST) until it is answered or expires. */
struct sd_pending {
    __u64 expires_ns;   /* CLOCK_BOOTTIME */
    __u32 name_id;      /* the question */
    __u32 pad;
};
#define SD_PENDING_S 30     /* a query unanswered this long no longer blocks its id */
BPF_TABLE("lru_hash", struct sd_pending_key, struct sd_pending, pending, 16384);

/* procs: who made a recorded call, captured in the kernel when its first event is
 * recorded (so a report names processes that exited long before poststop): the command
 * line and the nearest ancestors. Task/mm field offsets come from the running kernel's
 * BTF at compile time (-DSD_OFF_*); without them nothing is captured. */
#define SD_CMDLINE 256
#define SD_CHAIN 4
struct sd_proc_key {
    __u64 cgid;
    __u32 tgid;
    __u32 pad;
};
struct sd_ancestor {
    __u32 pid;
    char comm[16];
};
#define SD_EXE 256
#define SD_EXE_PART 128     /* longest path component kept; the path stops before SD_EXE - SD_EXE_PART */
#define SD_EXE_DEPTH 32     /* path components and mount crossings walked */
struct sd_proc {
    __u32 len;          /* bytes of cmdline (NUL-separated argv) */
    __u32 chain_len;
    struct sd_ancestor chain[SD_CHAIN]; /* parent first */
    char cmdline[SD_CMDLINE];
    __u32 exe_len;      /* bytes of exe */
    __u32 exe_flags;    /* SD_EXE_* */
    char exe[SD_EXE];   /* the executable's path (task->mm->exe_file), components last first, NUL-separated */
};
#define SD_EXE_COMPLETE 1   /* the walk reached the root of the task's mount tree */
BPF_TABLE("lru_hash", struct sd_proc_key, struct sd_proc, procs, 16384);
BPF_PERCPU_ARRAY(procscratch, struct sd_proc, 1);

/* The executable's path, walked up from mm->exe_file: dentry names through d_parent, and
 * across mounts through struct mount (mnt_parent, mnt_mountpoint), up to the root of the
 * task's mount tree (a container's own root: the path is the one the container sees).
 * Components are written last first; userspace reverses them. */
#if defined(SD_OFF_MM_EXE_FILE) && defined(SD_OFF_FILE_F_PATH) && defined(SD_OFF_PATH_MNT) && \
    defined(SD_OFF_PATH_DENTRY) && defined(SD_OFF_DENTRY_D_PARENT) && defined(SD_OFF_DENTRY_D_NAME) && \
    defined(SD_OFF_QSTR_NAME) && defined(SD_OFF_MOUNT_MNT) && defined(SD_OFF_MOUNT_MNT_PARENT) && \
    defined(SD_OFF_MOUNT_MNT_MOUNTPOINT) && defined(SD_OFF_VFSMOUNT_MNT_ROOT)
static __always_inline void sd_capture_exe(__u64 mm, struct sd_proc *p)
{
    __u64 file = 0, vfsmnt = 0, dentry = 0;
    p->exe_len = 0;
    p->exe_flags = 0;
    if (!mm)
        return;
    bpf_probe_read_kernel(&file, sizeof(file), (void *)(mm + SD_OFF_MM_EXE_FILE));
    if (!file)
        return;
    bpf_probe_read_kernel(&vfsmnt, sizeof(vfsmnt), (void *)(file + SD_OFF_FILE_F_PATH + SD_OFF_PATH_MNT));
    bpf_probe_read_kernel(&dentry, sizeof(dentry), (void *)(file + SD_OFF_FILE_F_PATH + SD_OFF_PATH_DENTRY));
    __u64 mnt = vfsmnt - SD_OFF_MOUNT_MNT;
    volatile __u32 *vpos = &p->exe_len; /* in map memory: the verifier sees an unknown length at each step */
    for (int i = 0; i < SD_EXE_DEPTH; i++) {
        __u64 root = 0, up = 0, name = 0;
        bpf_probe_read_kernel(&root, sizeof(root), (void *)(vfsmnt + SD_OFF_VFSMOUNT_MNT_ROOT));
        if (dentry == root) { /* the top of this mount: continue where it is mounted */
            __u64 parent = 0;
            bpf_probe_read_kernel(&parent, sizeof(parent), (void *)(mnt + SD_OFF_MOUNT_MNT_PARENT));
            if (!parent || parent == mnt) {
                p->exe_flags = SD_EXE_COMPLETE;
                break;
            }
            bpf_probe_read_kernel(&dentry, sizeof(dentry), (void *)(mnt + SD_OFF_MOUNT_MNT_MOUNTPOINT));
            mnt = parent;
            vfsmnt = parent + SD_OFF_MOUNT_MNT;
            continue;
        }
        bpf_probe_read_kernel(&up, sizeof(up), (void *)(dentry + SD_OFF_DENTRY_D_PARENT));
        if (!up || up == dentry) {
            p->exe_flags = SD_EXE_COMPLETE;
            break;
        }
        __u32 pos = *vpos;
        if (pos >= SD_EXE - SD_EXE_PART)
            break;
        bpf_probe_read_kernel(&name, sizeof(name), (void *)(dentry + SD_OFF_DENTRY_D_NAME + SD_OFF_QSTR_NAME));
        int n = bpf_probe_read_kernel_str(&p->exe[pos & (SD_EXE - SD_EXE_PART - 1)], SD_EXE_PART, (void *)name);
        if (n <= 0)
            break;
        *vpos = pos + n;
        dentry = up;
    }
}
#else
static __always_inline void sd_capture_exe(__u64 mm, struct sd_proc *p)
{
    p->exe_len = 0;
    p->exe_flags = 0;
}
#endif

#if defined(SD_OFF_TASK_MM) && defined(SD_OFF_MM_ARG_START) && defined(SD_OFF_MM_ARG_END) && \
    defined(SD_OFF_TASK_REAL_PARENT) && defined(SD_OFF_TASK_TGID) && defined(SD_OFF_TASK_COMM)
static __always_inline void sd_capture_proc(__u64 cgid, __u32 tgid)
{
    struct sd_proc_key pk = {};
    pk.cgid = cgid;
    pk.tgid = tgid;
    if (procs.lookup(&pk))
        return;
    __u32 zero = 0;
    struct sd_proc *p = procscratch.lookup(&zero);
    if (!p)
        return;
    __u64 task = bpf_get_current_task();
    __u64 mm = 0, start = 0, end = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(task + SD_OFF_TASK_MM));
    p->len = 0;
    if (mm) {
        bpf_probe_read_kernel(&start, sizeof(start), (void *)(mm + SD_OFF_MM_ARG_START));
        bpf_probe_read_kernel(&end, sizeof(end), (void *)(mm + SD_OFF_MM_ARG_END));
        if (end > start) {
            __u32 len = end - start > SD_CMDLINE ? SD_CMDLINE : end - start;
            len -= 1;
            asm volatile("%0 &= 0xff" : "+r"(len));
            len += 1;
            if (bpf_probe_read_user(p->cmdline, len, (void *)start) == 0)
                p->len = len;
        }
    }
    sd_capture_exe(mm, p);
    p->chain_len = 0;
    __u64 cur = task;
    for (int i = 0; i < SD_CHAIN; i++) {
        __u64 parent = 0;
        bpf_probe_read_kernel(&parent, sizeof(parent), (void *)(cur + SD_OFF_TASK_REAL_PARENT));
        if (!parent || parent == cur)
            break;
        bpf_probe_read_kernel(&p->chain[i].pid, sizeof(__u32), (void *)(parent + SD_OFF_TASK_TGID));
        bpf_probe_read_kernel(&p->chain[i].comm, 16, (void *)(parent + SD_OFF_TASK_COMM));
        p->chain_len = i + 1;
        cur = parent;
    }
    procs.update(&pk, p);
}
#else
static __always_inline void sd_capture_proc(__u64 cgid, __u32 tgid) {}
#endif

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

/* The policy of the nearest policed ancestor (or the cgroup itself). ANCESTOR(level)
 * is sd_current_ancestor_cgroup_id or bpf_skb_ancestor_cgroup_id. */
#define SD_FIND_POLICY(ANCESTOR, cgid_out)                                   \
    ({                                                                       \
        struct sd_cgroup *found_ = 0;                                        \
        _Pragma("unroll") for (int lvl_ = 0; lvl_ < SD_MAX_DEPTH; lvl_++) {  \
            __u64 id_ = ANCESTOR(lvl_);                                      \
            if (!id_)                                                        \
                break;                                                       \
            struct sd_cgroup *p_ = sd_cgroup_of(id_);                        \
            if (p_) {                                                        \
                found_ = p_;                                                 \
                *(cgid_out) = id_;                                           \
            }                                                                \
        }                                                                    \
        found_;                                                              \
    })

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

#define SD_FNV_OFFSET 0xcbf29ce484222325ULL
#define SD_FNV_PRIME 0x100000001b3ULL

static __always_inline struct sd_name_val *sd_name_lookup(__u64 cgid, __u64 hash, __u8 kind, __u8 proto, __u16 port)
{
    struct sd_name_key k = {};
    k.cgid = cgid;
    k.hash = hash;
    k.kind = kind;
    k.proto = proto;
    k.port = port;
    return names.lookup(&k);
}

/* Of two name rules at the same base: deny, then the lowest rule index. */
static __always_inline struct sd_name_val *sd_better_name(struct sd_name_val *a, struct sd_name_val *b)
{
    if (!a)
        return b;
    if (!b)
        return a;
    if (a->verdict != b->verdict)
        return a->verdict == SD_DENY ? a : b;
    return a->rule <= b->rule ? a : b;
}

/* The name rule deciding a connection to a learned name: the longest base that has an
 * applying rule wins (the full name's exact rules, then wildcards of shorter suffixes). */
static __always_inline int sd_name_verdict(__u64 cgid, struct sd_qname *q, __u8 proto, __u16 port,
                                           struct sd_name_val *out)
{
    __u32 n = q->nhash;
    if (n == 0 || n > SD_MAX_SUFFIXES)
        return 0;
    for (int j = 0; j < SD_MAX_SUFFIXES; j++) {
        int i = (int)n - 1 - j;
        if (i < 0)
            break;
        __u64 h = q->hashes[i & (SD_MAX_SUFFIXES - 1)];
        __u8 kind = (i == (int)n - 1) ? SD_NAME_EXACT : SD_NAME_WILD;
        struct sd_name_val *best = sd_better_name(sd_name_lookup(cgid, h, kind, proto, port),
                                                  sd_name_lookup(cgid, h, kind, proto, 0));
        if (best) {
            *out = *best;
            return 1;
        }
    }
    return 0;
}

/* Verdict of the policy of cgid for dest (decide() in ocihook/policy.py is the
 * reference). *rule receives the deciding rule index, *name_id the learned name. */
static __always_inline __u8 sd_decide(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u16 *rule,
                                      __u32 *name_id)
{
    if (pol->has_resolvers && d->port == 53) {
        struct sd_addr_key rk = {};
        rk.cgid = cgid;
        __builtin_memcpy(rk.addr, d->addr, sizeof(rk.addr));
        *rule = SD_RULE_RESOLVERS;
        return resolvers.lookup(&rk) ? SD_ALLOW : SD_DENY;
    }
    struct sd_cidr_key k = {};
    k.prefixlen = SD_CIDR_FIXED_BITS + 128;
    k.proto = d->proto;
    k.port = d->port;
    k.cgid = cgid;
    __builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
    struct sd_cidr_val *by_port = cidrs.lookup(&k);
    k.port = 0;
    struct sd_cidr_val *any_port = cidrs.lookup(&k);
    struct sd_cidr_val *best = sd_better(by_port, any_port);

    /* the name this address was learned from (a DNS answer), while its TTL lasts */
    struct sd_name_val nv = {};
    int have_name = 0;
    struct sd_addr_key lk = {};
    lk.cgid = cgid;
    __builtin_memcpy(lk.addr, d->addr, sizeof(lk.addr));
    struct sd_learned *l = learned.lookup(&lk);
    if (l) {
        if (l->expires_ns < bpf_ktime_get_boot_ns()) {
            learned.delete(&lk);
        } else if (l->verdict == SD_DENY) {
            /* learned from an answer that involved a denied name (e.g. through a CNAME) */
            *name_id = l->name_id;
            nv.rule = l->rule;
            nv.verdict = SD_DENY;
            have_name = 1;
        } else {
            struct sd_qname_key qk = {};
            qk.cgid = cgid;
            qk.name_id = l->name_id;
            *name_id = l->name_id;
            struct sd_qname *q = qnames.lookup(&qk);
            if (q)
                have_name = sd_name_verdict(cgid, q, d->proto, d->port, &nv);
        }
    }
    if (have_name && best) {
        /* both decide: if they agree the name rule decides, else the deny one */
        if (nv.verdict == best->verdict || nv.verdict == SD_DENY) {
            *rule = nv.rule;
            return nv.verdict;
        }
        *rule = best->rule;
        return best->verdict;
    }
    if (have_name) {
        *rule = nv.rule;
        return nv.verdict;
    }
    if (best) {
        *rule = best->rule;
        return best->verdict;
    }
    *rule = SD_RULE_DEFAULT;
    return pol->dflt;
}

/* Does the task running on this CPU belong to the policed cgroup? Not always: packets
 * sent in softirq context (TCP retransmissions, timers, ACKs) run on whatever task the
 * CPU interrupted. Only a task inside the cgroup is named in a record. */
static __always_inline int sd_current_in(__u64 cgid)
{
    _Pragma("unroll") for (int lvl = 0; lvl < SD_MAX_DEPTH; lvl++) {
        __u64 id = sd_current_ancestor_cgroup_id(lvl);
        if (!id)
            break;
        if (id == cgid)
            return 1;
    }
    return 0;
}

static __always_inline void sd_record(__u64 cgid, struct sd_dest *d, __u16 rule, __u8 ev, __u8 kind, __u32 name_id)
{
    struct sd_event_key k = {};
    k.cgid = cgid;
    __builtin_memcpy(k.addr, d->addr, sizeof(k.addr));
    int mine = sd_current_in(cgid);
    k.pid = mine ? bpf_get_current_pid_tgid() >> 32 : 0;
    k.port = d->port;
    k.rule = rule;
    k.verdict = ev;
    k.kind = kind;
    k.proto = d->proto;
    k.family = d->family;
    k.name_id = name_id;
    __u64 now = bpf_ktime_get_boot_ns();
    if (ev != SD_EV_ALLOWED) {
        struct sd_live live_ev = {};
        live_ev.k = k;
        live_ev.ts_ns = now;
        if (mine)
            bpf_get_current_comm(&live_ev.comm, sizeof(live_ev.comm));
        if (live.ringbuf_output(&live_ev, sizeof(live_ev), 0) != 0)
            sd_stat(SD_STAT_LIVE_UNREAD);
    }
    struct sd_event_val *v = events.lookup(&k);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        v->last_ns = now;
        return;
    }
    struct sd_event_val nv = {};
    nv.count = 1;
    nv.first_ns = now;
    nv.last_ns = now;
    if (mine) {
        nv.uid = (__u32)bpf_get_current_uid_gid();
        bpf_get_current_comm(&nv.comm, sizeof(nv.comm));
        sd_capture_proc(cgid, k.pid);
    } else {
        nv.uid = 0xffffffff; /* no process: a packet the kernel sent on the cgroup's behalf */
    }
    if (events.insert(&k, &nv) != 0) {
        v = events.lookup(&k); /* lost a race with another CPU */
        if (v) {
            __sync_fetch_and_add(&v->count, 1);
        } else {
            sd_stat(SD_STAT_EVENTS_DROPPED);
            __u64 *dc = drops.lookup(&cgid);
            if (dc) {
                __sync_fetch_and_add(dc, 1);
            } else {
                __u64 one = 1;
                drops.update(&cgid, &one);
            }
        }
    }
}

/* Decide, record, and turn the verdict into the program's return value (1 pass, 0 EPERM). */
static __always_inline int sd_verdict_return(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 verdict,
                                             __u16 rule, __u8 kind, __u32 name_id)
{
    sd_stat(SD_STAT_DECISIONS);
    if (verdict == SD_ALLOW) {
        sd_record(cgid, d, rule, SD_EV_ALLOWED, kind, name_id);
        return 1;
    }
    sd_stat(SD_STAT_DENIED);
    if (pol->mode == SD_MODE_AUDIT) {
        sd_record(cgid, d, rule, SD_EV_WOULD_BLOCK, kind, name_id);
        return 1;
    }
    sd_record(cgid, d, rule, SD_EV_BLOCKED, kind, name_id);
    return 0;
}

static __always_inline int sd_enforce(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 kind)
{
    __u16 rule = SD_RULE_DEFAULT;
    __u32 name_id = 0;
    __u8 verdict = sd_decide(cgid, pol, d, &rule, &name_id);
    return sd_verdict_return(cgid, pol, d, verdict, rule, kind, name_id);
}

/* Remember a query let through (resolver, id) -> question. Returns 1 when it is pending
 * now (new, or the same question again, e.g. a retransmission), 0 when another question
 * with that id is pending: the first one keeps its entry, this one will teach nothing. */
static __always_inline int sd_pending_put(__u64 cgid, __u32 *resolver, __u16 txid, __u32 name_id)
{
    struct sd_pending_key pk = {};
    pk.cgid = cgid;
    __builtin_memcpy(pk.addr, resolver, sizeof(pk.addr));
    pk.txid = txid;
    __u64 now = bpf_ktime_get_boot_ns();
    struct sd_pending v = {};
    v.expires_ns = now + SD_PENDING_S * 1000000000ULL;
    v.name_id = name_id;
    if (pending.insert(&pk, &v) == 0)
        return 1;
    struct sd_pending *old = pending.lookup(&pk);
    if (!old)
        return pending.insert(&pk, &v) == 0;
    if (old->name_id == name_id)
        return 1;
    if (old->expires_ns < now) { /* an unanswered query long gone */
        pending.delete(&pk);
        return pending.insert(&pk, &v) == 0;
    }
    return 0;
}

/* Take the pending query an answer from resolver with txid answers, if it asked name_id. */
static __always_inline int sd_pending_take(__u64 cgid, __u32 *resolver, __u16 txid, __u32 name_id)
{
    struct sd_pending_key pk = {};
    pk.cgid = cgid;
    __builtin_memcpy(pk.addr, resolver, sizeof(pk.addr));
    pk.txid = txid;
    struct sd_pending *asked = pending.lookup(&pk);
    if (!asked || asked->name_id != name_id)
        return 0;
    pending.delete(&pk);
    return 1;
}

#define SD_AF_INET6 10

/* sk_judged: per UDP socket, the destination its last unconnected sendmsg was judged for
 * (a connected socket's peer is its judged destination: egress compares with the socket's
 * own fields). At egress, a packet going exactly there (same address, protocol and port, no
 * IP options, no IPv6 extension headers) leaves at once; any other packet is judged in full
 * by its real destination. Created only for unconnected sends: creating socket storage
 * costs ~1 us, more than the rest of a connect's programs together. */
struct sd_sk {
    __u32 addr[4];
    __u16 port;         /* host order */
    __u8 proto;         /* the packet's IP protocol (UDP-Lite stays 136) */
    __u8 flags;         /* SD_SK_* */
};
#define SD_SK_JUDGED 1      /* set by sendmsg, or by a full judgement at egress */
BPF_SK_STORAGE(sk_judged, struct sd_sk);

static __always_inline void sd_judged_put(struct bpf_sock *sk, struct sd_dest *d, __u8 proto, __u8 flags)
{
    struct sd_sk *st = sk_judged.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return;
    __builtin_memcpy(st->addr, d->addr, sizeof(st->addr));
    st->port = d->port;
    st->proto = proto;
    st->flags = flags;
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
static __always_inline __u8 sd_decide_as(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 jproto,
                                         __u16 *rule, __u32 *name_id)
{
    if (!jproto) {
        *rule = SD_RULE_PROTOCOL;
        return SD_DENY;
    }
    struct sd_dest j = *d;
    j.proto = jproto;
    if (jproto == SD_PROTO_OTHER)
        j.port = 0;
    return sd_decide(cgid, pol, &j, rule, name_id);
}

static __always_inline int sd_enforce_as(__u64 cgid, struct sd_cgroup *pol, struct sd_dest *d, __u8 jproto,
                                         __u8 kind)
{
    __u16 rule = SD_RULE_DEFAULT;
    __u32 name_id = 0;
    __u8 verdict = sd_decide_as(cgid, pol, d, jproto, &rule, &name_id);
    return sd_verdict_return(cgid, pol, d, verdict, rule, kind, name_id);
}

/* IPv4 options being walked, in per-CPU map memory: the verifier then sees an unknown
 * position at each step and checks the walk once, not once per path through it. */
struct sd_opts {
    __u8 b[64];
    volatile __u32 i;
    volatile __u32 len;
};
#define SD_OPTS_SOCKOPT 0   /* one slot per program kind: egress may interrupt setsockopt */
#define SD_OPTS_EGRESS 1
BPF_PERCPU_ARRAY(optscratch, struct sd_opts, 2);

/* IPv4 options: is there a loose or strict source route (LSRR 0x83, SSRR 0x89)? Options
 * that cannot be walked count as one. o->b holds o->len (<= 40) bytes. */
static __always_inline int sd_v4_srcroute(struct sd_opts *o)
{
    o->i = 0;
    for (int n = 0; n < 40; n++) {
        __u32 i = o->i;
        if (i >= o->len || i >= 40)
            break;
        __u8 t = o->b[i & 63];
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
        __u8 l = o->b[(i + 1) & 63];
        if (l < 2)
            return 1;
        o->i = i + l;
    }
    return 0;
}

#endif /* SAFEDEPLOY_H */
