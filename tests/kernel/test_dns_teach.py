"""Teaching the kernel lies (issue 10, class 4): answers made inside a policed cgroup, pending
queries overwritten by a reused id, and queries the parser would not recognise."""
from __future__ import annotations

import os
import socket
import struct

import pytest
from dnslib import DNSRecord

from dnsutil import Server, Zone, wire_name
from netns import err, hopopts_pad, own_netns

RESOLVER = "127.0.0.163"

ZONE = {
    "alias.allowed": [("CNAME", "evil.denied", 60)],
    "evil.denied": [("A", "127.0.0.177", 60)],
    "other.allowed": [("A", "127.0.0.178", 60)],
    "good.allowed": [("A", "127.0.0.179", 60)],
}

POLICY = f"""
version: 1
name: teach
default: deny
allow:
  - "*.allowed"
  - "127.0.0.0/24"
  - "[::1]:53"
deny:
  - evil.denied
dns:
  resolvers: ["{RESOLVER}", "::1"]
"""


@pytest.fixture(scope="module")
def dns():
    srv = Server(Zone(ZONE), RESOLVER)
    yield srv
    srv.stop()


def _blocked(recs, **want):
    return [r for r in recs if r["verdict"] in ("blocked", "would-block")
            and all(r.get(k) == v for k, v in want.items())]


# ---------------------------------------------------------------- (a) answers made in here


def _bind53(family, kind, addr):
    own_netns()
    with socket.socket(family, kind) as s:
        return err(lambda: s.bind((addr, 53)) or "bound")


@pytest.mark.parametrize("family,kind,addr", [
    (socket.AF_INET, socket.SOCK_DGRAM, RESOLVER), (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
    (socket.AF_INET6, socket.SOCK_DGRAM, "::1"), (socket.AF_INET6, socket.SOCK_STREAM, "::"),
    (socket.AF_INET6, socket.SOCK_DGRAM, "::ffff:127.0.0.163")])
def test_binding_port_53_is_refused_unless_the_policy_serves_dns(policed, family, kind, addr):
    p = policed(POLICY)
    assert p.run(_bind53, family, kind, addr) == "EPERM"
    assert _blocked(p.close(), kind="bind", rule="serve_dns", dst_port=53)
    q = policed(POLICY + "serve_dns: allow\n")
    assert q.run(_bind53, family, kind, addr) == "bound"


def _answer(query: bytes, ip: str) -> bytes:
    q = DNSRecord.parse(query)
    from dnslib import QTYPE, RR, A
    r = q.reply()
    r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(ip), ttl=60))
    return r.pack()


def test_a_server_bound_before_the_policy_cannot_answer_its_own_queries(pins):
    """The attack: own the resolver's address and port 53 in a namespace of one's own
    (bound before the policy arrived, so bind() never saw it), ask an allowed name, answer
    with an address the policy denies. The answer never leaves, nothing is learned."""
    import secrets
    from ocihook import cgroup, events, session
    from ocihook.compiler import compile_policy
    from ocihook.policy import load_policy_text
    path = cgroup.create(f"teach-{secrets.token_hex(3)}")
    compiled = compile_policy(load_policy_text(POLICY, "t"))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            cgroup.move_self(path)
            own_netns()
            srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            srv.bind((RESOLVER, 53))
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c, socket.socket() as t:
                c.settimeout(1)
                out = [err(lambda: c.sendto(DNSRecord.question("good.allowed").pack(), (RESOLVER, 53)) and "asked")]
                q, peer = srv.recvfrom(4096)
                out.append(err(lambda: srv.sendto(_answer(q, "10.9.9.9"), peer) and "answered"))
                out.append(err(lambda: c.recv(4096) and "got an answer"))
                t.settimeout(1)
                out.append(err(lambda: t.connect(("10.9.9.9", 80)) or "ok"))
            os.write(out_w, ",".join(out).encode())
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        att = session.apply(path, compiled)
        os.write(go_w, b"1")
        result = os.read(out_r, 256).decode().split(",")
        os.waitpid(pid, 0)
    finally:
        cgroup.remove(path)
    recs = events.to_records(session.release(att, compiled), compiled, "t")
    assert result == ["asked", "EPERM", "timeout", "EPERM"], result
    assert _blocked(recs, kind="packet", rule="serve_dns")
    assert _blocked(recs, kind="connect", dst_ip="10.9.9.9", rule="default")


