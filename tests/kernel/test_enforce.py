"""Real connects from real processes in real cgroups under real policies (loopback only)."""
from __future__ import annotations

import os
import subprocess
import sys

from kutil import connect, udp_connected_send

DENY_AUTH = """
version: 1
name: t-deny
default: allow
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: auth service"}
  - "[::1]:9"
"""

DEFAULT_DENY = """
version: 1
name: t-allow
default: deny
allow:
  - "127.0.0.1/32"
  - "::1"
"""


def _one(records, **match):
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    assert hits, f"no report record with {match} in {records}"
    return hits[0]


def test_denied_tcp_v4_gets_eperm_allowed_reaches_listener(policed, listener):
    lst = listener("127.0.0.1")
    p = policed(DENY_AUTH)
    assert p.run(connect, "127.0.0.2", 443) == "EPERM"
    assert p.run(connect, "127.0.0.1", lst.port) == "ok"
    rec = _one(p.close(), verdict="blocked", dst_ip="127.0.0.2", dst_port=443)
    assert rec["rule"] == p.policy.rules[0].text and rec["reason"] == "circular: auth service"
    assert rec["kind"] == "connect" and rec["proto"] == "tcp" and rec["family"] == 4
    _one(p.records, verdict="allowed", dst_ip="127.0.0.1", dst_port=lst.port)


def test_denied_tcp_v6_gets_eperm_allowed_reaches_listener(policed, listener):
    lst = listener("::1")
    p = policed(DENY_AUTH)
    assert p.run(connect, "::1", 9) == "EPERM"
    assert p.run(connect, "::1", lst.port) == "ok"
    _one(p.close(), verdict="blocked", dst_ip="::1", dst_port=9, family=6)


def test_default_deny_allows_only_listed(policed, listener):
    lst4, lst6 = listener("127.0.0.1"), listener("::1")
    p = policed(DEFAULT_DENY)
    assert p.run(connect, "127.0.0.1", lst4.port) == "ok"
    assert p.run(connect, "::1", lst6.port) == "ok"
    assert p.run(connect, "127.0.0.3", lst4.port) == "EPERM"
    _one(p.close(), verdict="blocked", dst_ip="127.0.0.3", rule="default")


def test_v4_mapped_v6_is_judged_as_v4(policed, listener):
    lst = listener("127.0.0.1")
    p = policed(DENY_AUTH)
    assert p.run(connect, "::ffff:127.0.0.2", 80) == "EPERM"
    assert p.run(connect, "::ffff:127.0.0.1", lst.port) == "ok"
    _one(p.close(), verdict="blocked", dst_ip="127.0.0.2", family=4, rule=p.policy.rules[0].text)


def test_port_and_protocol_narrow_rules(policed, listener):
    lst = listener("127.0.0.1")
    p = policed(f"""
version: 1
name: t-ports
default: deny
allow:
  - {{cidr: 127.0.0.0/8, ports: [{lst.port}], protocol: tcp}}
  - "127.0.0.1:9"
deny:
  - {{cidr: 127.0.0.1/32, ports: [{lst.port + 1 if lst.port < 65535 else 1}]}}
""")
    assert p.run(connect, "127.0.0.1", lst.port) == "ok"                 # port-narrowed allow
    assert p.run(connect, "127.0.0.1", lst.port, "udp") == "EPERM"     # protocol narrows it
    assert p.run(connect, "127.0.0.1", 9) == "refused"                 # shorthand ip:port
    assert p.run(connect, "127.0.0.1", 10) == "EPERM"                  # other port: default
    p.close()


def test_udp_sendto_and_connected_udp_denied(policed, listener):
    rx = listener("127.0.0.1", "udp")
    p = policed(DENY_AUTH)
    assert p.run(connect, "127.0.0.2", 53, "udp") == "EPERM"           # unconnected sendto
    assert p.run(udp_connected_send, "127.0.0.2", 5353) == "EPERM"     # connect() on UDP
    assert p.run(connect, "127.0.0.1", rx.port, "udp") == "ok"
    rx.sock.settimeout(2)
    assert rx.sock.recv(16) == b"x"
    recs = p.close()
    _one(recs, verdict="blocked", kind="sendmsg", proto="udp", dst_port=53)
    _one(recs, verdict="blocked", kind="packet", proto="udp", dst_port=5353)   # what it sent (the connect sent nothing)


def test_audit_mode_passes_traffic_and_records_would_block(policed, listener):
    lst = listener("127.0.0.1")
    p = policed(DEFAULT_DENY.replace("name: t-allow", "name: t-audit\nmode: audit"))
    assert p.run(connect, "127.0.0.3", 9) == "refused"                 # reached the kernel's RST
    assert p.run(connect, "127.0.0.1", lst.port) == "ok"
    rec = _one(p.close(), verdict="would-block", dst_ip="127.0.0.3", dst_port=9)
    assert rec["rule"] == "default"


