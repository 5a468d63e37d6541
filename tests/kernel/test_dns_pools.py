"""Answers with many addresses (issue 10, class 6): every address of an answer that fits a
DNS message over UDP is learned; a larger one (TCP) is cut at SD_MAX_ANSWERS, and the cut
is counted and reported."""
from __future__ import annotations

import socket

import pytest

from dnsutil import Server, Zone, query
from netns import err
from ocihook import report
from ocihook.events import C

RESOLVER = "127.0.0.164"


def _pool(n: int, third: int) -> list[tuple[str, str, int]]:
    return [("A", f"127.{third + i // 250}.0.{i % 250 + 1}", 60) for i in range(n)]


ZONE = {
    "pool.allowed": _pool(40, 20),
    "big.allowed": _pool(250, 30),
    "huge.allowed": _pool(300, 40),
    "alias.allowed": [("CNAME", "big.allowed", 60)],
}

POLICY = f"""
version: 1
name: pools
default: deny
allow: ["*.allowed"]
dns: {{resolvers: ["{RESOLVER}"]}}
"""


@pytest.fixture(scope="module")
def dns():
    srv = Server(Zone(ZONE), RESOLVER)
    yield srv
    srv.stop()


def _reach(addrs):
    out = {}
    for a in addrs:
        with socket.socket() as s:
            s.settimeout(1)
            out[a] = err(lambda: s.connect((a, 9)) or "ok")
    return out


def _resolve_then_connect(name, tcp):
    status, addrs = query(name, RESOLVER, tcp=tcp, timeout=3)
    return status, addrs, _reach(addrs)


@pytest.mark.parametrize("name,n", [("pool.allowed", 40), ("big.allowed", 250), ("alias.allowed", 250)])
def test_every_address_of_a_udp_answer_is_learned(policed, dns, name, n):
    p = policed(POLICY)
    status, addrs, reach = p.run(_resolve_then_connect, name, False)
    assert status == "ok" and len(addrs) == n
    assert set(reach.values()) == {"refused"}, {a: v for a, v in reach.items() if v != "refused"}
    summary = report.summarize(p.close())
    assert summary["answers_cut"] == 0


def test_a_larger_tcp_answer_is_cut_and_the_cut_is_reported(policed, dns):
    p = policed(POLICY)
    status, addrs, reach = p.run(_resolve_then_connect, "huge.allowed", True)
    assert status == "ok" and len(addrs) == 300
    cut = C["SD_MAX_ANSWERS"]
    assert [reach[a] for a in addrs[:cut]] == ["refused"] * cut
    assert [reach[a] for a in addrs[cut:]] == ["EPERM"] * (300 - cut)
    recs = p.close()
    rows = [r for r in recs if r["rule"] == "answer-cut"]
    assert rows and rows[0]["domain"] == "huge.allowed" and rows[0]["dst_ip"] == RESOLVER
    summary = report.summarize(recs)
    assert summary["answers_cut"] == 1
    assert "more addresses than the kernel learns" in report.format_table(recs, summary)
