"""DNS as real clients do it: search lists, service lookups, CNAME targets in reports."""
from __future__ import annotations

import ctypes
import os
import socket
import time

import pytest
from dnslib import QTYPE, DNSRecord

from dnsutil import Server, Zone, query
from kutil import connect

SERVER = "127.0.0.158"
ZONE = {
    "mirror.allowed.test": [("A", "127.0.0.91", 60)],
    "auth.denied.test": [("A", "127.0.0.92", 60)],
    "cdn.allowed.test": [("CNAME", "auth.denied.test", 60)],
    "other.unlisted.test": [("A", "127.0.0.93", 60)],
    "six.unlisted.test": [("AAAA", "::1", 60)],
}
POLICY = f"""
version: 1
name: field
default: deny
allow: ["mirror.allowed.test", "cdn.allowed.test", "127.0.0.0/8:53", "127.0.0.92"]
deny:
  - {{domain: auth.denied.test, reason: "circular: the auth service"}}
"""


@pytest.fixture(scope="module")
def dns():
    srv = Server(Zone(ZONE), SERVER)
    yield srv
    srv.stop()


def _resolv_conf(text: str) -> None:
    """In this (forked) process only: a private /etc/resolv.conf."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:
        raise OSError(ctypes.get_errno(), "private mount namespace")
    path = f"/tmp/sd-resolv-{os.getpid()}.conf"
    with open(path, "w") as f:
        f.write(text)
    if libc.mount(path.encode(), b"/etc/resolv.conf", None, 0x1000, None) != 0:
        raise OSError(ctypes.get_errno(), "bind resolv.conf")


def _getaddrinfo(conf: str, name: str):
    _resolv_conf(conf)
    t0 = time.monotonic()
    try:
        infos = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)
        return "ok", sorted({i[4][0] for i in infos}), time.monotonic() - t0
    except socket.gaierror as e:
        return "error", e.strerror, time.monotonic() - t0


SEARCH = f"nameserver {SERVER}\nsearch svc.corp.test corp.test\noptions ndots:5 timeout:2 attempts:1\n"


def test_allowed_name_resolves_under_a_search_list_with_ndots_5(policed, dns):
    p = policed(POLICY)
    status, ips, took = p.run(_getaddrinfo, SEARCH, "mirror.allowed.test")
    assert (status, ips) == ("ok", ["127.0.0.91"]) and took < 1
    assert "mirror.allowed.test.svc.corp.test" in dns.zone.seen               # the candidates were tried
    recs = p.close()
    assert not [r for r in recs if r["verdict"] == "blocked"]                 # and are no violations
    cand = [r for r in recs if r["domain"] == "mirror.allowed.test.svc.corp.test"]
    assert cand and cand[0]["rule"] == "dns.unlisted" and "search-list" in cand[0]["note"]


def test_a_denied_name_still_fails_fast_under_a_search_list(policed, dns):
    p = policed(POLICY)
    status, _, took = p.run(_getaddrinfo, SEARCH, "auth.denied.test")
    assert status == "error" and took < 1
    assert [r["domain"] for r in p.close() if r["verdict"] == "blocked"] == ["auth.denied.test"]


def test_an_unlisted_name_resolves_but_its_address_stays_denied(policed, dns, listener):
    """The address fails with "no route to host" (a client such as GNU wget retries EPERM 20
    times); a bare IP the default denies keeps EPERM. TCP and UDP, IPv4 and IPv6."""
    lst = listener("127.0.0.93")
    lst6 = listener("::1")
    p = policed(POLICY)
    assert p.run(connect, "127.0.0.93", lst.port) == "EPERM"                  # not learned yet: a bare IP
    assert p.run(query, "other.unlisted.test", SERVER) == ("ok", ["127.0.0.93"])
    assert p.run(query, "six.unlisted.test", SERVER, "AAAA") == ("ok", ["::1"])
    assert p.run(connect, "127.0.0.93", lst.port) == "EHOSTUNREACH"
    assert p.run(connect, "127.0.0.93", 9, "udp") == "EHOSTUNREACH"           # unconnected sendto
    assert p.run(connect, "::1", lst6.port) == "EHOSTUNREACH"
    assert p.run(connect, "127.0.0.94", lst.port) == "EPERM"                  # no lookup taught it
    recs = [r for r in p.close() if r["kind"] == "connect"]
    learned = [r for r in recs if r["domain"] == "other.unlisted.test"]
    assert learned and all(r["verdict"] == "blocked" and r["rule"] == "default" for r in learned)
    assert {r["dst_ip"] for r in recs if r["domain"] == "six.unlisted.test"} == {"::1"}


def test_connect_error_applies_to_an_unlisted_names_address_too(policed, dns, listener):
    lst = listener("127.0.0.93")
    p = policed(POLICY + "connect_error: ECONNREFUSED\n")
    assert p.run(query, "other.unlisted.test", SERVER) == ("ok", ["127.0.0.93"])
    assert p.run(connect, "127.0.0.93", lst.port) == "refused"
    assert p.run(connect, "127.0.0.94", lst.port) == "refused"


def test_a_name_rule_that_denies_keeps_eperm(policed, dns, listener):
    """Only the default's refusal of a learned address changes its errno: a denied name's
    address (here through an allowed CNAME) is refused with EPERM."""
    lst = listener("127.0.0.92")
    p = policed(POLICY.replace(', "127.0.0.92"]', "]"))
    assert p.run(query, "cdn.allowed.test", SERVER, "A", False, 0.5)[0] != "ok"    # the answer is dropped
    assert p.run(connect, "127.0.0.92", lst.port) == "EPERM"
    rec = [r for r in p.close() if r["kind"] == "connect"][0]
    assert (rec["rule"], rec["domain"], rec["target"]) == ("auth.denied.test", "cdn.allowed.test", "auth.denied.test")


def _wget_by_name(conf: str, url: str) -> tuple[int, float, str]:
    import subprocess
    _resolv_conf(conf)
    t0 = time.monotonic()
    r = subprocess.run(["wget", "-O", "/dev/null", url], capture_output=True, text=True, timeout=60)
    return r.returncode, time.monotonic() - t0, r.stderr


def test_gnu_wget_gives_up_at_once_on_an_unlisted_names_address(policed, dns, listener):
    import shutil
    from helpers import require
    require(shutil.which("wget") is not None, "GNU wget not installed (packaging/setup-host.sh installs it)")
    lst = listener("127.0.0.93")
    p = policed(POLICY)
    rc, took, err = p.run(_wget_by_name, f"nameserver {SERVER}\noptions timeout:2 attempts:1\n",
                          f"http://other.unlisted.test:{lst.port}/")
    assert rc != 0 and took < 1.0 and "No route to host" in err, (rc, took, err)
    recs = p.close()
    assert sum(r["count"] for r in recs if r["kind"] == "connect" and r["verdict"] == "blocked") == 1


def test_unlisted_deny_refuses_the_lookup(policed, dns):
    p = policed(POLICY + "dns: {unlisted: deny}\n")
    assert p.run(query, "other.unlisted.test", SERVER)[0] == "EPERM"


def _srv_query(name: str) -> str:
    packet = DNSRecord.question(name, "SRV").pack()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        try:
            s.sendto(packet, (SERVER, 53))
            s.recvfrom(4096)
        except OSError as e:
            return os.strerror(e.errno) if e.errno else "timeout"
    return "ok"


def test_service_lookups_are_judged_as_the_name(policed, dns):
    p = policed(POLICY + "dns: {unlisted: deny}\n")
    assert p.run(_srv_query, "_http._tcp.mirror.allowed.test") == "ok"          # apt's first lookup
    assert p.run(_srv_query, "_http._tcp.auth.denied.test") == os.strerror(1)   # EPERM
    assert p.run(_srv_query, "_http.notservice.mirror.allowed.test") == os.strerror(1)  # not a _svc._proto
    blocked = [r["domain"] for r in p.close() if r["verdict"] == "blocked"]
    assert sorted(blocked) == ["_http._tcp.auth.denied.test", "_http.notservice.mirror.allowed.test"]
    assert QTYPE.SRV


def test_a_cname_to_a_denied_name_names_the_target_in_the_report(policed, dns, listener):
    """The answer (UDP) is dropped: the lookup fails as the denied name's own would (here no
    refuser answers REFUSED: the client times out). Its addresses are learned as denied all
    the same, and both rows name the queried name and the denied chain end."""
    lst = listener("127.0.0.92")
    p = policed(POLICY)
    assert p.run(query, "cdn.allowed.test", SERVER, "A", False, 0.5)[0] == "timeout"
    assert p.run(connect, "127.0.0.92", lst.port) == "EPERM"      # the CIDR allows it, the name denies
    recs = p.close()
    rec = [r for r in recs if r["kind"] == "connect"][0]
    assert (rec["domain"], rec["target"], rec["reason"]) == ("cdn.allowed.test", "auth.denied.test",
                                                             "circular: the auth service")
    assert "CNAME of auth.denied.test" in rec["note"]
    dns_rec = [r for r in recs if r["kind"] == "dns" and r["verdict"] == "blocked"]
    assert [(r["domain"], r["target"], r["reason"]) for r in dns_rec] == [
        ("cdn.allowed.test", "auth.denied.test", "circular: the auth service")], recs
    asked = [r for r in recs if r["kind"] == "dns" and r["verdict"] == "allowed" and r["domain"] == "cdn.allowed.test"]
    assert asked and dns_rec[0]["pid"] == asked[0]["pid"] != 0, recs     # the row names who asked
    assert dns_rec[0]["comm"] == asked[0]["comm"] and dns_rec[0]["cmdline"] == asked[0]["cmdline"], recs


def test_over_tcp_a_cname_to_a_denied_name_still_answers_and_teaches_denied(policed, dns, listener):
    """A TCP answer is part of a stream: it goes on (its addresses learned as denied)."""
    lst = listener("127.0.0.92")
    p = policed(POLICY)
    assert p.run(query, "cdn.allowed.test", SERVER, "A", True) == ("ok", ["127.0.0.92"])
    assert p.run(connect, "127.0.0.92", lst.port) == "EPERM"
    rec = [r for r in p.close() if r["kind"] == "connect"][0]
    assert (rec["domain"], rec["target"]) == ("cdn.allowed.test", "auth.denied.test")
