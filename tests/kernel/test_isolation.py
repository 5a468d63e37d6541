"""One tenant cannot degrade another: every table a cgroup can fill is its own, bounded by
a quota, and what ran out is named in that cgroup's own report. Violations are counted
exactly whether or not their details fit."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dnsutil import Server, Zone, query
from kutil import connect
from ocihook import bpfsys, report
from ocihook.pinned import INNER, RULES_QUOTA, PinnedMaps

ALLOWED_FLOOD = INNER["events"][3] + 1500        # distinct allowed destinations: past the events quota


def _allowed_flood(n: int) -> int:
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(n):
            s.sendto(b"x", (f"127.8.{(i >> 8) & 255}.{i & 255}", 9))
            sent += 1
    return sent


def test_allowed_flood_never_hides_a_violation(policed, listener):
    p = policed("version: 1\nname: flood\ndefault: allow\ndeny: [{cidr: 127.0.0.2/32, reason: circular}]\n")
    assert p.run(_allowed_flood, ALLOWED_FLOOD) == ALLOWED_FLOOD
    assert p.run(connect, "127.0.0.2", 443) == "EPERM"
    recs = p.close()
    blocked = [r for r in recs if r["verdict"] == "blocked"]
    assert [(r["dst_ip"], r["dst_port"], r["reason"]) for r in blocked] == [("127.0.0.2", 443, "circular")]
    c = p.drained.counters
    assert c["blocked"] == 1 and c["allowed"] == ALLOWED_FLOOD and c["blocked_dropped"] == 0
    assert c["events_dropped"] == ALLOWED_FLOOD - INNER["events"][3]        # exactly the overflow
    summary = report.summarize(recs, p.drained.dropped, counters=c)
    assert summary["blocked"] == 1 and summary["allowed"] == ALLOWED_FLOOD
    assert summary["quota"]["events_dropped"] == c["events_dropped"]


FLOOD_SCRIPT = r"""
import socket
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for i in range(%(n)d):                      # the deny flood: past the blocked-details quota
        try:
            s.sendto(b"x", ("127.9.%%d.%%d" %% ((i >> 8) & 255, i & 255), 9))
        except OSError:
            pass