# ---------------------------------------------------------------- (b) pending queries


def test_a_reused_id_does_not_overwrite_the_pending_question(policed, dns):
    """alias.allowed is a CNAME of a denied name: its answer teaches 127.0.0.177 as denied,
    which beats the CIDR allow (and is dropped: the lookup fails). A second question with
    the same id, sent at once, must not replace the first one (else the first answer teaches
    nothing and the CIDR allows)."""
    p = policed(POLICY)

    def race():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(2)
            first = DNSRecord.question("alias.allowed")
            second = DNSRecord.question("other.allowed")
            second.header.id = first.header.id
            c.sendto(first.pack(), (RESOLVER, 53))
            c.sendto(second.pack(), (RESOLVER, 53))
            answers = []
            try:
                while len(answers) < 2:
                    answers.append(str(DNSRecord.parse(c.recv(4096)).q.qname))
            except OSError:
                pass
        with socket.socket() as t:
            t.settimeout(1)
            return sorted(answers), err(lambda: t.connect(("127.0.0.177", 80)) or "ok")
    answers, verdict = p.run(race)
    assert answers == ["other.allowed."]   # alias.allowed's answer was dropped (its chain end is denied)
    assert verdict == "EPERM"
    rec = _blocked(p.close(), kind="connect", dst_ip="127.0.0.177")
    assert rec and rec[0]["rule"] == "evil.denied" and rec[0]["domain"] == "alias.allowed"


# ---------------------------------------------------------------- (c) queries in disguise


def _query(name: str, qr=False, opcode=0, qdcount=None) -> bytes:
    raw = bytearray(DNSRecord.question(name).pack())
    raw[2] = (raw[2] & 0x07) | (0x80 if qr else 0) | (opcode << 3)
    if qdcount is not None:
        raw[4:6] = struct.pack("!H", qdcount)
    return bytes(raw)


def _send(packet: bytes, dst: str = RESOLVER, opts=()) -> str:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        for level, name, value in opts:
            s.setsockopt(level, name, value)
        return err(lambda: s.sendto(packet, (dst, 53)) and "sent")


def test_queries_with_odd_header_bits_are_judged_as_queries(policed, dns):
    p = policed(POLICY)
    for variant in ({"qr": True}, {"opcode": 2}, {"opcode": 4}, {"qdcount": 0}, {"qdcount": 2}):
        assert p.run(_send, _query("evil.denied", **variant)) == "EPERM", variant
        assert p.run(_send, _query("good.allowed", **variant)) == "EPERM", variant  # unparseable: safe verdict
    assert p.run(_send, _query("good.allowed")) == "sent"
    recs = p.close()
    assert _blocked(recs, kind="dns", rule="malformed-query")


def test_queries_behind_ip_options_and_extension_headers_are_parsed(policed, dns):
    """Hop-by-hop and destination options (CAP_NET_RAW, which root and podman have) and IPv4
    options (not a route) move the UDP header: the query is still found and judged."""
    p = policed(POLICY)
    v4_timestamp = [(0, 4, bytes([0x44, 8, 5, 0, 0, 0, 0, 0]))]
    hop = [(41, 54, hopopts_pad())]
    dst = [(41, 59, hopopts_pad())]
    both = hop + dst

    def in_own_netns(packet, dst_addr, opts):
        own_netns()
        return _send(packet, dst_addr, opts)
    assert p.run(_send, _query("evil.denied"), RESOLVER, v4_timestamp) == "EPERM"
    assert p.run(_send, _query("good.allowed"), RESOLVER, v4_timestamp) == "sent"
    for opts in (hop, dst, both):
        assert p.run(in_own_netns, _query("evil.denied"), "::1", opts) == "EPERM", opts
        assert p.run(in_own_netns, _query("good.allowed"), "::1", opts) == "sent", opts
    recs = p.close()
    names = {(r["family"], r["domain"]) for r in _blocked(recs, kind="dns")}
    assert {(4, "evil.denied"), (6, "evil.denied")} <= names


