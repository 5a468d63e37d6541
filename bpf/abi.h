/* safedeploy ABI: every struct and constant shared by the BPF programs and userspace.
 *
 * ocihook/abi.py is generated from this file (python -m ocihook.abigen) and checked in; a unit
 * test regenerates it and fails when it is stale. Keep this file to what the generator reads:
 * `#define SD_NAME <integer>` lines and structs of fixed-width fields and arrays of them.
 * Nothing bcc-specific here: the maps live in maps.h.
 */
#ifndef SD_ABI_H
#define SD_ABI_H

#define SD_MAX_DEPTH 16          /* cgroup levels walked to find a policy */
#define SD_MAX_TABLES 16384      /* slots of the outer cg_* arrays: table sets, spares included */
#define SD_RULE_DEFAULT 0xffff   /* event/verdict came from the policy default */
#define SD_RULE_RESOLVERS 0xfffe /* event/verdict came from dns.resolvers */
#define SD_RULE_MALFORMED 0xfffd /* a DNS query the kernel could not parse */
#define SD_RULE_RAW 0xfffc       /* raw_sockets: deny */
#define SD_RULE_SRCROUTE 0xfffb  /* source_routes: deny (IPv6 routing header, IPv4 LSRR/SSRR) */
#define SD_RULE_PROTOCOL 0xfffa  /* an IP protocol the policy does not name in protocols */
#define SD_RULE_SERVE_DNS 0xfff9 /* serve_dns: deny (bind to / send from port 53) */
#define SD_RULE_ANSWER_CUT 0xfff8 /* a DNS answer with more addresses than the kernel learns */
#define SD_RULE_UNLISTED 0xfff7  /* a lookup of a name no rule covers, let through (dns.unlisted: resolve) */
#define SD_RULE_ZEROCOPY 0xfff6  /* SO_ZEROCOPY: sent pages the process could change after egress judged them */

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
#define SD_KIND_SOCKET 4    /* a raw socket, or a protocol not named: its creation or its packets */
#define SD_KIND_PACKET 5    /* a packet judged at egress by its real destination */
#define SD_KIND_BIND 6      /* bind(2) to port 53 */
#define SD_KIND_SOCKOPT 7   /* setsockopt(2) of a source route */

#define SD_PROTO_OTHER 255  /* rule entries for IP protocols other than TCP and UDP */
#define SD_IPPROTO_UDPLITE 136
#define SD_IPPROTO_MPTCP 262

/* global per-CPU counters (stats map) */
#define SD_STAT_EVENTS_DROPPED 0
#define SD_STAT_DECISIONS 1
#define SD_STAT_DENIED 2
#define SD_STAT_DNS_MALFORMED 3
#define SD_STAT_LIVE_UNREAD 4   /* live events not taken because nobody runs `watch` */
#define SD_STAT_ANSWERS_CUT 5   /* DNS answers with more address records than SD_MAX_ANSWERS */
#define SD_STAT_STREAM_REORDERED 6 /* DNS-over-TCP answer segments dropped to come again in order */
#define SD_STAT_STREAM_LOST 7   /* DNS-over-TCP connections whose answers could no longer be followed */
#define SD_NSTATS 8

/* cgroups: u64 cgroup id -> policy header of the cgroup the policy was applied to */
struct sd_cgroup {
    __u8 mode;          /* SD_MODE_* */
    __u8 dflt;          /* SD_ALLOW | SD_DENY: verdict when no rule applies */
    __u8 has_resolvers; /* 1: port-53 traffic only to the resolvers map */
    __u8 name_denies;   /* 1: the policy denies some name (unparseable queries are dropped) */
    __u8 allow_raw;     /* 1: raw IP sockets are allowed (they bypass connect/sendmsg rules) */
    __u8 unlisted;      /* 1: lookups of names no rule covers pass under default deny (search lists);
                         * their addresses are then judged by CIDR rules and the default */
    __u8 allow_srcroute; /* 1: source-routed packets (IPv6 routing headers, IPv4 LSRR/SSRR) may leave */
    __u8 serve_dns;     /* 1: the cgroup may bind port 53 and send from it */
    __u32 min_ttl;      /* seconds a learned address stays valid at least (dns.min_ttl) */
    __u32 connect_errno; /* the errno a refused connect/sendmsg returns (connect_error); 0: EPERM */
    __u8 protos[32];    /* bitmap of the IP protocols (other than TCP/UDP) the policy names */
    __u32 unlisted_errno; /* the errno of a refused connect/sendmsg to an address that only a name no
                           * rule covers resolved to (default deny): EHOSTUNREACH unless
                           * connect_error says otherwise (GNU wget retries EPERM 20 times) */
    __u32 tables;       /* the slot of this cgroup's own maps in the outer cg_* arrays (1 ..
                         * SD_MAX_TABLES - 1; maps.h): a set of them is made once and reused,
                         * emptied, by later cgroups */
};

/* cgstats: u64 cgroup id -> exact counters of one policed cgroup, written by the programs.
 * Created with the policy, so a flood of one cgroup never costs another one its counts. */
