"""Policy keys of issue 10: protocols, source_routes, serve_dns — parsing, normal form,
decide() for other protocols, the kernel form, explain and suggest."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ocihook.compiler import cgroup_entry, cidr_entries, compile_policy, name_entries
from ocihook.events import C
from ocihook.policy import PolicyError, decide, load_policy_text, parse_dest
from ocihook.suggest import suggest

BASE = "version: 1\nname: k\ndefault: deny\nallow: ['10.0.0.0/8', '10.1.0.0/16:443', 'pkgs.internal']\n"


def test_defaults_and_round_trip():
    p = load_policy_text(BASE)
    assert (p.protocols, p.source_routes, p.serve_dns) == ((), "deny", "deny")
    q = load_policy_text(BASE + "protocols: [icmp, 132, ICMPv6]\nsource_routes: allow\nserve_dns: allow\n")
    assert q.protocols == (1, 58, 132)
    again = load_policy_text(q.to_json())
    assert again == q.__class__(**{**q.__dict__, "source": again.source})
    assert json.loads(q.to_json())["protocols"] == ["icmp", "icmpv6", "sctp"]


@pytest.mark.parametrize("value, message", [
    ("[tcp]", "judged as tcp"), ("[udplite]", "judged as udp"), ("[quic]", "unknown protocol"),
    ("[256]", "0-255"), ("[true]", "must be a string or an integer"), ("icmp", "must be a list"),
])
def test_bad_protocols_are_refused_with_their_path(value, message):
    with pytest.raises(PolicyError) as e:
        load_policy_text(BASE + f"protocols: {value}\n")
    assert "$.protocols" in str(e.value) and message in str(e.value)


def test_other_protocols_are_judged_by_port_less_rules_only():
    p = load_policy_text(BASE + "protocols: [icmp]\n")
    assert decide(p, parse_dest("10.2.3.4", "icmp")).verdict == "allow"           # 10.0.0.0/8
    assert decide(p, parse_dest("10.1.2.3", "icmp")).rule_text == "10.0.0.0/8"     # not the :443 rule
    denied = decide(load_policy_text(BASE), parse_dest("10.2.3.4", "icmp"))
    assert (denied.verdict, denied.rule_text) == ("deny", "protocols")
    assert decide(p, parse_dest("10.1.2.3:443", "udplite")).verdict == "allow"     # judged as udp


def test_kernel_form():
    p = load_policy_text(BASE + "protocols: [icmp, 132]\nsource_routes: allow\n")
    entry = cgroup_entry(compile_policy(p))
    assert entry.allow_srcroute == 1 and entry.serve_dns == 0
    assert entry.protos[0] == 0b10 and entry.protos[132 >> 3] == 1 << (132 & 7)
    other = C["SD_PROTO_OTHER"]
    assert sum(1 for k, _ in cidr_entries(p) if k.proto == other) == 1      # 10.0.0.0/8 only
    assert any(k.proto == other for k, _ in name_entries(p))
    assert not any(k.proto == other for k, _ in cidr_entries(load_policy_text(BASE)))


def test_explain_shows_the_keys(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(BASE + "protocols: [icmp]\nserve_dns: allow\n")
    out = subprocess.run([sys.executable, "-m", "ocihook.cli", "policy", "explain", str(f), "10.9.9.9",
                          "--proto", "icmp", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["verdict"], doc["rule"], doc["protocols"], doc["serve_dns"], doc["source_routes"]) == \
        ("allow", "10.0.0.0/8", ["icmp"], "allow", "deny")
    text = subprocess.run([sys.executable, "-m", "ocihook.cli", "policy", "explain", str(f), "10.9.9.9:80"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "other IP protocols allowed: icmp" in text and "serve_dns: allow" in text


def _rec(kind, ip, port, proto, rule="default", verdict="would-block"):
    return {"verdict": verdict, "kind": kind, "dst_ip": ip, "dst_port": port, "proto": proto, "rule": rule,
            "domain": None, "pid": 7, "comm": "x"}


def test_suggest_names_protocols_and_leaves_policy_keys_to_a_human():
    doc, problems = suggest([_rec("packet", "10.0.0.1", 0, "icmp"), _rec("sendmsg", "10.0.0.3", 9, "udplite"),
                             _rec("bind", "0.0.0.0", 53, "udp", "serve_dns"),
                             _rec("sockopt", "0.0.0.0", 0, "udp", "source_routes"),
                             _rec("dns", "127.0.0.53", 53, "udp", "answer-cut", "allowed")])
    assert doc["protocols"] == ["icmp"]
    assert {"cidr": "10.0.0.3/32", "ports": [9], "protocol": "udp"} in doc["allow"]
    assert any("serve_dns: allow" in p for p in problems) and any("source_routes: allow" in p for p in problems)
    assert not any("still denied" in p for p in problems), problems


def test_connect_error_key():
    import errno
    assert load_policy_text(BASE).connect_error == "EPERM"
    p = load_policy_text(BASE + "connect_error: EHOSTUNREACH\n")
    assert p.connect_error == "EHOSTUNREACH" and '"connect_error":"EHOSTUNREACH"' in p.to_json()
    assert cgroup_entry(compile_policy(p)).connect_errno == errno.EHOSTUNREACH
    assert cgroup_entry(compile_policy(load_policy_text(BASE))).connect_errno == 0      # EPERM: the default
    with pytest.raises(PolicyError, match="connect_error"):
        load_policy_text(BASE + "connect_error: EIO\n")
