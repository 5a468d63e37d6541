"""DNS data sent by reference (splice, vmsplice, sendfile): egress judges a query from pages
the process can still change, and the packet then waits in a queue (a qdisc, a device's
ring). Rewriting the pages in that time would hand the resolver a query nobody judged. A
packet to a DNS port whose data the kernel marks as shared with the sender is refused
whatever it holds (bpf/dns_skb.c sd_skb_byref), reported as rule `zerocopy`.

The queue here is a slow tbf on the loopback of a network namespace the test creates."""
from __future__ import annotations

import contextlib
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
from dnslib.server import DNSLogger, DNSServer

from dnsutil import StreamServer, Zone

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
deny:
  - {{domain: "auth.internal", reason: "circular"}}
"""


def _q(name: str, txid: int = 0x1234) -> bytes:
    from dnslib import DNSRecord
    r = DNSRecord.question(name, "A")
    r.header.id = txid
    return r.pack()


def _setns_net(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:   # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def _err(e: OSError) -> str:
    return _errno.errorcode.get(e.errno, str(e.errno))


def _fill_queue(s: socket.socket) -> None:
    """Two allowed queries first: the second and whatever follows wait in the tbf queue."""
    for i in range(2):
        s.send(_q("pkgs.internal", 0x100 + i))


def _udp_sendfile(ns: str, res: str, judged: bytes, sent: bytes) -> dict:
    """sendfile() of a file the process can write: the datagram's data are the page cache's
    pages; pwrite() changes them while the datagram waits."""
    _setns_net(f"/run/netns/{ns}")
    out = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((res, 53))
    _fill_queue(s)
    with tempfile.TemporaryFile() as f:
        f.write(judged)
        f.flush()
        try:
            out["send"] = os.sendfile(s.fileno(), f.fileno(), 0, len(judged))
        except OSError as e:
            out["send"] = _err(e)
        os.pwrite(f.fileno(), sent, 0)
        time.sleep(0.6)
    s.close()
    return out


def _udp_vmsplice(ns: str, res: str, judged: bytes, sent: bytes) -> dict:
    """vmsplice() of the process's own pages into a pipe, splice() of the pipe into the socket:
    the datagram references those pages, rewritten while it waits."""
    _setns_net(f"/run/netns/{ns}")
    libc = ctypes.CDLL(None, use_errno=True)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    out = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((res, 53))
    _fill_queue(s)
    buf = mmap.mmap(-1, 4096)
    buf[:len(judged)] = judged
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    iov = Iovec(addr, len(judged))
    r, w = os.pipe()
    if libc.vmsplice(w, ctypes.byref(iov), 1, 0) != len(judged):
        raise OSError(ctypes.get_errno(), "vmsplice")
    try:
        out["send"] = os.splice(r, s.fileno(), len(judged))
    except OSError as e:
        out["send"] = _err(e)
    buf[:len(sent)] = sent
    time.sleep(0.6)
    s.close()
    del iov, addr
    return out


def _tcp_sendfile(ns: str, res: str, judged: bytes, sent: bytes) -> dict:
    """TCP: a sendfile() issued while the handshake is under way waits inside plain TCP (the
    connection enters the sockhash meanwhile, but this write never passes the stream
    program): egress judges its segment per packet, from the page cache's pages."""
    _setns_net(f"/run/netns/{ns}")
    out = {}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    out["connect"] = s.connect_ex((res, 53))           # EINPROGRESS: the SYN-ACK waits in the queue
    s.setblocking(True)
    with tempfile.TemporaryFile() as f:
        m = struct.pack("!H", len(judged)) + judged
        d = struct.pack("!H", len(sent)) + sent
        f.write(m)
        f.flush()
        try:
            out["send"] = os.sendfile(s.fileno(), f.fileno(), 0, len(m))
        except OSError as e:
            out["send"] = _err(e)
        time.sleep(0.02)
        os.pwrite(f.fileno(), d, 0)
        s.settimeout(1)
        try:
            out["answer"] = len(s.recv(4096))
        except OSError as e:
            out["answer"] = repr(e)
    s.close()
    return out