def test_tcp_query_with_qr_set_never_reaches_the_resolver(policed, dns):
    p = policed(POLICY)

    def tcp_query():
        with socket.create_connection((RESOLVER, 53), timeout=2) as s:
            packet = _query("evil.denied", qr=True)
            return err(lambda: s.sendall(struct.pack("!H", len(packet)) + packet))
    assert p.run(tcp_query) == "EACCES"          # the stream path fails the write (test_dns_tcp.py)
    assert "evil.denied" not in dns.zone.seen
    assert _blocked(p.close(), kind="dns", rule="malformed-query")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("first_owner", ["abcd.ok.test", "bbcd.ok.test"])
def test_owners_written_out_are_told_apart_by_more_than_their_first_bytes(policed, first_owner, transport):
    """An answer to an allowed name whose A records carry owners written out in full (not
    compressed): `abcd.ok.test` and then `auth.deny.test`. Their first two bytes are the
    same (4, 'a'): compared by those, the denied name's address was learned as the allowed
    question's (found by an attacker). Two owners written out are two owners: nothing is
    learned, and under default deny neither address connects. Over UDP and over TCP (the
    stream path walks the same records)."""
    import threading
    proto = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    srv = socket.socket(socket.AF_INET, proto)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.164", 53))
    if transport == "tcp":
        srv.listen(2)
    stop = threading.Event()

    def answer(q):
        i = 12
        while q[i]:
            i += q[i] + 1
        rrs = [wire_name(first_owner) + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([127, 0, 1, 2]),
               wire_name("auth.deny.test") + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([127, 0, 1, 3])]
        return q[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, len(rrs), 0, 0) + q[12:i + 5] + b"".join(rrs)

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                if transport == "udp":
                    q, peer = srv.recvfrom(4096)
                    srv.sendto(answer(q), peer)
                else:
                    c, _ = srv.accept()
                    with c:
                        c.settimeout(2)
                        n = int.from_bytes(c.recv(2), "big")
                        q = c.recv(n)
                        a = answer(q)
                        c.sendall(len(a).to_bytes(2, "big") + a)
            except OSError:
                continue
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    policy = """
version: 1
name: collide
default: deny
allow: [alias.ok.test]
deny: [{domain: auth.deny.test, reason: denied name}]
dns: {resolvers: ["127.0.0.164"]}
"""

    def client():
        q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + wire_name("alias.ok.test") + b"\0\x01\0\x01"
        if transport == "udp":
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.settimeout(2)
            c.sendto(q, ("127.0.0.164", 53))
            c.recv(4096)
        else:
            with socket.create_connection(("127.0.0.164", 53), timeout=2) as c:
                c.sendall(len(q).to_bytes(2, "big") + q)
                n = int.from_bytes(c.recv(2), "big")
                while n > 0:
                    n -= len(c.recv(n))
        out = []
        for addr in ("127.0.1.2", "127.0.1.3"):
            with socket.socket() as s:
                s.settimeout(1)
                out.append(err(lambda: s.connect((addr, 9)) or "ok"))
        return out
    try:
        p = policed(policy)
        got = p.run(client)
        recs = p.close()
    finally:
        stop.set()
        t.join()
        srv.close()
    assert got == ["EPERM", "EPERM"], got                     # not "ok"/"refused" for 127.0.1.3
    denied = [r for r in recs if r["kind"] == "connect" and r["dst_ip"] == "127.0.1.3"]
    assert denied and all(r["verdict"] == "blocked" and r.get("domain") != "alias.ok.test" for r in denied), denied
