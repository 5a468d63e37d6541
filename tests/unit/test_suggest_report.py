"""policy suggest and report formatting, on synthetic records (pure)."""
from __future__ import annotations

from ocihook import report
from ocihook.policy import Dest, decide, decide_query, load_policy_text, to_mapped
from ocihook.suggest import suggest, to_yaml


def rec(verdict, kind, ip, port, proto="tcp", domain=None, rule="default", count=1, pid=10):
    return {"container": "c1", "policy": "p", "verdict": verdict, "kind": kind, "proto": proto, "family": 4,
            "dst_ip": ip, "dst_port": port, "domain": domain, "pid": pid, "comm": "curl", "cmdline": "curl x",
            "uid": 0, "rule": rule, "reason": None, "count": count, "first_seen": "2026-01-01T00:00:00.000Z",
            "last_seen": "2026-01-01T00:00:01.000Z", "parents": []}


RECORDS = [
    rec("would-block", "dns", "127.0.0.53", 53, "udp", "pkgs.example.test"),
    rec("would-block", "connect", "127.0.0.70", 443, domain="pkgs.example.test"),
    rec("would-block", "connect", "127.0.0.70", 80, domain="pkgs.example.test"),
    rec("would-block", "connect", "127.0.0.9", 5432),
    rec("would-block", "sendmsg", "127.0.0.54", 53, "udp", rule="dns.resolvers"),
    rec("allowed", "connect", "127.0.0.1", 8080, rule="127.0.0.1/32"),
]


def test_suggest_without_base_allows_everything_by_name_where_known():
    doc, problems = suggest(RECORDS)
    assert problems == []
    pol = load_policy_text(to_yaml(doc), "s")
    assert {"domain": "pkgs.example.test", "ports": [80, 443], "protocol": "tcp"} in doc["allow"]
    assert not any("127.0.0.70" in str(r) for r in doc["allow"])          # a name, not its address
    assert doc["dns"]["resolvers"] == ["127.0.0.54"]
    assert decide_query(pol, "pkgs.example.test").verdict == "allow"
    assert decide(pol, Dest(to_mapped("127.0.0.9"), 5432, "tcp", None)).verdict == "allow"
    assert decide(pol, Dest(to_mapped("127.0.0.9"), 5433, "tcp", None)).verdict == "deny"   # smallest


def test_suggest_with_base_keeps_its_denies_and_reports_what_they_still_refuse():
    base = load_policy_text("version: 1\nname: b\ndefault: deny\nallow: ['127.0.0.1:8080']\n"
                            "deny: [{cidr: 127.0.0.9/32, reason: circular}]\n", "b")
    doc, problems = suggest(RECORDS, base)
    assert doc["name"] == "b" and any("127.0.0.9" in str(d) for d in doc["deny"])
    assert problems == ["127.0.0.9:5432/tcp is still denied by rule 127.0.0.9/32"]   # a tie: deny wins
    base2 = load_policy_text("version: 1\nname: b\ndefault: deny\n"
                             "deny: [{domain: '*.github.com', reason: circular}]\n", "b")
    refused = [rec("would-block", "connect", "127.0.0.70", 443, domain="api.github.com", rule="*.github.com"),
               rec("would-block", "socket", "0.0.0.0", 0, "icmp", rule="raw_sockets")]
    doc, problems = suggest(refused, base2)                   # ...and a base deny is never undone
    assert doc["allow"] == [] and problems == [
        "api.github.com:443/tcp was refused by the base's deny rule *.github.com (circular): not overridden",
        "raw sockets were used (pid 10 curl): add `raw_sockets: allow` only if the deploy really needs them"]


def test_report_aggregates_and_summarises():
    recs = [rec("blocked", "connect", "127.0.0.2", 443, count=2), rec("blocked", "connect", "127.0.0.2", 443, count=3),
            rec("allowed", "connect", "127.0.0.1", 80)]
    agg = report.aggregate(recs)
    assert [(r["verdict"], r["count"]) for r in agg] == [("blocked", 5), ("allowed", 1)]
    s = report.summarize(recs, dropped=7)
    assert (s["blocked"], s["allowed"], s["would_block"], s["events_dropped"]) == (5, 1, 0, 7)
    table = report.format_table(recs, s)
    assert table.startswith("WARNING: 7 decisions were counted but not kept in detail") and "BLOCKED (5 attempts)" in table


