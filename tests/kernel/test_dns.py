"""DNS-aware filtering against a real DNS server on loopback, from real policed processes."""
from __future__ import annotations

import random
import time

import pytest

from dnsutil import Server, Zone, getaddrinfo_in, query, send_raw
from kutil import connect

SERVER = "127.0.0.157"

ZONE = {
    "api.github.com": [("A", "127.0.0.70", 60)],
    "notgithub.com": [("A", "127.0.0.71", 60)],
    "pkgs.internal": [("A", "127.0.0.72", 60), ("AAAA", "::1", 60)],
    "alias.pkgs.internal": [("CNAME", "edge.cdn.test", 60)],
    "edge.cdn.test": [("CNAME", "node7.cdn.test", 60)],
    "node7.cdn.test": [("A", "127.0.0.73", 60)],
    "short.pkgs.internal": [("A", "127.0.0.74", 1)],
    "auth.internal": [("A", "127.0.0.75", 60)],
    "web.pkgs.internal": [("A", "127.0.0.76", 60)],
    "ports.test": [("A", "127.0.0.77", 60)],
}

POLICY = f"""
version: 1
name: dns-test
default: deny
allow:
  - "pkgs.internal"
  - "*.pkgs.internal"
  - "notgithub.com"
  - {{domain: web.pkgs.internal, ports: [443]}}
  - {{domain: ports.test, ports: [443], protocol: tcp}}
  - "{SERVER}:53"
  - "[::1]:53"
deny:
  - {{domain: "*.github.com", reason: "circular: deploys must not need GitHub during an outage"}}
  - "auth.internal"
"""


@pytest.fixture(scope="module")
def dns():
    srv = Server(Zone(ZONE), SERVER)
    srv6 = Server(Zone(ZONE), "::1")
    yield srv
    srv.stop()
    srv6.stop()


def _recs(p, **match):
    return [r for r in p.close() if all(r.get(k) == v for k, v in match.items())]


def test_denied_name_fails_at_once_with_the_name_in_the_report(policed, dns):
    p = policed(POLICY)
    status, ms = p.run(query, "api.github.com", SERVER)
    assert status == "EPERM" and ms < 100
    rec = _recs(p, verdict="blocked", kind="dns")
    assert rec and rec[0]["domain"] == "api.github.com" and rec[0]["dst_port"] == 53
    assert rec[0]["reason"] == "circular: deploys must not need GitHub during an outage"
    assert "api.github.com" not in dns.zone.seen


def test_getaddrinfo_of_denied_name_fails_fast(policed, dns):
    p = policed(POLICY)
    status, _msg, ms = p.run(getaddrinfo_in, SERVER, "api.github.com")
    assert status == "error" and ms < 1000, (status, _msg, ms)
    status, ips, _ms = p.run(getaddrinfo_in, SERVER, "pkgs.internal")
    assert status == "ok" and "127.0.0.72" in ips


def test_allowed_name_resolves_and_its_ip_connects_under_default_deny(policed, dns, listener):
    lst = listener("127.0.0.72")
    other = listener("127.0.0.79")
    p = policed(POLICY)
    assert p.run(connect, "127.0.0.72", lst.port) == "EPERM"        # not resolved yet: default deny
    assert p.run(query, "pkgs.internal", SERVER) == ("ok", ["127.0.0.72"])
    assert p.run(connect, "127.0.0.72", lst.port) == "ok"           # learned from an allowed name
    assert p.run(connect, "127.0.0.79", other.port) == "EPERM"      # never resolved
    rec = _recs(p, verdict="allowed", kind="connect", dst_ip="127.0.0.72")
    assert rec and rec[0]["domain"] == "pkgs.internal" and rec[0]["rule"] == "pkgs.internal"


def test_mixed_case_and_trailing_dot(policed, dns):
    p = policed(POLICY)
    assert p.run(query, "ApI.GiThUb.CoM.", SERVER)[0] == "EPERM"
    assert p.run(query, "PKGS.Internal.", SERVER) == ("ok", ["127.0.0.72"])


