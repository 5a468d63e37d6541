"""DNS data sent by reference (splice, vmsplice, sendfile): egress judges a query from pages
the process can still change, and the packet then waits in a queue (a qdisc, a device's
ring). Rewriting the pages in that time would hand the resolver a query nobody judged. A
packet to a DNS port whose data the kernel marks as shared with the sender is refused
whatever it holds (bpf/dns_skb.c sd_skb_byref), reported as rule `zerocopy`.

The queue here is a slow tbf on the loopback of a network namespace the test creates."""
from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from dnsutil import StreamServer, Zone, connect_pending, recv_or_error, resolver_netns
from netns import setns_net

NS = "sdbyref"
RES = "127.0.159.54"      # the namespace's resolver (UDP and TCP, port 53)

ZONE = {
    "pkgs.internal": [("A", "127.0.159.72", 60)],
    "auth.internal": [("A", "127.0.159.75", 60)],
}

POLICY = f"""
version: 1
name: byref
default: deny
allow:
  - "pkgs.internal"
  - "{RES}:53"
  - "[::1]:53"
deny:
  - {{domain: "auth.internal", reason: "circular"}}
"""


def _q(name: str, txid: int = 0x1234) -> bytes:
    from dnslib import DNSRecord
    r = DNSRecord.question(name, "A")
    r.header.id = txid
    return r.pack()


def _err(e: OSError) -> str:
    return _errno.errorcode.get(e.errno, str(e.errno))


def _attempt(fn, *args):
    """fn(*args), or the name of the errno it failed with."""
    try:
        return fn(*args)
    except OSError as e:
        return _err(e)


def _fill_queue(s: socket.socket) -> None:
    """Two allowed queries first: the second and whatever follows wait in the tbf queue."""
    for i in range(2):
        s.send(_q("pkgs.internal", 0x100 + i))


def _vmspliced(buf: mmap.mmap, n: int) -> int:
    """A pipe's read end holding the first n bytes of buf by reference (vmsplice)."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    iov = Iovec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), n)
    r, w = os.pipe()
    if libc.vmsplice(w, ctypes.byref(iov), 1, 0) != n:
        raise OSError(ctypes.get_errno(), "vmsplice")
    return r


def _udp_sendfile(ns: str, res: str, judged: bytes, sent: bytes) -> dict:
    """sendfile() of a file the process can write: the datagram's data are the page cache's
    pages; pwrite() changes them while the datagram waits."""
    setns_net(f"/run/netns/{ns}")
    out = {}
    s = socket.socket(socket.AF_INET6 if ":" in res else socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((res, 53))
    _fill_queue(s)
    with tempfile.TemporaryFile() as f:
        f.write(judged)
        f.flush()
        out["send"] = _attempt(os.sendfile, s.fileno(), f.fileno(), 0, len(judged))
        os.pwrite(f.fileno(), sent, 0)
        time.sleep(0.6)
    s.close()
    return out


def _udp_vmsplice(ns: str, res: str, judged: bytes, sent: bytes, ip_options: bytes = b"") -> dict:
    """vmsplice() of the process's own pages into a pipe, splice() of the pipe into the socket:
    the datagram references those pages, rewritten while it waits. As nobody: nothing here
    needs privilege."""
    setns_net(f"/run/netns/{ns}")
    os.setgid(65534)
    os.setuid(65534)
    out = {}
    s = socket.socket(socket.AF_INET6 if ":" in res else socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((res, 53))
    _fill_queue(s)
    if ip_options:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, ip_options)
    buf = mmap.mmap(-1, 4096)
    buf[:len(judged)] = judged
    r = _vmspliced(buf, len(judged))
    out["send"] = _attempt(os.splice, r, s.fileno(), len(judged))
    buf[:len(sent)] = sent                                 # while the datagram waits in the tbf
    time.sleep(1.0)
    s.close()
    return out


def _tcp_sendfile(ns: str, res: str, judged: bytes, sent: bytes) -> dict:
    """TCP: a sendfile() issued while the handshake is under way waits inside plain TCP (the
    connection enters the sockhash meanwhile, but this write never passes the stream
    program): egress judges its segment per packet, from the page cache's pages."""
    setns_net(f"/run/netns/{ns}")
    out = {}
    s, out["connect"] = connect_pending(res)          # EINPROGRESS: the SYN-ACK waits in the queue
    with tempfile.TemporaryFile() as f:
        m = struct.pack("!H", len(judged)) + judged
        d = struct.pack("!H", len(sent)) + sent
        f.write(m)
        f.flush()
        out["send"] = _attempt(os.sendfile, s.fileno(), f.fileno(), 0, len(m))
        time.sleep(0.02)
        os.pwrite(f.fileno(), d, 0)
        out["answer"] = recv_or_error(s, 1)
    s.close()
    return out


@pytest.fixture
def slow_netns():
    zone = Zone(ZONE)
    with resolver_netns(NS, zone, RES, slow=True, v6=True) as tcp:
        yield zone, tcp


def _seen(zone: Zone, tcp: StreamServer) -> list[str]:
    time.sleep(0.3)
    with tcp.lock:
        streamed = [m for c in tcp.conns for m in c["messages"]]
    return [*zone.seen, *streamed]


