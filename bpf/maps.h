/* safedeploy maps (bcc dialect). Layouts are in abi.h.
 *
 * Shared by every policed cgroup: the policy headers (cgroups), their exact counters
 * (cgstats), global counters, the live ring buffer and per-CPU scratch. Everything a cgroup
 * can fill lives in maps of its own: the outer cg_* arrays map a table slot (the header's
 * `tables`) to that cgroup's inner map, each bounded by its quota, so one cgroup filling
 * (or evicting) its tables never touches another's. The tpl_* maps are only the templates
 * the outer maps are declared with (the kernel checks inner maps against them). The outer
 * maps are arrays, not hashes: the verifier inlines an array-of-maps lookup, where a hash
 * lookup is a helper call (~60 ns here, three of them on every allowed connect).
 *
 * A set of inner maps is made once and then reused: putting a map into an outer map makes
 * the kernel wait for an RCU grace period (~10 ms here, per outer map), too slow for a
 * container's start. So the release of a cgroup (in the background) replaces its set with
 * empty maps and keeps the slot as a spare; the next policy takes a spare and only writes
 * its rules (ocihook/pinned.py). The header is written last and removed first: the
 * programs reach a set only through a header that names it.
 */
#ifndef SD_MAPS_H
#define SD_MAPS_H

BPF_HASH(cgroups, __u64, struct sd_cgroup, 16384);
BPF_HASH(cgstats, __u64, struct sd_cgstats, 16384);
/* table slots of emptied sets of per-cgroup maps, ready for the next policy (userspace only) */
BPF_HASH(spares, __u64, __u8, 64);
/* the table slots in use, a set each (made, spare or a policy's): inserting the key claims
 * the slot, deleting it after the set is gone frees it (userspace only) */
BPF_F_TABLE("hash", __u32, __u8, slots, SD_MAX_TABLES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stats, __u64, SD_NSTATS);
BPF_RINGBUF_OUTPUT(live, 64);

/* templates of the per-cgroup maps (type, key, value and flags must match the real ones) */
BPF_F_TABLE("lpm_trie", struct sd_cidr_key, struct sd_cidr_val, tpl_cidrs, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct sd_name_key, struct sd_name_val, tpl_names, 1, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct sd_addr, __u8, tpl_resolvers, 1, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct sd_addr, struct sd_learned, tpl_learned, 1);
BPF_TABLE("lru_hash", struct sd_pending_key, struct sd_pending_val, tpl_pending, 1);
BPF_TABLE("lru_hash", struct sd_qid_key, __u32, tpl_qids, 1);
BPF_TABLE("lru_hash", __u32, struct sd_name_key, tpl_qnames, 1);
BPF_TABLE("lru_hash", struct sd_proc_key, struct sd_proc, tpl_procs, 1);
BPF_F_TABLE("hash", struct sd_event_key, struct sd_event_val, tpl_events, 1, BPF_F_NO_PREALLOC);
BPF_QUEUE(tpl_refusals, struct sd_refusal, 1);

BPF_ARRAY_OF_MAPS(cg_cidrs, "tpl_cidrs", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_names, "tpl_names", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_resolvers, "tpl_resolvers", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_learned, "tpl_learned", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_pending, "tpl_pending", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_qids, "tpl_qids", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_qnames, "tpl_qnames", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_procs, "tpl_procs", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_events, "tpl_events", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_blocked, "tpl_events", SD_MAX_TABLES);
BPF_ARRAY_OF_MAPS(cg_refusals, "tpl_refusals", SD_MAX_TABLES);

/* per-CPU scratch: buffers too big for the 512-byte stack, and the state of the parsing
 * loops. The loop state is volatile memory on purpose: the verifier then sees unknown
 * scalars at every iteration, so equivalent states are pruned instead of being explored
 * once per possible byte value. */
struct sd_scratch {
    __u8 wire[SD_NAME_BUF];
    char text[SD_NAME_BUF];       /* the dotted lower-case name being parsed */
    struct sd_name_key key;       /* the same name reversed: a names-trie key, a qids key */
    struct sd_answer addrs[SD_MAX_ANSWERS];
    volatile __u32 pos;
    volatile __u32 out;
    volatile __u32 rem;
    volatile __u32 done;
    volatile __u32 found;
    volatile __u32 klen;          /* bytes of key.name in use, the terminator included */
    volatile __u32 dots;          /* sd_judge_name's search for a service prefix */
    volatile __u32 srv;
    volatile __u32 aoff;
    volatile __u32 owner;         /* offset of the owner name of the answer's addresses, if not the question */
    volatile __u32 naddr;
    volatile __u32 mixed;
    volatile __u32 skipped;
    volatile __u32 owner_id;      /* who s->owner is: its compression pointer, or 0x10000 | its offset */
    volatile __u16 qv_rule;
    volatile __u8 qv_verdict;
    __u8 pad[1];
    /* the walk over an answer's records, carried from one tail call to the next */
    volatile __u64 cgid;
    volatile __u32 tables;      /* the cgroup's table key (its header's `tables`) */
    volatile __u32 a_left;      /* records not walked yet */
    volatile __u32 tc;          /* tail calls made for this packet so far (at most SD_TAIL_BUDGET) */
    volatile __u32 rx;          /* 1: the walk is of a TCP answer message (sd_dns_rx goes on after it) */
    volatile __u32 seg_pos;     /* TCP answer stream: the next byte of this segment to follow */
    volatile __u32 seg_end;
    volatile __u32 name_id;
    volatile __u32 cut;         /* more address records than SD_MAX_ANSWERS, or records than walked */
    volatile __u16 qrule;
    volatile __u8 qverdict;
    volatile __u8 family;
    volatile __u8 proto;
    __u8 pad2[3];
    __u32 resolver[4];
    /* what sd_dns_learn decided for the answer's addresses, for sd_dns_store */
    volatile __u32 l_target;
    volatile __u32 l_next;        /* the next of s->addrs to learn */
    volatile __u32 rx_cuts;       /* TCP answer messages cut in this segment, not recorded yet */
    volatile __u16 l_rule;
    volatile __u8 l_verdict;
    volatile __u8 l_drop;         /* a UDP answer whose CNAME chain ends in a denied name: dropped */
    volatile __u32 qend;          /* where the answer's question ends (its records start) */
    __u32 pad4;
    struct sd_refusal ref;        /* a refusal being queued (sd_refusal_of): too big for the stack */
    struct sd_pending_val who;    /* who asked the question being answered (sd_pending_take) */
};
/* one slot per program kind: an ingress program may interrupt an egress one on a CPU,
 * and either may interrupt a connect */
