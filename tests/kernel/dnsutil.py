"""A real DNS server (dnslib) on a loopback address, and clients for policed processes."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import subprocess
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


def wire_name(name: str) -> bytes:
    """A name in DNS wire form, written out in full (no compression)."""
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


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


def use_resolv_conf(nameserver: str, options: str = "") -> None:
    """In this (forked) process only: a private mount namespace whose /etc/resolv.conf
    points at the test server, so getaddrinfo() goes through it (`options`: more resolv.conf
    options, e.g. use-vc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_BIND = 0x00020000, 0x4000, 0x40000, 0x1000
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / private")
    path = f"/tmp/sd-resolv-{os.getpid()}.conf"
    with open(path, "w") as f:
        f.write(f"nameserver {nameserver}\noptions timeout:2 attempts:1 {options}\n")
    if libc.mount(path.encode(), b"/etc/resolv.conf", None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind resolv.conf")


def getaddrinfo_in(nameserver: str, name: str, port: int = 80, options: str = ""):
    """('ok', [ips]) or ('error', message), and how long it took in ms."""
    use_resolv_conf(nameserver, options)
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


class StreamServer:
    """A DNS-over-TCP server that reads the stream as a stream: every length-prefixed message
    of a connection is answered (pipelined, RFC 7766), all the answers to what one read
    brought in one send (one segment, as a resolver answering A and AAAA together does).
    It keeps what it saw: the messages per connection and whether the client closed it."""

    def __init__(self, zone: Zone, address: str, port: int = 53):
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.zone = zone
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(64)
        self.conns: list[dict] = []
        self.lock = threading.Lock()
        self.cuts: list[int] = []   # answers written in pieces of these sizes (then the rest), 20 ms apart
        start_in_thread(self._accept)

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            state = {"messages": [], "closed": False, "error": None, "bytes": 0}
            with self.lock:
                self.conns.append(state)
            start_in_thread(lambda c=c, state=state: self._serve(c, state))

    def _serve(self, c: socket.socket, state: dict):
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError as e:
                    state["error"] = errno.errorcode.get(e.errno, str(e.errno))
                    return
                if not data:
                    state["closed"] = True
                    return
                state["bytes"] += len(data)
                buf += data
                out = b""
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = 2 + struct.unpack("!H", buf[:2])[0]
                    msg, buf = buf[2:n], buf[n:]
                    try:
                        req = DNSRecord.parse(msg)
                    except Exception:  # noqa: BLE001 — garbage: remember it, answer nothing
                        state["messages"].append(None)
                        continue
                    state["messages"].append(str(req.q.qname).rstrip("."))
                    ans = self.zone.resolve(req, None).pack()
                    out += struct.pack("!H", len(ans)) + ans
                pieces, at = [], 0
                for n in self.cuts if out else []:
                    pieces.append(out[at:at + n])
                    at += n
                pieces.append(out[at:])
                for i, piece in enumerate(p for p in pieces if p):
                    if i:
                        time.sleep(0.02)
                    try:
                        c.sendall(piece)
                    except OSError:
                        return

    def stop(self):
        self.sock.close()


def split_tcp(buf: bytes) -> tuple[list[bytes], bytes]:
    """The whole length-prefixed DNS messages at the start of a TCP byte stream, and the rest."""
    out = []
    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
        n = 2 + struct.unpack("!H", buf[:2])[0]
        out.append(buf[2:n])
        buf = buf[n:]
    return out, buf


def answers_in(buf: bytes) -> list[tuple[str, list[str]]]:
    """(question name, the answer records' data) of each whole message in a TCP byte stream."""
    out = []
    for msg in split_tcp(buf)[0]:
        r = DNSRecord.parse(msg)
        out.append((str(r.q.qname).rstrip("."), [str(a.rdata) for a in r.rr]))
    return out


def read_until_quiet(s: socket.socket, timeout: float) -> bytes:
    """What the peer sends until it closes or is quiet for `timeout`."""
    s.settimeout(timeout)
    buf = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        pass
    return buf


def tcp_exchange(server: str, messages: list[bytes], chunks: list[int] | None = None, pause: float = 0.02,
                 timeout: float = 1.0) -> dict:
    """Write the length-prefixed messages to server:53 over one TCP connection (in one write,
    or cut into writes of the given sizes, the rest in a last write), then read answers until
    the server is quiet for `timeout`. Returns the write results ('ok' or the errno name,
    per write), the answers' addresses per answer message, and the time to the first error."""
    data = b"".join(struct.pack("!H", len(m)) + m for m in messages)
    cuts, at = [], 0
    for n in chunks or []:
        cuts.append(data[at:at + n])
        at += n
    cuts.append(data[at:])
    fam = socket.AF_INET6 if ":" in server else socket.AF_INET
    res: dict = {"writes": [], "answers": [], "error_ms": None}
    t0 = time.monotonic()
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect((server, 53))
        for i, cut in enumerate(cuts):
            if not cut:
                continue
            try:
                n = s.send(cut)
                res["writes"].append("ok" if n == len(cut) else f"partial:{n}")
            except OSError as e:
                res["writes"].append(errno.errorcode.get(e.errno, str(e.errno)))
                if res["error_ms"] is None:
                    res["error_ms"] = 1000 * (time.monotonic() - t0)
            if i + 1 < len(cuts):
                time.sleep(pause)
        try:
            buf = read_until_quiet(s, timeout)
        except OSError as e:
            buf = b""
            res["recv_error"] = errno.errorcode.get(e.errno, str(e.errno))
    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
        n = 2 + struct.unpack("!H", buf[:2])[0]
        reply = DNSRecord.parse(buf[2:n])
        buf = buf[n:]
        res["answers"].append(sorted(str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)))
    return res


@contextlib.contextmanager
def resolver_netns(name: str, zone: Zone, address: str, *, udp: bool = True, slow: bool = False,
                   mtu: int | None = None, v6: bool = False):
    """A network namespace of the test's own (/run/netns/NAME; a policed process joins it
    with netns.setns_net): lo up (mtu), a DNS-over-TCP StreamServer on address, a dnslib UDP
    server there too (udp) and on ::1 (v6), and with slow a tbf on lo of 1000 bytes/s after a
    100-byte burst, so a packet behind the first waits ~0.1 s after egress judged it. Yields
    the StreamServer (the zone records what the UDP servers were asked)."""
    from netns import setns_net  # noqa: PLC0415
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "add", name], check=True)
    servers = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up", *(["mtu", str(mtu)] if mtu else [])],
                       check=True)
        if slow:
            subprocess.run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit", "burst",
                            "100", "limit", "20000"], check=True)
        me = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            setns_net(f"/run/netns/{name}")
            quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
            for addr in ((address, "::1") if v6 else (address,)) if udp else ():
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
            tcp = StreamServer(zone, address)
        finally:
            ctypes.CDLL(None, use_errno=True).setns(me, 0x40000000)
            os.close(me)
        yield tcp
        for srv in servers:
            srv.stop()
        tcp.stop()
    finally:
        subprocess.run(["ip", "netns", "del", name])


def connect_pending(server: str, port: int = 53) -> tuple[socket.socket, int]:
    """A blocking TCP socket whose connect() was started and not waited for (EINPROGRESS): a
    send on it waits for the handshake inside plain TCP. (socket, connect_ex's errno)."""
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    rc = s.connect_ex((server, port))
    s.setblocking(True)
    return s, rc


def recv_or_error(s: socket.socket, timeout: float) -> int | str:
    """The length of what one recv() got within timeout, or the error it raised (repr)."""
    s.settimeout(timeout)
    try:
        return len(s.recv(4096))
    except OSError as e:
        return repr(e)
