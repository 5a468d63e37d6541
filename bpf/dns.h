/* safedeploy: DNS in the kernel, independent of where the message came from (a packet,
 * a TCP stream): judging a parsed name against the names trie, name ids, pending queries
 * and learning answers. The wire parsers feed sd_name_byte() one byte at a time into the
 * per-CPU scratch (maps.h). */
#ifndef SD_DNS_H
#define SD_DNS_H

#define SD_DNS_PORT 53
#define SD_TCP_URG 0x20 /* the urgent flag of a TCP header's flags byte (offset 13) */

/* Reads of the message being walked (struct sd_msgbuf, maps.h), bounds checked: -1 past
 * what was copied (len <= SD_MSGBUF). The source is a map value, so the helper cannot
 * fault. One check only: each more would be one more verifier state per read. */
static __always_inline int sd_mb_load(struct sd_msgbuf *mb, __u32 off, void *dst, __u32 len)
{
    if (off + len > mb->len)
        return -1;
    return bpf_probe_read_kernel(dst, len, &mb->b[off & (SD_MSGBUF - 1)]);
}

static __always_inline int sd_mb_byte(struct sd_msgbuf *mb, __u32 off, __u8 *c)
{
    return sd_mb_load(mb, off, c, 1); /* a direct load: a known-bounded byte, more states */
}

/* Judge the dotted name in s->text[0..len): write it reversed into s->key (the names-trie
 * and qids key: `gro.naibed` then a 0 terminator, zero padded) and look up the verdict of
 * a query for it (s->found, s->qv_*). */
static __always_inline void sd_judge_name(__u32 tables, struct sd_scratch *s, __u32 len)
{
    s->found = 0;
    /* a service lookup _service._proto.NAME (RFC 2782) is judged as NAME: srv = where the
     * two leading `_` labels end (after the dot that follows the second) */
    s->dots = 0;
    s->srv = 0;
    if (s->text[0] == '_') {
        for (int i = 1; i < 128; i++) {
            if (i >= len)
                break;
            if (s->text[i & SD_NAME_MASK] != '.')
                continue;
            __u32 dots = s->dots + 1;
            s->dots = dots;
            if (dots == 1 && s->text[(i + 1) & SD_NAME_MASK] != '_')
                break;
            if (dots == 2) {
                s->srv = i + 1;
                break;
            }
        }
    }
    __u32 srv = s->srv;
    for (int j = 0; j < SD_NAME_KEY; j++) {
        __u8 c = 0;
        if (j < len)
            c = s->text[(len - 1 - j) & SD_NAME_MASK];
        s->key.name[j] = c;
    }
    s->key.proto = 0;
    s->key.pad = 0;
    s->key.port = 0;
    void *names = cg_names.lookup(&tables);
    __u32 vlen = len - srv; /* the name whose verdict this is */
    __u32 vi = vlen;
    asm volatile("%0 &= 0xff" : "+r"(vi)); /* clang drops a plain mask it thinks redundant */
    __u8 saved = 0;
    if (srv && vlen < SD_NAME_KEY) {
        saved = s->key.name[vi];
        s->key.name[vi] = 0;
    }
    s->key.prefixlen = SD_NAME_FIXED_BITS + (vlen + 1) * 8;
    struct sd_name_val *v = names ? bpf_map_lookup_elem(names, &s->key) : 0;
    if (v) {
        s->qv_rule = v->rule;
        s->qv_verdict = v->verdict;
        s->found = 1;
    }
    if (srv && vlen < SD_NAME_KEY)
        s->key.name[vi] = saved;
    s->klen = len + 1;
    s->key.prefixlen = SD_NAME_FIXED_BITS + (len + 1) * 8;
}

/* One byte of a name in wire format into the dotted text in s->text. Returns 1 when
 * the name ended, -1 when it is malformed, 0 to go on. */
static __always_inline int sd_name_byte(struct sd_scratch *s, __u8 c)
{
    __u32 rem = s->rem;
    __u32 out = s->out;
    if (out >= SD_NAME_MAX)
        return -1;
    if (rem == 0) {
        if (c == 0)
            return 1;
        if (c > 63)
            return -1; /* a bad length (compression is handled by the caller) */
        s->rem = c;
        if (out) {
            s->text[out & SD_NAME_MASK] = '.';
            s->out = out + 1;
        }
        return 0;
    }
    if (c == '.' || c == 0)
        return -1; /* a dot (or the terminator) inside a label would fake a label boundary */
    if (c >= 'A' && c <= 'Z')
        c += 'a' - 'A';
    s->text[out & SD_NAME_MASK] = c;
    s->out = out + 1;
    s->rem = rem - 1;
    return 0;
}

static __always_inline void sd_name_start(struct sd_scratch *s, __u32 pos)
{
    s->pos = pos;
    s->out = 0;
    s->rem = 0;
    s->done = 0;
}