#define SD_SCRATCH_EGRESS 0
#define SD_SCRATCH_INGRESS 1
#define SD_SCRATCH_SOCK 2
BPF_PERCPU_ARRAY(scratch, struct sd_scratch, 3);

/* The DNS message an answer walk reads (ingress only: one slot), offsets from its header.
 * len: the bytes copied; trunc: the message was longer than SD_MSGBUF. */
struct sd_msgbuf {
    __u8 b[SD_MSGBUF];
    __u32 len;
    __u32 trunc;
};
BPF_PERCPU_ARRAY(msgbuf, struct sd_msgbuf, 1);

/* Each mask used to bound an index for the verifier is tied to the buffer it indexes. */
#define SD_NAME_MASK (SD_NAME_BUF - 1) /* s->wire, s->text */
_Static_assert((SD_NAME_BUF & SD_NAME_MASK) == 0 && SD_NAME_BUF == 256, "name masks (0xff in asm) need 256");
_Static_assert((SD_MSGBUF & (SD_MSGBUF - 1)) == 0, "msgbuf masks need a power of two");
BPF_PERCPU_ARRAY(procscratch, struct sd_proc, 1);

/* sk_judged: per UDP socket, the destination its last unconnected sendmsg was judged for
 * (a connected socket's peer is its judged destination: egress compares with the socket's
 * own fields). At egress, a packet going exactly there (same address, protocol and port, no
 * IP options, no IPv6 extension headers) leaves at once; any other packet is judged in full
 * by its real destination. Created only for unconnected sends and UDP connects: creating
 * socket storage costs ~1 us, more than the rest of a connect's programs together.
 *
 * Each field has one kind of writer, so that no read-modify-write of one can undo another's
 * store: addr/port/proto/flags are written by sendmsg and egress (sd_judged_put); peer and
 * peer_gen only by a UDP connect (sd_udp_connect, under the socket lock); sent_gen only by
 * egress, which copies peer_gen there once the peer's first packet is recorded. */
struct sd_sk {
    __u32 addr[4];
    __u16 port;         /* host order */
    __u8 proto;         /* the packet's IP protocol (UDP-Lite stays 136) */
    __u8 flags;         /* SD_SK_JUDGED */
    __u32 peer_gen;     /* counts the socket's UDP connects */
    __u32 sent_gen;     /* the peer_gen whose first packet egress recorded */
    __u8 peer;          /* SD_PEER_*: the verdict of the last UDP connect */
    __u8 pad[3];
};
#define SD_SK_JUDGED 1      /* set by sendmsg, or by a full judgement at egress */
#define SD_PEER_NONE 0      /* not connected by a policed UDP connect */
#define SD_PEER_ALLOWED 1   /* connected to an allowed peer: its first packet is judged in full
                             * (and recorded) while sent_gen != peer_gen, the rest go fast */
#define SD_PEER_DENIED 2    /* connected to a denied peer: every packet is judged in full */
BPF_SK_STORAGE(sk_judged, struct sd_sk);

/* IPv4 options being walked, in per-CPU map memory: the verifier then sees an unknown
 * position at each step and checks the walk once, not once per path through it. */
#define SD_OPTS_BUF 64      /* IPv4 options are at most 40 bytes; a power of two for the mask */
#define SD_OPTS_MASK (SD_OPTS_BUF - 1)
struct sd_opts {
    __u8 b[SD_OPTS_BUF];
    volatile __u32 i;
    volatile __u32 len;
};
#define SD_OPTS_SOCKOPT 0   /* one slot per program kind: egress may interrupt setsockopt */
#define SD_OPTS_EGRESS 1
BPF_PERCPU_ARRAY(optscratch, struct sd_opts, 2);
_Static_assert((SD_OPTS_BUF & SD_OPTS_MASK) == 0 && SD_OPTS_BUF > 40, "the options mask needs a power of two above 40");

#endif /* SD_MAPS_H */