@contextlib.contextmanager
def _resolver_netns(name: str, slow: bool, mtu: int | None = None, v6: bool = False):
    """A network namespace of the test's own: lo up (mtu), a resolver on RES (UDP, and TCP:
    StreamServer) and on ::1 (UDP, v6), a slow tbf on lo when slow: 1000 bytes/s after a
    100-byte burst, so a packet behind the first waits ~0.1 s after egress judged it.
    Yields (zone, tcp server)."""
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "add", name], check=True)
    servers = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up", *(["mtu", str(mtu)] if mtu else [])],
                       check=True)
        if slow:
            subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit", "burst",
                            "100", "limit", "20000"], check=True)
        zone = Zone(ZONE)
        me = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            _setns_net(f"/run/netns/{name}")
            quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
            for addr in (RES, "::1") if v6 else (RES,):
                deadline = time.monotonic() + 5
                while True:   # ::1 is usable once duplicate-address detection let it be
                    try:
                        servers.append(DNSServer(zone, address=addr, port=53, logger=quiet))
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                servers[-1].start_thread()
            tcp = StreamServer(zone, RES)
        finally:
            ctypes.CDLL(None, use_errno=True).setns(me, 0x40000000)
            os.close(me)
        yield zone, tcp
        for srv in servers:
            srv.stop()
        tcp.stop()
    finally:
        subprocess.run(["ip", "netns", "del", name])


@pytest.fixture
def slow_netns():
    with _resolver_netns(NS, slow=True) as out:
        yield out


def _seen(zone: Zone, tcp: StreamServer) -> list[str]:
    time.sleep(0.3)
    with tcp.lock:
        streamed = [m for c in tcp.conns for m in c["messages"]]
    return [*zone.seen, *streamed]


ATTACKS = {"udp-sendfile": _udp_sendfile, "udp-vmsplice": _udp_vmsplice, "tcp-sendfile": _tcp_sendfile}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("mode", [None, "audit"])
def test_dns_pages_rewritten_after_egress_judged_them_never_reach_the_resolver(policed, slow_netns, attack, mode):
    """Found by reading the kernel (the same rewrite an attacker did with MSG_ZEROCOPY): the
    data of a query sent by reference is refused at egress whatever it holds; audit mode
    lets it through and reports that it would not."""
    zone, tcp = slow_netns
    p = policed(POLICY, mode)
    res = p.run(ATTACKS[attack], NS, RES, _q("pkgs.internal"), _q("auth.internal"))
    seen = _seen(zone, tcp)
    recs = p.close()
    if mode != "audit":
        assert "auth.internal" not in seen, (res, seen, recs)
        if attack.startswith("udp"):
            assert res["send"] == "EPERM", res
            assert seen.count("pkgs.internal") == 2, (res, seen)   # the copied queries before it
    verdict = "would-block" if mode == "audit" else "blocked"
    assert [r for r in recs if r["verdict"] == verdict and r["rule"] == "zerocopy"], (res, seen, recs)


def _fraglist(ns: str, res: str, judged: bytes, sent: bytes) -> dict:
    """Found by an attacker: a datagram the kernel fragments is a chain of skbs (frag_list),
    each with shared info of its own. 40 bytes of IP options (NOPs: no source route, no
    privilege) and an MTU of 68 leave the head skb only the UDP header: every byte of the
    vmspliced query sits in the chain, whose shared flags the check did not read. The
    rewrite keeps the UDP checksum (computed at splice time) by choosing the txid."""
    _setns_net(f"/run/netns/{ns}")
    os.setgid(65534)
    os.setuid(65534)                                       # nothing below needs privilege
    libc = ctypes.CDLL(None, use_errno=True)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((res, 53))
    _fill_queue(s)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01" * 39 + b"\x00")
    buf = mmap.mmap(-1, 4096)
    buf[:len(judged)] = judged
    iov = Iovec(ctypes.addressof(ctypes.c_char.from_buffer(buf)), len(judged))
    r, w = os.pipe()
    if libc.vmsplice(w, ctypes.byref(iov), 1, 0) != len(judged):
        raise OSError(ctypes.get_errno(), "vmsplice")
    out = {}
    try:
        out["send"] = os.splice(r, s.fileno(), len(judged))
    except OSError as e:
        out["send"] = _err(e)
    buf[:len(sent)] = sent                                 # while the fragments wait in tbf
    time.sleep(1.0)
    s.close()
    del iov
    return out


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
    with _resolver_netns(NS + "f", slow=True, mtu=68) as (zone, tcp):
        p = policed(POLICY)
        judged = _q("pkgs.internal", 0x4242)
        res = p.run(_fraglist, NS + "f", RES, judged, _same_sum(judged, "auth.internal"))
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
    _setns_net(f"/run/netns/{ns}")
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
    with _resolver_netns(NS + "g", slow=False, v6=True) as (zone, tcp):
        p = policed(POLICY.replace(f'"{RES}:53"', f'"{RES}:53"\n  - "[::1]:53"'))
        out = p.run(_gso_send, NS + "g", res, how)
        seen = _seen(zone, tcp)
        recs = p.close()
    assert "auth.internal" not in seen and "pkgs.internal" not in seen, (out, seen, recs)
    assert out["sent"] == "EPERM", out
    assert [r for r in recs if r["verdict"] == "blocked" and r["rule"] == "malformed-query"], (out, recs)