/* After a name's last byte: check it, then judge it. */
static __always_inline int sd_name_end(__u32 tables, struct sd_scratch *s)
{
    __u32 len = s->out;
    if (!s->done || len == 0 || len > SD_NAME_MAX)
        return 0;
    sd_judge_name(tables, s, len);
    return 1;
}

/* The id of the name in s->key in this cgroup (qids of its table set), given the next id
 * (counted in its cgstats) when it has none yet; 0 when the cgroup's maps are gone. */
static __always_inline __u32 sd_name_id(__u64 cgid, __u32 tables, struct sd_scratch *s)
{
    void *qids = cg_qids.lookup(&tables);
    void *qnames = cg_qnames.lookup(&tables);
    struct sd_cgstats *st = cgstats.lookup(&cgid);
    if (!qids || !qnames || !st)
        return 0;
    __u32 *have = bpf_map_lookup_elem(qids, s->key.name);
    if (have) {
        __u32 id = *have;
        if (bpf_map_lookup_elem(qnames, &id))
            return id;
    }
    __u32 id = (__u32)__sync_fetch_and_add(&st->names_new, 1) + 1;
    if (id == 0)
        return 0;
    if (bpf_map_update_elem(qnames, &id, &s->key, BPF_ANY) != 0)
        return 0;
    bpf_map_update_elem(qids, s->key.name, &id, BPF_ANY);
    return id;
}

/* The id of an already named name (no new id): 0 when unknown. */
static __always_inline __u32 sd_known_name_id(__u32 tables, struct sd_scratch *s)
{
    void *qids = cg_qids.lookup(&tables);
    __u32 *have = qids ? bpf_map_lookup_elem(qids, s->key.name) : 0;
    return have ? *have : 0;
}

/* Remember a query let through, so that only its answer teaches addresses. An entry is
 * never overwritten: a query reusing the id of a pending one for another question has its
 * own entry (the question is part of the key). */
static __always_inline void sd_pending_put(__u64 cgid, __u32 tables, __u32 *resolver, __u16 txid, __u32 name_id)
{
    void *pending = cg_pending.lookup(&tables);
    struct sd_cgstats *st = cgstats.lookup(&cgid);
    if (!pending || !st)
        return;
    struct sd_pending_key pk = {};
    __builtin_memcpy(pk.addr, resolver, sizeof(pk.addr));
    pk.txid = txid;
    pk.name_id = name_id;
    struct sd_pending_val who = {};
    if (sd_current_in(cgid)) { /* the asking process, for the answer's record (sd_block_answer) */
        struct sd_self cur;
        sd_self_current(&cur);
        who.pid = cur.pid;
        who.pstart = cur.pstart;
        who.uid = (__u32)bpf_get_current_uid_gid();
        bpf_get_current_comm(&who.comm, sizeof(who.comm));
    }
    if (bpf_map_update_elem(pending, &pk, &who, BPF_NOEXIST) == 0)
        __sync_fetch_and_add(&st->pending_new, 1);
    else
        __sync_fetch_and_add(&st->pending_busy, 1);
}

/* Take the pending query an answer belongs to: 1 when (resolver, id, question) was asked
 * (who: the process that asked). */
static __always_inline int sd_pending_take(__u32 tables, __u32 *resolver, __u16 txid, __u32 name_id,
                                           struct sd_pending_val *who)
{
    void *pending = cg_pending.lookup(&tables);
    if (!pending || !name_id)
        return 0;
    struct sd_pending_key pk = {};
    __builtin_memcpy(pk.addr, resolver, sizeof(pk.addr));
    pk.txid = txid;
    pk.name_id = name_id;
    struct sd_pending_val *v = bpf_map_lookup_elem(pending, &pk);
    if (!v)
        return 0;
    __builtin_memcpy(who, v, sizeof(*who));
    bpf_map_delete_elem(pending, &pk);
    return 1;
}

/* Learn that addr answered a query for name_id, for its TTL: at least the policy's
 * dns.min_ttl (clients reuse addresses past the TTL), never less than SD_TTL_MIN_S nor more
 * than SD_TTL_MAX_S. target_id: the denied CNAME target that makes verdict a deny. */
static __always_inline void sd_learn_via(__u64 cgid, __u32 *addr, __u32 name_id, __u32 target_id, __u8 verdict,
                                         __u16 rule, __u32 ttl)
{
    struct sd_cgroup *pol = sd_cgroup_of(cgid);
    if (!pol)
        return; /* released: its table set is no longer its own */
    __u32 tables = pol->tables;
    void *learned = cg_learned.lookup(&tables);
    if (!learned)
        return;
    struct sd_addr k = {};
    __builtin_memcpy(k.addr, addr, sizeof(k.addr));
    __u64 now = bpf_ktime_get_boot_ns();
    struct sd_learned *old = bpf_map_lookup_elem(learned, &k);
    if (old && old->verdict == SD_DENY && verdict == SD_ALLOW && old->expires_ns > now)
        return; /* an address of a denied name stays denied until its TTL ends */
    if (ttl < pol->min_ttl)
        ttl = pol->min_ttl;
    if (ttl < SD_TTL_MIN_S)
        ttl = SD_TTL_MIN_S;
    if (ttl > SD_TTL_MAX_S)
        ttl = SD_TTL_MAX_S;
    struct sd_learned v = {};
    v.expires_ns = now + (__u64)ttl * 1000000000ULL;
    v.name_id = name_id;
    v.target_id = target_id;
    v.verdict = verdict;
    v.rule = rule;
    if (bpf_map_update_elem(learned, &k, &v, BPF_ANY) == 0 && !old) {
        struct sd_cgstats *st = cgstats.lookup(&cgid);
        if (st)
            __sync_fetch_and_add(&st->learned_new, 1);
    }
}