"""


def test_ci_gate_fails_on_violations_whose_details_did_not_fit(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\nname: gate\ndefault: deny\nallow: ['127.0.0.1']\n")
    n = INNER["blocked"][3] + 500
    script = tmp_path / "flood.py"
    script.write_text(FLOOD_SCRIPT % {"n": n})
    rep = tmp_path / "r.jsonl"
    res = subprocess.run([sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--audit",
                          "--fail-on-violation", "--report", str(rep), "--", sys.executable, str(script)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    summary = report.load_summary(rep)
    assert summary["would_block"] == n                     # exact, though only the quota's worth kept detail
    assert summary["quota"]["blocked_dropped"] == n - INNER["blocked"][3]
    assert f"{n} violations" in res.stderr


def _lookup_many(server: str, names: list[str]) -> int:
    return sum(query(n, server)[0] == "ok" for n in names)


def test_one_cgroup_cannot_evict_anothers_learned_addresses(policed, listener):
    lst = listener("127.0.0.1")
    per = 16
    n_names = INNER["learned"][3] // per + 40            # enough answers to overflow one learned quota
    zone = {"mirror.victim.test": [("A", "127.0.0.1", 600)]}
    for i in range(n_names):
        zone[f"n{i}.flood.test"] = [("A", f"127.{20 + i // 250}.{i % 250}.{j}", 600) for j in range(1, per + 1)]
    srv = Server(Zone(zone), "127.0.0.159")
    try:
        policy = ("version: 1\nname: {n}\ndefault: deny\nallow: ['mirror.victim.test', '*.flood.test']\n"
                  "dns: {{resolvers: ['127.0.0.159']}}\n")
        victim = policed(policy.format(n="victim"))
        attacker = policed(policy.format(n="attacker"))
        assert victim.run(query, "mirror.victim.test", "127.0.0.159") == ("ok", ["127.0.0.1"])
        names = [f"n{i}.flood.test" for i in range(n_names)]
        assert attacker.run(_lookup_many, "127.0.0.159", names) == n_names
        assert victim.run(connect, "127.0.0.1", lst.port) == "ok"          # still learned in its own map
        with PinnedMaps.open(victim.att.pin_dir) as m:
            assert m.counters(attacker.cgid)["learned_new"] > INNER["learned"][3]
            assert m.counters(victim.cgid)["learned_new"] == 1
        attacker_recs = attacker.close()
        summary = report.summarize(attacker_recs, attacker.drained.dropped, counters=attacker.drained.counters)
        assert summary["quota"]["learned"] == n_names * per - INNER["learned"][3]
        victim.close()
    finally:
        srv.stop()


def test_a_policy_over_a_cgroups_share_is_refused_before_anything_is_written(tmp_path, policed, listener):
    ports = list(range(1, RULES_QUOTA // 2 + 100))        # two protocols: past the cidrs quota
    pol = tmp_path / "big.yaml"
    pol.write_text("version: 1\nname: big\ndefault: deny\nallow:\n"
                   f"  - {{cidr: 127.0.0.0/8, ports: {ports}}}\n")
    marker = tmp_path / "ran"
    res = subprocess.run([sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--", "touch",
                          str(marker)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and not marker.exists()
    assert res.stderr.strip().startswith("safedeploy: policy needs") and "share" in res.stderr
    # and a neighbour with rules of its own starts and enforces as ever
    lst = listener("127.0.0.1")
    p = policed("version: 1\nname: neighbour\ndefault: deny\nallow: ['127.0.0.1/32']\n")
    assert p.run(connect, "127.0.0.1", lst.port) == "ok"
    assert p.run(connect, "127.0.0.3", lst.port) == "EPERM"


def test_release_cost_does_not_depend_on_a_neighbours_full_tables(policed, listener):
    import time
    busy = policed("version: 1\nname: busy\ndefault: allow\n")
    busy.run(_allowed_flood, INNER["events"][3])
    quiet = policed("version: 1\nname: quiet\ndefault: allow\n")
    t0 = time.monotonic()
    quiet.close()
    assert time.monotonic() - t0 < 0.25
    assert busy.close()


CONNECT = "import socket, sys\ntry:\n    socket.create_connection(('127.0.0.2', 443), timeout=2)\nexcept OSError:\n    pass\n"


def _spawn_with_pid(pid: int, cg: Path, tag: str) -> bool:
    """Start `python -c CONNECT TAG` in cgroup cg as process `pid` (pid reuse, forced through
    /proc/sys/kernel/ns_last_pid); False when another fork took the pid first."""
    from ocihook import cgroup
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
    proc = subprocess.Popen([sys.executable, "-c", CONNECT, tag], preexec_fn=lambda: cgroup.move_self(cg))
    proc.wait(timeout=30)
    return proc.pid == pid


def test_a_reused_pid_is_never_blamed_on_the_earlier_process(policed):
    p = policed("version: 1\nname: reuse\ndefault: allow\ndeny: ['127.0.0.2/32']\n")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for _ in range(50):
        pid = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 500
        if pid >= pid_max - 10:
            pid = 1000
        if _spawn_with_pid(pid, p.path, "first-process") and \
                _spawn_with_pid(pid, p.path, "second-process"):
            break
    else:
        pytest.fail("could not make two processes with the same pid")
    recs = [r for r in p.close() if r["pid"] == pid]
    assert sorted(r["cmdline"].split()[-1] for r in recs) == ["first-process", "second-process"]


def test_a_table_set_taken_from_the_spares_holds_nothing_of_the_cgroup_before(policed, listener, pins):
    """Starts take an emptied table set (the spares); whatever the last owner's set held —
    its rules, what it learned and recorded — is not in it."""
    srv = listener("127.0.0.7")
    a = policed("version: 1\nname: first\ndefault: deny\nallow: ['127.0.0.7', '127.0.0.8/31:80']\n")
    assert a.run(connect, "127.0.0.7", srv.port) == "ok"
    assert a.run(connect, "127.0.0.9", 443) == "EPERM"
    with PinnedMaps.open(pins) as maps:
        a_key = maps.policy_of(a.cgid).tables
        assert maps.entries_of(a.cgid) > 2 + len(INNER)      # header, counters, tables and what they hold
    a.close()
    with PinnedMaps.open(pins) as maps:
        spares = set(maps.spares())
        assert a_key not in spares and spares                # a's set was dropped; an empty one made
    b = policed("version: 1\nname: second\ndefault: deny\nallow: ['127.0.0.1']\n")
    with PinnedMaps.open(pins) as maps:
        b_key = maps.policy_of(b.cgid).tables
        assert b_key in spares                               # taken from the spares
        held = {}
        for name, (key_t, val_t, _, _) in INNER.items():
            fd = maps.inner(b.cgid, name)
            held[name] = len(bpfsys.map_keys(fd, key_t)) if key_t else int(bpfsys.map_peek(fd, val_t()))
            os.close(fd)
    assert held == {**{n: 0 for n in INNER}, "cidrs": 2}     # b's rule (tcp and udp), nothing else
    assert b.run(connect, "127.0.0.7", srv.port) == "EPERM"  # a's rule is not b's
    recs = b.close()
    assert [(r["dst_ip"], r["verdict"]) for r in recs] == [("127.0.0.7", "blocked")]
