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


@pytest.fixture
def slow_netns():
    subprocess.run(["ip", "netns", "del", NS], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
        # 1000 bytes/s after a 100-byte burst: a packet behind the first waits ~0.1 s, after
        # egress judged it
        subprocess.run(["tc", "-n", NS, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit", "burst", "100",
                       "limit", "20000"], check=True)
        zone = Zone(ZONE)
        me = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            _setns_net(f"/run/netns/{NS}")
            quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
            udp = DNSServer(zone, address=RES, port=53, logger=quiet)
            udp.start_thread()
            tcp = StreamServer(zone, RES)
        finally:
            ctypes.CDLL(None, use_errno=True).setns(me, 0x40000000)
            os.close(me)
        yield zone, tcp
        udp.stop()
        tcp.stop()
    finally:
        subprocess.run(["ip", "netns", "del", NS])


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
