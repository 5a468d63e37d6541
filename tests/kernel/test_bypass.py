"""Creative ways out of a policed cgroup, each tried for real: all refused."""
from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from dnsutil import Server, Zone, query
from kutil import connect

DENY = """
version: 1
name: bypass
default: allow
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: auth service"}
  - {domain: auth.internal, reason: "circular: auth service"}
"""


def _err(fn):
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def test_tcp_fast_open_to_a_denied_address(policed):
    p = policed(DENY)

    def tfo():
        with socket.socket() as s:
            return _err(lambda: s.sendto(b"GET / HTTP/1.0\r\n\r\n", socket.MSG_FASTOPEN, ("127.0.0.2", 80)) and "sent")
    assert p.run(tfo) == "EPERM"


def test_sendmsg_and_sendmmsg_to_a_denied_address(policed):
    p = policed(DENY)

    def via_sendmsg():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return _err(lambda: s.sendmsg([b"x"], [], 0, ("127.0.0.2", 9)) and "sent")

    def via_sendmmsg():
        class SockaddrIn(ctypes.Structure):
            _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 4),
                        ("zero", ctypes.c_uint8 * 8)]

        class Iovec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

        class Msghdr(ctypes.Structure):
            _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(Iovec)),
                        ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                        ("flags", ctypes.c_int)]

        class Mmsghdr(ctypes.Structure):
            _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]
        libc = ctypes.CDLL(None, use_errno=True)
        addr = SockaddrIn(socket.AF_INET, socket.htons(9), (ctypes.c_uint8 * 4)(127, 0, 0, 2))
        buf = ctypes.create_string_buffer(b"x")
        iov = Iovec(ctypes.cast(buf, ctypes.c_void_p), 1)
        msgs = (Mmsghdr * 2)()
        for m in msgs:
            m.hdr = Msghdr(ctypes.cast(ctypes.pointer(addr), ctypes.c_void_p), ctypes.sizeof(addr),
                           ctypes.pointer(iov), 1, None, 0, 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            n = libc.sendmmsg(s.fileno(), msgs, 2, 0)
            return "sent" if n > 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    assert p.run(via_sendmsg) == "EPERM"
    assert p.run(via_sendmmsg) == "EPERM"


def _raw(dst="127.0.0.2"):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except OSError as e:
        return "socket:" + errno.errorcode.get(e.errno, "?")
    with s:
        return _err(lambda: s.sendto(b"\x00" * 16, (dst, 0)) and "sent")


def test_raw_sockets_are_refused_unless_the_policy_allows_them(policed):
    p = policed(DENY)
    assert p.run(_raw) == "socket:EPERM"
    recs = p.close()
    assert any(r["kind"] == "socket" and r["rule"] == "raw_sockets" for r in recs)
    allowed = policed(DENY + "raw_sockets: allow\n")
    assert allowed.run(_raw, "127.0.0.3") == "sent"
    # allowed raw sockets still reach only what the policy allows: each packet is judged
    assert allowed.run(_raw, "127.0.0.2") == "EPERM"
    assert any(r["kind"] == "packet" and r["dst_ip"] == "127.0.0.2" and r["verdict"] == "blocked"
               for r in allowed.close())


def test_raw_socket_made_before_policing_is_dropped_at_egress(pins):
    """A raw socket created in the cgroup before its policy arrived (sock_create never saw it)."""
    import os
    import secrets
    from ocihook import cgroup, events, session
    from ocihook.compiler import compile_policy
    from ocihook.policy import load_policy_text
    path = cgroup.create(f"rawtest-{secrets.token_hex(3)}")
    compiled = compile_policy(load_policy_text(DENY, "t"))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        cgroup.move_self(path)
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        os.write(ready_w, b"1")
        os.read(go_r, 1)                       # the policy is attached now
        os.write(out_w, _err(lambda: s.sendto(b"\x00" * 16, ("127.0.0.3", 0)) and "sent").encode())
        os._exit(0)
    try:
        os.read(ready_r, 1)
        att = session.apply(path, compiled)
        os.write(go_w, b"1")
        result = os.read(out_r, 64).decode()
        os.waitpid(pid, 0)
    finally:
        cgroup.remove(path)
    recs = events.to_records(session.release(att, compiled), compiled, "raw")
    assert result == "EPERM"
    assert any(r["kind"] == "socket" and r["dst_ip"] == "127.0.0.3" for r in recs)


@pytest.fixture
def dns():
    srv = Server(Zone({"alias.example.test": [("CNAME", "auth.internal", 60)],
                       "auth.internal": [("A", "127.0.0.85", 60)],
                       "deep.example.test": [("CNAME", "alias.example.test", 60)]}), "127.0.0.155")
    yield srv
    srv.stop()


def test_denied_name_reached_through_a_cname_stays_denied(policed, dns, listener):
    lst = listener("127.0.0.85")
    p = policed(DENY.replace("default: allow", "default: deny\nallow: ['*.example.test', '127.0.0.155:53']"))
    assert p.run(query, "auth.internal", "127.0.0.155")[0] == "EPERM"          # asked directly: dropped
    # an allowed name, but a CNAME of auth.internal: its answer is dropped (no refuser here)
    assert p.run(query, "deep.example.test", "127.0.0.155", "A", False, 0.5)[0] == "timeout"
    assert p.run(connect, "127.0.0.85", lst.port) == "EPERM"                   # learned as auth.internal's
    recs = p.close()
    rec = [r for r in recs if r["kind"] == "connect" and r["dst_ip"] == "127.0.0.85"][0]
    assert rec["verdict"] == "blocked" and rec["rule"] == "auth.internal" and rec["domain"] == "deep.example.test"
    assert [r for r in recs if r["kind"] == "dns" and r["verdict"] == "blocked" and r["domain"] == "deep.example.test"
            and r["target"] == "auth.internal"], recs


def test_direct_connect_to_a_denied_names_learned_ip(policed, dns, listener):
    lst = listener("127.0.0.85")
    p = policed(DENY)                                                           # default allow
    assert p.run(connect, "127.0.0.85", lst.port) == "ok"                       # nothing known yet
    assert p.run(query, "alias.example.test", "127.0.0.155", "A", False, 0.5)[0] == "timeout"  # dropped
    assert p.run(connect, "127.0.0.85", lst.port) == "EPERM"                    # now known as auth.internal
