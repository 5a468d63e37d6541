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


def _connect_then_send() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.2", 9))
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


def _v6_probe_then_send() -> str:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.connect(("::ffff:127.0.0.2", 9))
        try:
            s.send(b"x")
        except OSError as e:
            return errno.errorcode[e.errno]
        return "sent"


def test_a_udp_connect_that_sends_nothing_is_not_recorded(policed):
    p = policed(POLICY)
    assert p.run(_probe_only) == "127.0.0.2"
    assert not [r for r in p.close() if r["dst_ip"] == "127.0.0.2"]
    assert p.drained.counters["blocked"] == 0


def test_what_a_connected_udp_socket_sends_is_refused_and_recorded(policed):
    p = policed(POLICY)
    assert p.run(_connect_then_send) == "EPERM"
    assert p.run(_v6_probe_then_send) == "EPERM"
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