ATTACKS = {"udp-sendfile": _udp_sendfile, "udp-vmsplice": _udp_vmsplice, "tcp-sendfile": _tcp_sendfile}


@pytest.mark.parametrize("attack, res", [(a, r) for a in sorted(ATTACKS) for r in (RES, "::1")
                                         if r == RES or a.startswith("udp")])
@pytest.mark.parametrize("mode", [None, "audit"])
def test_dns_pages_rewritten_after_egress_judged_them_never_reach_the_resolver(policed, slow_netns, attack, res,
                                                                               mode):
    """Found by reading the kernel (the same rewrite an attacker did with MSG_ZEROCOPY): the
    data of a query sent by reference is refused at egress whatever it holds; audit mode
    lets it through and reports that it would not."""
    zone, tcp = slow_netns
    p = policed(POLICY, mode)
    out = p.run(ATTACKS[attack], NS, res, _q("pkgs.internal"), _q("auth.internal"))
    seen = _seen(zone, tcp)
    recs = p.close()
    if mode != "audit":
        assert "auth.internal" not in seen, (out, seen, recs)
        if attack.startswith("udp"):
            assert out["send"] == "EPERM", out
            assert seen.count("pkgs.internal") == 2, (out, seen)   # the copied queries before it
    verdict = "would-block" if mode == "audit" else "blocked"
    assert [r for r in recs if r["verdict"] == verdict and r["rule"] == "zerocopy"], (out, seen, recs)


def _ocsum(b: bytes) -> int:
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return s


def _same_sum(judged: bytes, name: str) -> bytes:
    """A query for name with judged's length and ones' complement sum (its txid chosen)."""
    s0 = _q(name, 0)
    out = struct.pack("!H", (_ocsum(judged) - _ocsum(s0)) % 0xffff) + s0[2:]
    assert len(out) == len(judged) and _ocsum(out) == _ocsum(judged)
    return out


def test_a_spliced_query_in_a_fragmented_datagram_never_reaches_the_resolver(policed):
    zone = Zone(ZONE)
    with resolver_netns(NS + "f", zone, RES, slow=True, mtu=68) as tcp:
        p = policed(POLICY)
        judged = _q("pkgs.internal", 0x4242)
        # found by an attacker: a datagram the kernel fragments is a chain of skbs (frag_list),
        # each with shared info of its own; 40 bytes of IP options (NOPs: no source route) and
        # an MTU of 68 leave the head skb only the UDP header, every byte of the vmspliced query
        # in the chain. The rewrite keeps the UDP checksum (computed at splice time): its txid
        # is chosen for that
        res = p.run(_udp_vmsplice, NS + "f", RES, judged, _same_sum(judged, "auth.internal"),
                    b"\x01" * 39 + b"\x00")
        seen = _seen(zone, tcp)
        recs = p.close()
    assert "auth.internal" not in seen, (res, seen, recs)
    assert res["send"] == "EPERM", res
    assert [r for r in recs if r["verdict"] == "blocked" and r["rule"] == "zerocopy"], (res, seen, recs)


SOL_UDP, UDP_SEGMENT = 17, 103


def _gso_send(ns: str, res: str, how: str) -> dict:
    """Found by an attacker: one UDP GSO send of two queries (UDP_SEGMENT of one query's
    length) is one skb at egress, cut into two datagrams after it; the second was never
    judged. As nobody: no capability needed."""
    setns_net(f"/run/netns/{ns}")
    os.setgid(65534)
    os.setuid(65534)
    a, b = _q("pkgs.internal", 0x1111), _q("auth.internal", 0x2222)   # the same length
    s = socket.socket(socket.AF_INET6 if ":" in res else socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((res, 53))
    out = {}
    try:
        if how == "setsockopt":
            s.setsockopt(SOL_UDP, UDP_SEGMENT, len(a))
            out["sent"] = s.send(a + b)
        else:                                              # per message: no setsockopt at all
            out["sent"] = s.sendmsg([a + b], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", len(a)))])
    except OSError as e:
        out["sent"] = _err(e)
    s.settimeout(0.5)
    answers = []
    try:
        while len(answers) < 2:
            answers.append(s.recv(4096)[:2].hex())
    except OSError:
        pass
    s.close()
    out["answers"] = answers
    return out


@pytest.mark.parametrize("how", ["setsockopt", "cmsg"])
@pytest.mark.parametrize("res", [RES, "::1"])
def test_a_udp_gso_send_of_several_queries_is_refused_whole(policed, res, how):
    zone = Zone(ZONE)
    with resolver_netns(NS + "g", zone, RES, v6=True) as tcp:
        p = policed(POLICY)
        out = p.run(_gso_send, NS + "g", res, how)
        seen = _seen(zone, tcp)
        recs = p.close()
    assert "auth.internal" not in seen and "pkgs.internal" not in seen, (out, seen, recs)
    assert out["sent"] == "EPERM", out
    assert [r for r in recs if r["verdict"] == "blocked" and r["rule"] == "malformed-query"], (out, recs)