def _child_connect(host, port):
    """A grandchild (a real fork+exec) does the connect."""
    code = f"from kutil import connect; print(connect({host!r}, {port}))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip()


def test_children_and_nested_cgroups_inherit(policed):
    p = policed(DENY_AUTH)
    assert p.run(_child_connect, "127.0.0.2", 80) == "EPERM"
    assert p.run(connect, "127.0.0.2", 81, sub="nested") == "EPERM"
    assert p.run(_child_connect, "127.0.0.2", 82, sub="nested/deeper") == "EPERM"
    recs = p.close()
    assert {r["dst_port"] for r in recs if r["verdict"] == "blocked"} == {80, 81, 82}


def test_two_cgroups_with_different_policies_do_not_interfere(policed, listener):
    lst = listener("127.0.0.2")
    a = policed(DENY_AUTH)
    b = policed(DEFAULT_DENY.replace("127.0.0.1/32", "127.0.0.2/32"))
    assert a.run(connect, "127.0.0.2", lst.port) == "EPERM"
    assert b.run(connect, "127.0.0.2", lst.port) == "ok"
    assert b.run(connect, "127.0.0.1", 9) == "EPERM"
    assert a.run(connect, "127.0.0.1", 9) == "refused"
    ra, rb = a.close(), b.close()
    assert all(r["container"] == a.path.name for r in ra)
    assert {(r["dst_ip"], r["verdict"]) for r in ra if r["verdict"] != "allowed"} == {("127.0.0.2", "blocked")}
    assert {(r["dst_ip"], r["verdict"]) for r in rb if r["verdict"] != "allowed"} == {("127.0.0.1", "blocked")}


def test_unpoliced_process_is_untouched(policed):
    policed(DENY_AUTH)
    assert connect("127.0.0.2", 9) == "refused"


def test_release_leaves_no_map_entries_and_detaches(policed, pins):
    from ocihook import loader
    from ocihook.pinned import PinnedMaps
    p = policed(DENY_AUTH)
    assert p.run(connect, "127.0.0.2", 1) == "EPERM"
    with loader.Programs(pins) as progs:
        assert progs.attached_to(p.path) == len(loader.PROGRAMS)
    with PinnedMaps.open(pins) as maps:
        assert maps.entries_of(p.cgid) >= 3       # header, rules, the blocked event
        p.close()
        assert maps.entries_of(p.cgid) == 0
    assert not p.path.exists()
    # releasing again is harmless
    from ocihook import session
    assert session.release(p.att).events == []


def test_run_in_helper_really_moves_into_the_cgroup(policed):
    p = policed(DENY_AUTH)
    own = p.run(lambda: open("/proc/self/cgroup").read())
    assert p.path.name in own


def _wget(url: str) -> tuple[int, float, str]:
    import time
    t0 = time.monotonic()
    r = subprocess.run(["wget", "-O", "/dev/null", url], capture_output=True, text=True, timeout=60)
    return r.returncode, time.monotonic() - t0, r.stderr


def test_connect_error_chooses_the_errno_of_a_refused_connect(policed, listener):
    """connect_error: EHOSTUNREACH — TCP and UDP, IPv4 and IPv6, refused with that errno, still
    reported as blocked; GNU wget (which retries EPERM 20 times, 145 s) gives up at once."""
    import shutil
    from helpers import require
    require(shutil.which("wget") is not None, "GNU wget not installed (packaging/setup-host.sh installs it)")
    lst = listener("127.0.0.1")
    p = policed(DENY_AUTH + "connect_error: EHOSTUNREACH\n")
    assert p.run(connect, "127.0.0.2", 80) == "EHOSTUNREACH"
    assert p.run(connect, "::1", 9) == "EHOSTUNREACH"
    assert p.run(connect, "127.0.0.2", 53, "udp") == "EHOSTUNREACH"              # unconnected sendto
    assert p.run(connect, "127.0.0.1", lst.port) == "ok"                          # allowed: untouched
    rc, wall, err = p.run(_wget, "http://127.0.0.2:8080/")
    assert rc != 0 and wall < 1.0 and "No route to host" in err, (rc, wall, err)
    recs = p.close()
    assert _one(recs, verdict="blocked", dst_ip="127.0.0.2", dst_port=80)["reason"] == "circular: auth service"
    assert sum(r["count"] for r in recs if r["verdict"] == "blocked" and r["dst_port"] == 8080) == 1
