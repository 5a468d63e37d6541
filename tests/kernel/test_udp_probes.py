"""A UDP connect sends nothing (getaddrinfo's RFC 6724 address selection connects a UDP socket
to each candidate and never sends): it is no attempt to reach anyone. What is sent is judged,
refused and recorded at egress."""
from __future__ import annotations

import errno
import socket

POLICY = "version: 1\nname: probes\ndefault: deny\nallow: ['127.0.0.1/32']\n"


def _probe_only() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.2", 9))                      # denied, but a connect sends nothing
        return s.getpeername()[0]


def _connect_then_send(host: str = "127.0.0.2") -> str:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        try:
            s.send(b"x")
        except OSError as e:
            return errno.errorcode[e.errno]
        return "sent"


def _sendto_allowed_then_send_to_the_denied_peer(port: int) -> tuple[str, str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.2", 9))
        s.sendto(b"ok", ("127.0.0.1", port))            # judged by sendmsg: allowed
        try:
            s.send(b"x")                                 # the denied peer, after an allowed send
        except OSError as e:
            return "sendto ok", errno.errorcode[e.errno]
        return "sendto ok", "sent"


def _reconnect_allowed(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.2", 9))
        s.connect(("127.0.0.1", port))
        s.send(b"x")
        return "sent"


def test_a_udp_connect_that_sends_nothing_is_not_recorded(policed):
    p = policed(POLICY)
    assert p.run(_probe_only) == "127.0.0.2"
    assert not [r for r in p.close() if r["dst_ip"] == "127.0.0.2"]
    assert p.drained.counters["blocked"] == 0


def test_what_a_connected_udp_socket_sends_is_refused_and_recorded(policed):
    p = policed(POLICY)
    assert p.run(_connect_then_send) == "EPERM"
    assert p.run(_connect_then_send, "::ffff:127.0.0.2") == "EPERM"
    recs = [r for r in p.close() if r["dst_ip"] == "127.0.0.2"]
    assert {(r["verdict"], r["dst_port"], r["proto"]) for r in recs} == {("blocked", 9, "udp")}
    assert sum(r["count"] for r in recs) == 2


def test_an_allowed_send_does_not_unmark_a_denied_peer(policed, listener):
    lst = listener("127.0.0.1", "udp")
    p = policed(POLICY)
    assert p.run(_sendto_allowed_then_send_to_the_denied_peer, lst.port) == ("sendto ok", "EPERM")
    assert p.run(_reconnect_allowed, lst.port) == "sent"


def test_audit_records_the_send_as_would_block(policed):
    p = policed(POLICY, mode="audit")
    assert p.run(_connect_then_send) == "sent"
    recs = [r for r in p.close() if r["dst_ip"] == "127.0.0.2"]
    assert [r["verdict"] for r in recs] == ["would-block"]


def _allowed_probes_then_one_sender(port: int) -> str:
    """getaddrinfo's way: connect a UDP socket to an allowed address (port 0 and a service
    port) and send nothing; then one socket that sends three datagrams."""
    for p in (0, 443, port):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("127.0.0.1", p))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        for _ in range(3):
            s.send(b"x")
    return "sent"


def test_an_allowed_udp_connect_is_recorded_only_when_it_sends(policed, listener):
    """Allowed probes leave no row (no `port 0` or `443/udp` rows for `policy suggest` to turn
    into rules); a socket that sends is recorded once, with the port it sent to."""
    lst = listener("127.0.0.1", "udp")
    p = policed(POLICY)
    assert p.run(_allowed_probes_then_one_sender, lst.port) == "sent"
    recs = [r for r in p.close() if r["dst_ip"] == "127.0.0.1" and r["proto"] == "udp"]
    assert [(r["verdict"], r["dst_port"]) for r in recs] == [("allowed", lst.port)], recs
    assert recs[0]["count"] == 1                      # the first datagram; the rest go the fast path


def _reconnect_race(allowed_port: int, denied_port: int, seconds: float) -> dict:
    """Found by an attacker: one thread sends on a UDP socket while another connects it to an
    allowed peer, then to a denied one, and tries a send. Egress used to clear the socket's
    "first packet" mark with a read-modify-write that could undo the connect's "denied" mark."""
    import threading
    import time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", allowed_port))
    stop = []

    def sender():
        while not stop:
            try:
                s.send(b"r")
            except OSError:
                pass
    t = threading.Thread(target=sender)
    t.start()
    tries, passed, t0 = 0, 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        tries += 1
        s.connect(("127.0.0.1", allowed_port))
        s.connect(("127.0.0.2", denied_port))
        try:
            s.send(b"probe")
            passed += 1
        except OSError:
            pass
    stop.append(1)
    t.join()
    return {"tries": tries, "passed": passed}


def test_reconnecting_while_another_thread_sends_never_unmarks_a_denied_peer(policed, listener):
    lst = listener("127.0.0.1", "udp")
    denied = listener("127.0.0.2", "udp")
    p = policed(POLICY)
    res = p.run(_reconnect_race, lst.port, denied.port, 3.0)
    assert res["tries"] > 1000 and res["passed"] == 0, res


def _connected_send_with_cmsg(port: int) -> list:
    import struct
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        out.append(s.sendmsg([b"tos"], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack("i", 0x10))]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.2", 9))
        try:
            s.sendmsg([b"tos"], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack("i", 0x10))])
            out.append("sent")
        except OSError as e:
            out.append(errno.errorcode[e.errno])
    return out


def test_a_connected_send_with_ancillary_data_is_judged_by_its_peer(policed, listener):
    """Found by an attacker: with IP-level ancillary data (IP_TOS, as QUIC stacks send) a
    connected UDP socket's sendmsg runs the hook with no address; it was judged as 127.0.0.1:0
    (an allowed peer refused, a denied one recorded under a false address)."""
    lst = listener("127.0.0.1", "udp")
    p = policed(POLICY)
    assert p.run(_connected_send_with_cmsg, lst.port) == [3, "EPERM"]
    recs = p.close()
    assert not [r for r in recs if r["dst_port"] == 0], recs
    assert [(r["verdict"], r["dst_ip"], r["dst_port"]) for r in recs if r["verdict"] == "blocked"] == \
        [("blocked", "127.0.0.2", 9)]