def test_wildcard_matches_whole_labels_only(policed, dns):
    p = policed(POLICY)
    assert p.run(query, "api.github.com", SERVER)[0] == "EPERM"
    assert p.run(query, "notgithub.com", SERVER) == ("ok", ["127.0.0.71"])
    assert p.run(query, "github.com", SERVER)[0] == "ok"             # apex: not *.github.com, an unlisted name
    recs = p.close()
    apex = [r for r in recs if r["domain"] == "github.com"]
    assert apex and (apex[0]["verdict"], apex[0]["rule"]) == ("allowed", "dns.unlisted")


def test_tcp_dns_query_for_denied_name_fails_the_write(policed, dns):
    p = policed(POLICY)
    status, ms = p.run(query, "auth.internal", SERVER, "A", True, 1.5)
    assert status == "EACCES" and ms < 1000                          # the stream path (test_dns_tcp.py)
    assert "auth.internal" not in dns.zone.seen
    assert p.run(query, "pkgs.internal", SERVER, "A", True) == ("ok", ["127.0.0.72"])
    assert _recs(p, verdict="blocked", kind="dns", proto="tcp", domain="auth.internal")


def test_cname_chain_to_allowed_name(policed, dns, listener):
    lst = listener("127.0.0.73")
    p = policed(POLICY)
    assert p.run(query, "alias.pkgs.internal", SERVER) == ("ok", ["127.0.0.73"])
    assert p.run(connect, "127.0.0.73", lst.port) == "ok"
    rec = _recs(p, kind="connect", dst_ip="127.0.0.73")
    assert rec[0]["verdict"] == "allowed" and rec[0]["domain"] == "alias.pkgs.internal"


def test_ttl_expiry_removes_reachability(policed, dns, listener):
    lst = listener("127.0.0.74")
    p = policed(POLICY + "dns: {min_ttl: 0}\n")          # the record's own TTL (floored at 2 s)
    assert p.run(query, "short.pkgs.internal", SERVER) == ("ok", ["127.0.0.74"])
    assert p.run(connect, "127.0.0.74", lst.port) == "ok"
    time.sleep(2.5)                                                  # TTL 1 s, floored at 2 s
    assert p.run(connect, "127.0.0.74", lst.port) == "EPERM"
    assert p.run(query, "short.pkgs.internal", SERVER)[0] == "ok"    # a fresh lookup
    assert p.run(connect, "127.0.0.74", lst.port) == "ok"
    expired = [r for r in _recs(p, kind="connect", dst_ip="127.0.0.74") if r["verdict"] == "blocked"]
    assert expired[0]["domain"] == "short.pkgs.internal" and "TTL" in expired[0]["note"]


def test_learned_addresses_outlive_a_short_ttl_by_default(policed, dns, listener):
    lst = listener("127.0.0.74")
    p = policed(POLICY)                                                 # dns.min_ttl: 3600 by default
    assert p.run(query, "short.pkgs.internal", SERVER) == ("ok", ["127.0.0.74"])
    time.sleep(2.5)                                                     # the record's TTL is 1 s
    assert p.run(connect, "127.0.0.74", lst.port) == "ok"               # clients reuse what they resolved


def test_ipv6_aaaa_path(policed, dns, listener):
    lst = listener("::1")
    p = policed(POLICY)
    assert p.run(connect, "::1", lst.port) == "EPERM"
    assert p.run(query, "pkgs.internal", "::1", "AAAA") == ("ok", ["::1"])
    assert p.run(connect, "::1", lst.port) == "ok"
    assert p.run(query, "api.github.com", "::1", "AAAA")[0] == "EPERM"


