"""Reporting end to end: live watch, audit -> suggest -> enforce, and a flood that fills the
events map without weakening enforcement."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dnsutil import Server, Zone
from helpers import start_watch
from kutil import connect
from ocihook import report

CLI = [sys.executable, "-m", "ocihook.cli"]


def test_watch_shows_a_blocked_event_as_it_happens(policed):
    p = policed("version: 1\nname: w\ndefault: allow\ndeny: [{cidr: 127.0.0.2/32, reason: circular}]\n")
    w = start_watch(str(p.cgid), "--duration", "6", "--json")     # its ring buffer is open
    try:
        assert p.run(connect, "127.0.0.2", 443) == "EPERM"
        assert p.run(connect, "127.0.0.3", 443) == "refused"   # allowed: not a watch event
        out, _ = w.communicate(timeout=30)
    finally:
        w.kill()
    evs = [json.loads(line) for line in out.splitlines()]
    assert [(e["verdict"], e["dst_ip"], e["dst_port"]) for e in evs] == [("blocked", "127.0.0.2", 443)]
    assert evs[0]["comm"].startswith("python") and evs[0]["cmdline"]


@pytest.fixture
def dns_server():
    srv = Server(Zone({"mirror.deploy.test": [("A", "127.0.0.81", 60)]}), "127.0.0.156")
    yield srv
    srv.stop()


SCRIPT = r"""
import socket, sys
sys.path.insert(0, %(tests)r)
from dnsutil import query
status, ips = query("mirror.deploy.test", "127.0.0.156")
assert status == "ok", status
socket.create_connection((ips[0], %(port)d), timeout=2).close()
socket.create_connection(("127.0.0.1", %(port2)d), timeout=2).close()
print("deploy ok")
"""


def test_audit_then_suggest_then_enforce_passes(tmp_path, listener, dns_server):
    import os
    mirror, local = listener("127.0.0.81"), listener("127.0.0.1")
    script = tmp_path / "deploy.py"
    script.write_text(SCRIPT % {"tests": os.path.dirname(__file__), "port": mirror.port, "port2": local.port})
    strict = tmp_path / "strict.yaml"
    strict.write_text("version: 1\nname: rollout\ndefault: deny\nallow: []\n")
    audit_rep = tmp_path / "audit.jsonl"
    res = subprocess.run([*CLI, "run", "--policy", str(strict), "--audit", "--report", str(audit_rep), "--",
                          sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "deploy ok" in res.stdout, res.stderr
    audit_recs = report.load(audit_rep)
    assert {r["verdict"] for r in audit_recs} == {"would-block", "allowed"}
    assert {r["rule"] for r in audit_recs if r["verdict"] == "allowed"} == {"dns.unlisted"}  # the lookup itself
    suggested = tmp_path / "suggested.yaml"
    sug = subprocess.run([*CLI, "policy", "suggest", str(audit_rep), "--base", str(strict), "-o", str(suggested)],
                         capture_output=True, text=True, timeout=60)
    assert sug.returncode == 0, sug.stderr
    text = suggested.read_text()
    assert "mirror.deploy.test" in text and "127.0.0.81" not in text     # a name, not its address
    assert "+" in sug.stderr                                              # the diff against the base
    for rec in report.load(audit_rep):
        dest = rec.get("domain") or rec["dst_ip"]
        if rec["kind"] != "dns":
            dest = f"{dest}:{rec['dst_port']}" if ":" not in dest else f"[{dest}]:{rec['dst_port']}"
        exp = subprocess.run([*CLI, "policy", "explain", str(suggested), dest, "--proto", rec["proto"], "--json"],
                             capture_output=True, text=True, timeout=60)
        assert json.loads(exp.stdout)["verdict"] == "allow", (rec, exp.stdout)
    enforce_rep = tmp_path / "enforce.jsonl"
    res = subprocess.run([*CLI, "run", "--policy", str(suggested), "--fail-on-violation", "--report",
                          str(enforce_rep), "--", sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "deploy ok" in res.stdout, res.stderr
    assert report.load_summary(enforce_rep)["blocked"] == 0


def _flood(n):
    import errno
    import socket
    eperm = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(n):
            try:
                s.sendto(b"x", (f"127.9.{(i >> 8) & 255}.{i & 255}", 1000 + (i >> 16)))
            except OSError as e:
                eperm += e.errno == errno.EPERM
    return eperm


def test_flood_of_distinct_destinations_keeps_enforcing_and_reports_drops(policed, listener):
    lst = listener("127.0.0.1")
    p = policed("version: 1\nname: flood\ndefault: deny\nallow: ['127.0.0.1/32']\n")
    n = 100_000
    assert p.run(_flood, n) == n                      # every single one refused
    assert p.run(connect, "127.0.0.1", lst.port) == "ok"
    assert p.run(connect, "127.9.0.1", 1) == "EPERM"
    recs = p.close()
    attempts = n + 2                                  # the flood, one allowed connect, one more refusal
    assert 0 < p.drained.dropped == attempts - sum(r["count"] for r in recs)   # every lost event counted
    assert report.summarize(recs, p.drained.dropped)["events_dropped"] == p.drained.dropped