struct sd_cgstats {
    __u64 allowed;          /* decisions, exactly, whether or not their details fit */
    __u64 blocked;
    __u64 would_block;
    __u64 events_dropped;   /* allowed decisions whose details found the events quota full */
    __u64 blocked_dropped;  /* blocked/would-block decisions whose details found the quota full */
    __u64 learned_new;      /* addresses learned (more than the quota: the oldest were evicted) */
    __u64 pending_new;      /* queries remembered to match their answers */
    __u64 names_new;        /* distinct names given an id (next id = names_new + 1) */
    __u64 procs_new;        /* processes captured */
    __u64 pending_busy;     /* a query whose (resolver, id, question) was already pending */
};

/* Per-cgroup maps (one inner map per policed cgroup, see maps.h): keys carry no cgroup id. */

/* cidrs: LPM trie. The fixed part (proto, pad, port: 32 bits) always matches in full;
 * prefixlen = 32 + the rule's prefix in the IPv6 (v4-mapped) address space. port 0 holds
 * rules that cover every port; tcp and udp are separate entries. */
struct sd_cidr_key {
    __u32 prefixlen;
    __u8 proto;         /* IPPROTO_TCP | IPPROTO_UDP */
    __u8 pad;
    __u16 port;         /* host order; 0 = any port */
    __u32 addr[4];      /* network order; IPv4 as ::ffff:a.b.c.d */
};
#define SD_CIDR_FIXED_BITS 32

struct sd_cidr_val {
    __u16 rule;         /* index of the rule in the policy */
    __u8 verdict;       /* SD_ALLOW | SD_DENY */
    __u8 plen;          /* the rule's prefix length (0..128) */
};

/* an address (resolvers, learned): IPv4 as ::ffff:a.b.c.d */
struct sd_addr {
    __u32 addr[4];
};

/* names: LPM trie on the name itself, reversed and lower-case: `gro.naibed` then a 0 byte
 * for the exact name debian.org, `gro.naibed.` for *.debian.org, so the longest match is
 * the most specific rule and no name can pose as another (no hashes). proto 0 / port 0:
 * the verdict of a DNS query for the name; proto tcp|udp with port 0 (any) or a port: the
 * verdict of a connection to its addresses. */
#define SD_NAME_KEY 252     /* reversed name + terminator: names of at most 251 characters */
#define SD_NAME_MAX 251
#define SD_NAME_BUF 256     /* wire-format name buffer (a DNS name is at most 255 bytes) */
#define SD_NAME_FIXED_BITS 32
struct sd_name_key {
    __u32 prefixlen;
    __u8 proto;         /* 0 for the query verdict */
    __u8 pad;
    __u16 port;
    __u8 name[SD_NAME_KEY];
};

struct sd_name_val {
    __u16 rule;
    __u8 verdict;
    __u8 pad;
    __u32 nlen;         /* bytes of the rule's key name: of two matches, the longer decides */
};

/* qids: reversed name (zero padded) -> its id in this cgroup; qnames: id -> the name, as a
 * names-trie key whose prefixlen covers the name and its terminator. Ids are handed out in
 * order (cgstats.names_new): a learned address refers to the name it was learned from by
 * id, and an id cannot be chosen by choosing a name. */
struct sd_qid_key {
    __u8 name[SD_NAME_KEY];
};

/* learned: address -> the name whose answer carried it, until the TTL ends */
struct sd_learned {
    __u64 expires_ns;   /* CLOCK_BOOTTIME; an expired entry is kept to name the domain in reports */
    __u32 name_id;
    __u32 target_id;    /* the denied end of the CNAME chain that made a deny, or 0 */
    __u8 verdict;       /* deny when the queried name or a name in its CNAME chain is denied;
                         * a deny is never overwritten before it expires */
    __u8 pad;
    __u16 rule;         /* the rule behind a deny */
    __u32 pad2;
};
#define SD_TTL_MIN_S 2
#define SD_TTL_MAX_S 86400

/* Addresses learned per DNS answer. A UDP answer of at most 4096 bytes (the EDNS size
 * resolvers use) holds at most (4096 - 12 - 5 - 2) / 16 = 254 A records (2-byte compressed
 * owner, 10-byte record header, 4 bytes of address); an answer with more address records
 * (only possible over TCP) is cut, counted (SD_STAT_ANSWERS_CUT) and reported. */