def test_port_narrowed_name_rule_applies_to_connects_of_its_learned_ips(policed, dns):
    from ocihook.policy import Dest, decide, to_mapped
    p = policed(POLICY)
    assert p.run(query, "ports.test", SERVER) == ("ok", ["127.0.0.77"])   # allowed: a rule for it exists
    assert p.run(connect, "127.0.0.77", 443) == "refused"                 # reached the host
    assert p.run(connect, "127.0.0.77", 80) == "EPERM"                    # the rule covers 443 only
    assert p.run(connect, "127.0.0.77", 443, "udp") == "EPERM"            # and tcp only
    # a narrow rule next to a wildcard: where it does not apply the wildcard decides
    assert p.run(query, "web.pkgs.internal", SERVER) == ("ok", ["127.0.0.76"])
    assert p.run(connect, "127.0.0.76", 80) == "refused"
    for port, proto in ((443, "tcp"), (80, "tcp"), (443, "udp")):
        want = decide(p.policy, Dest(ip=to_mapped("127.0.0.77"), port=port, proto=proto, name="ports.test"))
        assert (want.verdict == "allow") == (port == 443 and proto == "tcp")


def test_query_to_unlisted_resolver_is_denied(policed, dns):
    p = policed(POLICY.replace("allow:\n", "allow:\n  - '127.0.0.0/8'\n", 1) + "dns:\n  resolvers: ['127.0.0.157']\n")
    assert p.run(query, "pkgs.internal", SERVER)[0] == "ok"
    assert p.run(send_raw, b"\x00" * 12, "127.0.0.154") == "EPERM"
    rec = _recs(p, verdict="blocked", dst_ip="127.0.0.154")
    assert rec and rec[0]["rule"] == "dns.resolvers"


def _qname_packet(labels: list[bytes]) -> bytes:
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"".join(
        bytes([len(x)]) + x for x in labels) + b"\x00\x00\x01\x00\x01"


def test_malformed_queries_get_the_safe_verdict(policed, dns):
    deny_some = policed(POLICY.replace("default: deny", "default: allow"))
    bad = [b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",   # pointer in question
           b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03ab",                     # truncated
           _qname_packet([b"a" * 63] * 5),                                                   # > 253 bytes
           b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01",  # two questions
           _qname_packet([b"x.github", b"com"]),                                             # dot inside a label
           bytes(random.Random(1).randbytes(200))]
    for pkt in bad:
        assert deny_some.run(send_raw, pkt, SERVER) == "EPERM", pkt[:20]
    assert deny_some.run(query, "notgithub.com", SERVER)[0] == "ok"
    lenient = policed("version: 1\nname: lenient\ndefault: allow\ndeny: ['127.0.0.250']\n")
    for pkt in bad:
        assert lenient.run(send_raw, pkt, SERVER) == "ok"
    recs = deny_some.close()
    assert any(r["rule"] == "malformed-query" for r in recs)


def test_long_names_do_not_bypass_a_wildcard_deny(policed, dns):
    p = policed(POLICY.replace("default: deny", "default: allow"))
    deep = ".".join(["a"] * 40) + ".api.github.com"                   # 40+ labels: too many to learn
    assert p.run(query, deep, SERVER)[0] == "EPERM"
    longest = ".".join(["b" * 60] * 3) + ".x.github.com"              # ~195 bytes
    assert p.run(query, longest, SERVER)[0] == "EPERM"


LABELS = ["a", "b", "github", "com", "x-y", "c0"]


def _random_name_policy(rng: random.Random) -> str:
    lines = ["version: 1", "name: prop", f"default: {rng.choice(['allow', 'deny'])}", "allow:",
             f"  - '{SERVER}:53'"]
    deny = []
    for _ in range(rng.randint(1, 12)):
        base = ".".join(rng.choice(LABELS) for _ in range(rng.randint(1, 3)))
        target = ("*." if rng.random() < 0.5 else "") + base
        rule = f"{{domain: '{target}'" + (", ports: [443]" if rng.random() < 0.3 else "") + "}"
        (deny if rng.random() < 0.5 else lines).append(f"  - {rule}")
    return "\n".join(lines + ["deny:"] + (deny or ["  - '127.0.0.251'"])) + "\n"


