"""A real DNS server (dnslib) on a loopback address, and clients for policed processes."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time

from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Zone(BaseResolver):
    """name -> list of (type, value, ttl); CNAME chains are followed into the answer."""

    def __init__(self, records: dict[str, list[tuple[str, str, int]]]):
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.seen: list[str] = []

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".")
        self.seen.append(qname)
        name = qname.lower()
        for _ in range(8):
            recs = self.records.get(name, [])
            cname = None
            for typ, value, ttl in recs:
                if typ == "CNAME":
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=ttl))
                    cname = value.lower().rstrip(".")
                elif typ == "A" and request.q.qtype in (QTYPE.A, QTYPE.ANY):
                    reply.add_answer(RR(name, QTYPE.A, rdata=A(value), ttl=ttl))
                elif typ == "AAAA" and request.q.qtype in (QTYPE.AAAA, QTYPE.ANY):
                    reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA(value), ttl=ttl))
            if not cname:
                break
            name = cname
        return reply


class Server:
    def __init__(self, zone: Zone, address: str = "127.0.0.153", port: int = 53):
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self.zone = zone
        self.address = address
        self.udp = DNSServer(zone, address=address, port=port, logger=quiet)
        self.tcp = DNSServer(zone, address=address, port=port, tcp=True, logger=quiet)
        self.udp.start_thread()
        self.tcp.start_thread()

    def stop(self):
        self.udp.stop()
        self.tcp.stop()


def query(name: str, server: str = "127.0.0.153", qtype: str = "A", tcp: bool = False, timeout: float = 2.0):
    """Send one real query; ('ok', [addresses]), ('EPERM', ms), ('timeout', ms) or ('<errno>', ms)."""
    packet = DNSRecord.question(name, qtype).pack()
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    t0 = time.monotonic()
    try:
        if tcp:
            with socket.create_connection((server, 53), timeout=timeout) as s:
                s.sendall(struct.pack("!H", len(packet)) + packet)
                hdr = s.recv(2)
                if len(hdr) < 2:
                    return ("closed", 1000 * (time.monotonic() - t0))
                data = b""
                while len(data) < struct.unpack("!H", hdr)[0]:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        else:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(packet, (server, 53))
                data, _ = s.recvfrom(4096)
    except socket.timeout:
        return ("timeout", 1000 * (time.monotonic() - t0))
    except OSError as e:
        return (errno.errorcode.get(e.errno, str(e.errno)), 1000 * (time.monotonic() - t0))
    reply = DNSRecord.parse(data)
    return ("ok", [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)])


def send_raw(packet: bytes, server: str = "127.0.0.153") -> str:
    """sendto() a raw packet to port 53: 'ok' or the errno name."""
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(packet, (server, 53))
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def use_resolv_conf(nameserver: str) -> None:
    """In this (forked) process only: a private mount namespace whose /etc/resolv.conf
    points at the test server, so getaddrinfo() goes through it."""
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_BIND = 0x00020000, 0x4000, 0x40000, 0x1000
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / private")
    path = f"/tmp/sd-resolv-{os.getpid()}.conf"
    with open(path, "w") as f:
        f.write(f"nameserver {nameserver}\noptions timeout:2 attempts:1\n")
    if libc.mount(path.encode(), b"/etc/resolv.conf", None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind resolv.conf")


def getaddrinfo_in(nameserver: str, name: str, port: int = 80):
    """('ok', [ips]) or ('error', message), and how long it took in ms."""
    use_resolv_conf(nameserver)
    t0 = time.monotonic()
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        return ("ok", sorted({i[4][0] for i in infos}), 1000 * (time.monotonic() - t0))
    except socket.gaierror as e:
        return ("error", str(e), 1000 * (time.monotonic() - t0))


def start_in_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t