def test_report_file_roundtrip_merges_and_keeps_one_summary(tmp_path):
    path = tmp_path / "r.jsonl"
    report.write([rec("blocked", "connect", "127.0.0.2", 443)], path, dropped=1)
    report.write([rec("blocked", "connect", "127.0.0.2", 443)], path, dropped=2)
    assert [r["count"] for r in report.load(path)] == [2]
    assert report.load_summary(path)["events_dropped"] == 3
    assert sum(1 for line in path.read_text().splitlines() if '"summary"' in line) == 1


def test_syslog_lines_name_the_container(tmp_path):
    import socket
    dev = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(dev))
        sent = report.syslog_blocked([rec("blocked", "connect", "127.0.0.2", 443),
                                      rec("allowed", "connect", "127.0.0.1", 80)], dev=str(dev))
        assert sent == 1
        line = rx.recv(4096).decode()
    assert line.startswith("<36>safedeploy: container c1: blocked: 127.0.0.2:443/tcp by pid 10 curl")


def test_report_summary_names_container_and_policy_even_when_empty():
    assert report.summarize([], 0, "c9", "p9")["container"] == "c9"


# -- suggest never writes a policy that validate rejects (issue 12 item 4) -----------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = st.one_of(
    st.none(),
    st.sampled_from(["pkgs.example.test", "Mirror.Internal.", "a_b.test", "1.2.3.4", "x..y", "*.wild.test", "-",
                     "a" * 64 + ".test", ("a." * 130) + "test", "sp ace.test", "dé.test", "host:80", "a/b"]),
    st.from_regex(r"[a-z0-9_-]{1,10}(\.[a-z0-9_-]{1,10}){0,3}", fullmatch=True),
    st.text(max_size=30),
)
_IPS = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


@st.composite
def _row(draw):
    kind = draw(st.sampled_from(["connect", "sendmsg", "dns", "socket"]))
    proto = "udp" if kind == "sendmsg" else draw(st.sampled_from(["tcp", "udp"]))
    port = 53 if kind == "dns" else draw(st.one_of(st.just(0), st.integers(0, 65535)))
    rule = draw(st.sampled_from(["default", "dns.resolvers", "127.0.0.9/32", "raw_sockets", "malformed-query"]))
    return rec(draw(st.sampled_from(["blocked", "would-block", "allowed"])), kind, draw(_IPS), port, proto,
               draw(_NAMES), rule=rule)


_BASES = [None, "version: 1\nname: b\ndefault: deny\nallow: ['127.0.0.1:8080']\n"
                "deny: [{cidr: 127.0.0.9/32, reason: circular}]\n"]


@settings(max_examples=300, deadline=None)
@given(st.lists(_row(), max_size=25), st.sampled_from(_BASES))
def test_suggest_output_always_validates(rows, base_text):
    from ocihook.policy import validate_files
    import tempfile
    from pathlib import Path
    base = load_policy_text(base_text, "b") if base_text else None
    doc, _problems = suggest(rows, base)
    text = to_yaml(doc)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "s.yaml"
        f.write_text(text)
        assert validate_files([f]) == [], text
    # a port-0 connect/send (an address-selection probe) never becomes a rule with a port
    for r in doc["allow"]:
        assert not (isinstance(r, dict) and 0 in r.get("ports", [])), r


def test_address_selection_probes_do_not_become_udp_rules():
    rows = [rec("would-block", "connect", "127.0.0.70", 0, "udp", "pkgs.example.test"),
            rec("would-block", "connect", "::1", 0, "udp", "pkgs.example.test"),
            rec("would-block", "dns", "127.0.0.53", 53, "udp", "pkgs.example.test"),
            rec("would-block", "connect", "127.0.0.70", 443, "tcp", "pkgs.example.test")]
    doc, problems = suggest(rows)
    assert doc["allow"] == [{"domain": "pkgs.example.test", "ports": [443], "protocol": "tcp"}]
    assert problems == []
    only_probe, problems = suggest(rows[:2])
    assert only_probe["allow"] == [] and problems == []