def _random_names(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        name = ".".join(rng.choice(LABELS) for _ in range(rng.randint(1, 5)))
        name = "".join(ch.upper() if rng.random() < 0.3 else ch for ch in name)   # 0x20 randomisation
        out.append(name + ("." if rng.random() < 0.2 else ""))
    return out


def _send_all(names):
    from dnslib import DNSRecord
    return [send_raw(DNSRecord.question(n).pack(), SERVER) for n in names]


@pytest.mark.parametrize("seed", range(8))
def test_kernel_query_verdict_equals_decide_query(policed, seed):
    from ocihook.policy import decide_query
    rng = random.Random(seed)
    p = policed(_random_name_policy(rng))
    names = _random_names(rng, 120)
    got = p.run(_send_all, names)
    wrong = [(n, g, decide_query(p.policy, n).verdict) for n, g in zip(names, got)
             if (g == "EPERM") != (decide_query(p.policy, n).verdict == "deny")]
    assert not wrong, wrong[:10]
    for rec in p.close():      # and the report names the same deciding rule
        if rec["kind"] == "dns":
            assert rec["rule"] == decide_query(p.policy, rec["domain"]).rule_text, rec


def _kernel_view(pkt: bytes):
    """What the egress program makes of a packet to port 53: a name, or None (unparseable:
    short, QR set, another opcode, not one question...) — the same rules, written
    independently. Anything sent to port 53 is judged as a query."""
    if len(pkt) < 12:
        return None
    if pkt[2] & 0x80:
        return None
    if (pkt[2] >> 3) & 0x0F or pkt[4:6] != b"\x00\x01":
        return None
    labels, pos = [], 12
    while True:
        if pos >= len(pkt):
            return None
        n = pkt[pos]
        pos += 1
        if n == 0:
            break
        if n > 63 or pos + n > len(pkt):
            return None
        label = pkt[pos:pos + n]
        if b"." in label:
            return None
        labels.append(label.lower())
        pos += n
        if len(b".".join(labels)) > 253:
            return None
    if not labels:
        return None
    return b".".join(labels).decode("latin-1")


def test_random_packets_to_port_53_get_the_safe_verdict(policed, dns):
    from ocihook.policy import decide_query
    rng = random.Random(7)
    pkts = []
    for _ in range(300):
        kind = rng.random()
        if kind < 0.4:
            pkts.append(rng.randbytes(rng.randint(12, 300)))
        elif kind < 0.7:   # a header that asks one question, then garbage labels
            pkts.append(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + rng.randbytes(rng.randint(0, 270)))
        else:              # real names with random case, some over-long, some with 0-length labels
            labels = [bytes(rng.choice(b"aAbB-.0") for _ in range(rng.randint(0, 70))) for _ in range(rng.randint(1, 6))]
            pkts.append(_qname_packet(labels))
    p = policed(POLICY.replace("default: deny", "default: allow"))
    got = p.run(lambda: [send_raw(x, SERVER) for x in pkts])
    for pkt, g in zip(pkts, got):
        view = _kernel_view(pkt)
        if view is None:
            want = "EPERM"                       # unparseable and the policy denies names: dropped
        else:
            try:
                want = "EPERM" if decide_query(p.policy, view).verdict == "deny" else "ok"
            except ValueError:                   # a name decide_query refuses (e.g. '*'): judge by suffixes
                continue
        assert g == want, (pkt[:40], view, g)
    assert p.run(query, "pkgs.internal", SERVER) == ("ok", ["127.0.0.72"])   # still working afterwards


def _answer(query: bytes, owner: bytes, ip: str, mode: str) -> bytes:
    """An answer to `query` (its id and question) carrying one A record; `mode` makes it hostile."""
    import struct
    qend = 12 + query[12:].index(b"\0") + 5
    hdr = query[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    at = qend                                            # where the answer's owner name starts
    if mode == "loop":
        owner = struct.pack("!H", 0xC000 | at)           # points at itself
    elif mode == "forward":
        owner = struct.pack("!H", 0xC000 | (at + 40))    # points past itself
    rr = owner + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(int(x) for x in ip.split("."))
    pkt = hdr + query[12:qend] + rr
    return pkt[:-2] if mode == "truncated" else pkt


def test_only_answers_to_real_questions_teach_addresses(policed, listener):
    """Hostile answers (pointer loops, forward pointers, truncation) to a real query, and
    forged answers nobody asked for — even one the policed process sends itself from a port
    53 of its own — teach nothing; a well-formed answer to a real query does."""
    import socket as so
    import threading
    lst = listener("127.0.0.91")
    modes = ["loop", "forward", "truncated", "good"]
    srv = so.socket(so.AF_INET, so.SOCK_DGRAM)
    srv.bind(("127.0.0.158", 53))

    def serve():
        for mode in modes:
            q, peer = srv.recvfrom(4096)
            ip = "127.0.0.92" if mode == "good" else "127.0.0.91"
            srv.sendto(_answer(q, b"\xc0\x0c", ip, mode), peer)
    threading.Thread(target=serve, daemon=True).start()
    p = policed(POLICY.replace('  - "[::1]:53"', '  - "[::1]:53"\n  - "127.0.0.158:53"\n  - "127.0.0.159:53"\n  - "127.0.0.1/32"'))

    def inside():
        from dnslib import DNSRecord
        out = []
        for _ in modes:                                  # ask for real; the answer may be garbage
            with so.socket(so.AF_INET, so.SOCK_DGRAM) as c:
                c.settimeout(1)
                c.sendto(DNSRecord.question("pkgs.internal").pack(), ("127.0.0.158", 53))
                out.append(len(c.recv(4096)))
        # a forged answer to ourselves, from a resolver-looking socket of our own
        with so.socket(so.AF_INET, so.SOCK_DGRAM) as fake, so.socket(so.AF_INET, so.SOCK_DGRAM) as me:
            try:
                fake.bind(("127.0.0.159", 53))           # refused (serve_dns): tests/kernel/test_dns_teach.py
                out.append("bound")
            except PermissionError:
                fake.bind(("127.0.0.159", 0))
            me.bind(("127.0.0.1", 0))
            q = DNSRecord.question("pkgs.internal").pack()
            fake.sendto(_answer(q, b"\xc0\x0c", "127.0.0.93", "good"), me.getsockname())
            me.settimeout(1)
            me.recv(4096)
        return out + [connect("127.0.0.91", lst.port), connect("127.0.0.92", lst.port),
                      connect("127.0.0.93", lst.port)]
    try:
        res = p.run(inside)
    finally:
        srv.close()
    assert res[-3:] == ["EPERM", "refused", "EPERM"], res


def test_audit_learned_name_without_rules_is_judged_like_decide(policed, dns, listener):
    """In audit mode a lookup denied only by the default still gets its answer; connects to
    the address are then judged by CIDR rules and the default, exactly as decide() does."""
    from ocihook.policy import Dest, decide, to_mapped
    lst = listener("127.0.0.71")
    p = policed(f"version: 1\nname: a\nmode: audit\ndefault: deny\nallow: ['127.0.0.64/26', '{SERVER}:53']\n")
    assert p.run(query, "notgithub.com", SERVER) == ("ok", ["127.0.0.71"])     # would-block, but answered
    assert p.run(connect, "127.0.0.71", lst.port) == "ok"
    rec = [r for r in p.close() if r["kind"] == "connect"][0]
    want = decide(p.policy, Dest(to_mapped("127.0.0.71"), lst.port, "tcp", "notgithub.com"))
    assert (rec["verdict"], rec["rule"]) == ("allowed", want.rule_text) and want.verdict == "allow"