/* The verdict of a query for the name just judged (s->found, s->qv_*). A name no rule
 * covers passes under default deny when the policy resolves unlisted names (search-list
 * candidates): its addresses are then judged by CIDR rules and the default at connect. */
static __always_inline __u8 sd_query_verdict(struct sd_cgroup *pol, struct sd_scratch *s, __u16 *rule)
{
    if (s->found) {
        *rule = s->qv_rule;
        return s->qv_verdict;
    }
    if (pol->dflt == SD_DENY && pol->unlisted) {
        *rule = SD_RULE_UNLISTED;
        return SD_ALLOW;
    }
    *rule = SD_RULE_DEFAULT;
    return pol->dflt;
}

/* One record of an answer's answer section at s->aoff: skip its owner name, read its
 * header, take an A/AAAA address into s->addrs (at most max of them: past that s->cut is
 * set) and note whose it is (the question's, or a single other owner: the end of a CNAME
 * chain; several other owners set s->mixed). s->aoff moves past the record.
 * 0: the message ends or is malformed here. */
#define SD_MAX_LABELS_SKIP 32
#define SD_TYPE_A 1
#define SD_TYPE_AAAA 28
#define SD_DNS_HDR 12           /* bytes of the DNS header; the question follows */
#define SD_PTR_QUESTION (0xc000 | SD_DNS_HDR) /* a compression pointer to the question's name */
static __always_inline int sd_answer_record(struct sd_msgbuf *mb, struct sd_scratch *s, __u32 max)
{
    s->skipped = 0;
    __u32 owner = s->aoff;
    for (int l = 0; l < SD_MAX_LABELS_SKIP; l++) { /* the owner name */
        __u8 b;
        __u32 at = s->aoff;
        if (sd_mb_byte(mb, at, &b) < 0)
            return 0;
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
        return 0;
    __u32 aoff = s->aoff;
    __u8 rr[10];
    if (sd_mb_load(mb, aoff, rr, sizeof(rr)) < 0)
        return 0;
    __u16 type = (rr[0] << 8) | rr[1];
    __u32 ttl = ((__u32)rr[4] << 24) | ((__u32)rr[5] << 16) | ((__u32)rr[6] << 8) | rr[7];
    __u16 rdlen = (rr[8] << 8) | rr[9];
    aoff += 10;
    __u32 n = s->naddr;
    __u32 i = n & (SD_MAX_ANSWERS - 1);
    _Static_assert((SD_MAX_ANSWERS & (SD_MAX_ANSWERS - 1)) == 0, "the address mask needs a power of two");
    int got = 0;
    if ((type == SD_TYPE_A && rdlen == 4) || (type == SD_TYPE_AAAA && rdlen == 16)) {
        if (n >= max) {
            s->cut = 1;
        } else if (type == SD_TYPE_A) {
            s->addrs[i].a[0] = 0;
            s->addrs[i].a[1] = 0;
            s->addrs[i].a[2] = bpf_htonl(0xffff);
            got = sd_mb_load(mb, aoff, &s->addrs[i].a[3], 4) == 0;
        } else {
            got = sd_mb_load(mb, aoff, s->addrs[i].a, 16) == 0;
        }
    }
    if (got) {
        s->addrs[i].ttl = ttl;
        s->naddr = n + 1;
        /* whose address is it: the question's, or the end of a CNAME chain's? */
        __u8 ptr[2] = {};
        sd_mb_load(mb, owner, ptr, 2);
        __u16 p = ((__u16)ptr[0] << 8) | ptr[1];
        if (owner != SD_DNS_HDR && p != SD_PTR_QUESTION) { /* the question follows the header */
            /* who the owner is: a compression pointer names its target; a name written out
             * (even in part) is known only by where it is, so two of them are two owners
             * (found by an attacker: comparing their first two bytes let `abcd.ok.` vouch
             * for `auth.deny.`). Resolvers compress owners; the cost is nothing learned. */
            __u32 id = (ptr[0] & 0xc0) == 0xc0 ? p : 0x10000 | owner;
            if (!s->owner) {
                s->owner = owner;
                s->owner_id = id;
            } else if (s->owner_id != id) {
                s->mixed = 1;
            }
        }
    }
    s->aoff = aoff + rdlen;
    return 1;
}

#endif /* SD_DNS_H */