#define SD_MAX_ANSWERS 256
#define SD_STORE_PER_CALL 64     /* addresses one sd_dns_store call learns */
#define SD_RECORDS_PER_CALL 16  /* answer records walked per program run (bpf/dns_skb.c) */
#define SD_TAIL_BUDGET 33       /* tail calls the kernel allows per packet (MAX_TAIL_CALL_CNT) */
#define SD_TAIL_ANSWERS 0       /* sd_tails: the record walker (sd_dns_answers) */
#define SD_TAIL_LEARN 1         /* sd_tails: the end of an answer (sd_dns_learn) */
#define SD_TAIL_RX 2            /* sd_tails: the DNS-over-TCP answer stream (sd_dns_rx) */
#define SD_ETAIL_QUERY 0        /* sd_egress_tails: the query in a packet to a DNS port (sd_egress_query) */
#define SD_ETAIL_VERDICT 1      /* sd_egress_tails: the verdict on that packet (sd_egress_dns) */
#define SD_NETAILS 2
#define SD_TAIL_BEGIN 3         /* sd_tails: the question of an answer in msgbuf (sd_dns_begin) */
#define SD_TAIL_STORE 4         /* sd_tails: learning the addresses of an answer (sd_dns_store) */
#define SD_NTAILS 5
/* A DNS message is walked from a per-CPU copy of it (msgbuf): a datagram's payload, or a
 * TCP answer message, put together from its segments when it came in pieces. A message
 * longer than this is walked as far as it goes (its further records are cut). */
#define SD_MSGBUF 8192
struct sd_answer {
    __u32 a[4];
    __u32 ttl;
};

/* pending: queries let through, by (resolver address, DNS id, question). Only an answer
 * that matches one teaches addresses; an entry is never overwritten. */
struct sd_pending_key {
    __u32 addr[4];
    __u16 txid;
    __u16 pad;
    __u32 name_id;
};
/* who asked: the answer's record names that process (pid 0: sent by no process of the cgroup) */
struct sd_pending_val {
    __u64 pstart;
    __u32 pid;
    __u32 uid;
    char comm[16];
};

/* events and blocked: aggregation of decisions, drained into the report. Allowed and
 * blocked decisions have separate maps, so allowed traffic never crowds out a violation. */
struct sd_event_key {
    __u64 pstart;       /* start time of the process (with pid: which process, across pid reuse) */
    __u32 addr[4];
    __u32 pid;          /* tgid; 0 when no process of the cgroup was running (softirq) */
    __u16 port;         /* host order */
    __u16 rule;
    __u8 verdict;       /* SD_EV_* */
    __u8 kind;          /* SD_KIND_* */
    __u8 proto;
    __u8 family;        /* 4 | 6 */
    __u32 name_id;      /* 0, or an id of the qnames map */
    __u32 target_id;    /* the denied CNAME target behind a deny (qnames id), or 0 */
    __u8 flags;         /* SD_EVF_* */
    __u8 pad[3];
};
#define SD_EVF_EXPIRED 1    /* the address was learned from name_id, but its TTL had passed */

struct sd_event_val {
    __u64 count;
    __u64 first_ns;     /* CLOCK_BOOTTIME */
    __u64 last_ns;
    __u32 uid;
    __u32 pad;
    char comm[16];
};

/* refusals (a queue per cgroup): a UDP query the egress program refused, so that userspace
 * answers it at once with REFUSED in the resolver's name (ocihook/refuser.py): clients that
 * ignore a failed send (dig, host, nslookup wait 10-15 s for an answer) then fail fast.
 * Addresses as in sd_dest (IPv4 v4-mapped); ports and id in host order. */
#define SD_REFUSALS 64      /* queued per cgroup; the oldest goes when it is full */
#define SD_REFUSAL_Q 260    /* a question: its name (at most 255 bytes on the wire), type and class */
struct sd_refusal {
    __u32 client[4];    /* the query's source */
    __u32 resolver[4];  /* its destination */
    __u16 cport;
    __u16 rport;
    __u16 txid;
    __u8 flags;         /* the query's third header byte: opcode and RD, copied to the answer */
    __u8 family;        /* 4 or 6 */
    __u16 qlen;         /* bytes of q in use; 0: no question (the answer has none either) */
    __u8 q[SD_REFUSAL_Q]; /* the question, as the answer repeats it (glibc matches it) */
    __u8 pad[2];
};

/* live: blocked and would-block decisions as they happen, for `safedeploy watch` */
struct sd_live {
    __u64 cgid;
    struct sd_event_key k;
    __u64 ts_ns;        /* CLOCK_BOOTTIME */
    char comm[16];
};

/* procs: who made a recorded call, captured when its first event is recorded (so a report
 * names processes that exited long before poststop): the command line and the nearest
 * ancestors. Keyed by pid and start time: a later process with the same pid is not it. */
#define SD_CMDLINE 256
#define SD_CHAIN 4
struct sd_proc_key {
    __u64 pstart;
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
#define SD_EXE_COMPLETE 1   /* the walk reached the root of the task's mount tree */
struct sd_proc {
    __u32 len;          /* bytes of cmdline (NUL-separated argv) */
    __u32 chain_len;
    struct sd_ancestor chain[SD_CHAIN]; /* parent first */
    __u8 cmdline[SD_CMDLINE];  /* bytes, not a string: NUL-separated */
    __u32 exe_len;      /* bytes of exe */
    __u32 exe_flags;    /* SD_EXE_* */
    __u8 exe[SD_EXE];   /* the executable's path (task->mm->exe_file), components last first, NUL-separated */
};

#endif /* SD_ABI_H */
