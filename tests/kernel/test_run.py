"""`safedeploy run` end to end: the real CLI, a real script, a real report, nothing left over."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ocihook import cgroup, loader, report
from ocihook.pinned import PinnedMaps

POLICY = """
version: 1
name: run-test
default: deny
allow:
  - "127.0.0.1/32"
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: auth service"}
"""

SCRIPT = r"""
import socket, sys
def try_(host, port):
    s = socket.socket()
    try:
        s.connect((host, port)); return "ok"
    except ConnectionRefusedError: return "refused"
    except PermissionError: return "EPERM"
print(try_("127.0.0.1", %d), try_("127.0.0.2", 443), try_("127.0.0.9", 80))
sys.exit(7)
"""


def safedeploy(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ocihook.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_run_blocks_reports_and_cleans_up(tmp_path, listener, pins):
    lst = listener("127.0.0.1")
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    rep = tmp_path / "r.jsonl"
    runs = lambda: {d for d in os.listdir(Path(cgroup.cgroup2_mount()) / "safedeploy") if d.startswith("run-")}  # noqa: E731
    before = runs()
    res = safedeploy("run", "--policy", str(pol), "--report", str(rep), "--",
                     sys.executable, "-c", SCRIPT % lst.port)
    assert res.returncode == 7, res.stderr               # CMD's own status
    assert res.stdout.split() == ["ok", "EPERM", "EPERM"]
    assert "blocked: 127.0.0.2:443/tcp" in res.stderr and "circular: auth service" in res.stderr
    recs = report.load(rep)
    assert report.load_summary(rep) == {**report.summarize(recs), "container": recs[0]["container"],
                                        "capabilities_kept": []}
    blocked = {(r["dst_ip"], r["dst_port"]): r for r in recs if r["verdict"] == "blocked"}
    assert set(blocked) == {("127.0.0.2", 443), ("127.0.0.9", 80)}
    assert blocked[("127.0.0.9", 80)]["rule"] == "default"
    assert blocked[("127.0.0.2", 443)]["reason"] == "circular: auth service"
    assert all(r["policy"] == "run-test" and r["comm"].startswith("python") for r in recs), recs
    # nothing of the run remains: cgroup, map entries (policy and events), attachments
    assert runs() == before
    from ocihook.install import _live_cgroup_ids
    live = _live_cgroup_ids()
    with PinnedMaps.open(pins) as maps:   # others may police cgroups meanwhile: none may be dead
        assert all(cg in live for cg in maps.policed_cgroups())
    assert loader.is_pinned(pins)  # the shared programs stay for the next run


def test_run_audit_and_fail_on_violation(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    rep = tmp_path / "r.jsonl"
    res = safedeploy("run", "--policy", str(pol), "--audit", "--fail-on-violation", "--report", str(rep), "--",
                     sys.executable, "-c", SCRIPT % 9)
    assert res.returncode == 3, res.stderr
    assert res.stdout.split() == ["refused", "refused", "refused"]   # audit blocks nothing
    verdicts = {r["verdict"] for r in report.load(rep)}
    assert verdicts == {"would-block", "allowed"}


def test_run_default_report_location_and_report_command(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    res = safedeploy("run", "--policy", str(pol), "--", sys.executable, "-c", SCRIPT % 9)
    assert res.returncode == 7
    logs = list(Path(os.environ["SAFEDEPLOY_LOG_DIR"]).glob("run-*.jsonl"))
    assert len(logs) == 1 and str(logs[0]) in res.stderr
    table = safedeploy("report", logs[0].stem)
    assert table.returncode == 0 and "BLOCKED" in table.stdout and "127.0.0.2:443/tcp" in table.stdout
    js = safedeploy("report", str(logs[0]), "--format", "json")
    lines = [json.loads(line) for line in js.stdout.splitlines()]
    assert {r["verdict"] for r in lines[:-1]} == {"blocked", "allowed"} and lines[-1]["summary"] is True


def test_run_bad_policy_is_one_line_and_runs_nothing(tmp_path):
    pol = tmp_path / "bad.yaml"
    pol.write_text("version: 1\nname: x\nallow: ['10.0.0.1/8']\n")
    marker = tmp_path / "ran"
    res = safedeploy("run", "--policy", str(pol), "--", "touch", str(marker))
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "$.allow[0]" in res.stderr
    assert "Traceback" not in res.stderr and not marker.exists()


def test_run_missing_command_is_clear(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    res = safedeploy("run", "--policy", str(pol), "--", "/nonexistent/deploy.sh")
    assert res.returncode == 1 and "cannot run /nonexistent/deploy.sh" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_cgroup_deeper_than_the_programs_look_is_refused_whole(pins, tmp_path):
    """The programs walk SD_MAX_DEPTH levels to find a policy: a cgroup deeper than that
    would run unpoliced, so applying to it fails with one line and writes nothing."""
    from ocihook import abi, compiler, session
    from ocihook.policy import load_policy_text
    top = Path(cgroup.cgroup2_mount()) / f"sd-deep-{os.getpid()}"
    path = top
    for i in range(abi.SD_MAX_DEPTH):
        path = path / f"l{i}"
    path.mkdir(parents=True)
    try:
        compiled = compiler.compile_policy(load_policy_text(POLICY))
        try:
            session.apply(path, compiled)
        except cgroup.CgroupError as e:
            msg = str(e)
        else:
            pytest.fail("a cgroup too deep to police was policed")
        assert f"{abi.SD_MAX_DEPTH + 1} levels deep" in msg and f"{abi.SD_MAX_DEPTH - 1} levels down" in msg
        assert "\n" not in msg
        with PinnedMaps.open(pins) as maps:
            assert maps.policy_of(cgroup.cgroup_id(path)) is None
    finally:
        for p in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
            if p.is_dir():
                p.rmdir()
        top.rmdir()


PLANT = r"""
import json, socket, sys
path = sys.argv[1]
rec = {"verdict": "blocked", "kind": "connect", "proto": "tcp", "family": 4, "dst_ip": "127.0.0.2", "dst_port": 1,
       "rule": "default", "count": -1, "pid": 1}
same = dict(rec, dst_port=9, rule="127.0.0.2/32", count=-5)
summ = {"summary": True, "blocked": -1, "would_block": -3.5, "allowed": 0, "events_dropped": 0}
open(path, "w").write("\n".join(json.dumps(x) for x in (rec, same, summ)) + "\n")
s = socket.socket()
print(s.connect_ex(("127.0.0.2", 9)))
"""


def test_a_report_planted_by_the_command_cannot_cancel_its_violations(tmp_path):
    """Found by an attacker: the command wrote the --report file first, with negative counts,
    and the merge made --fail-on-violation exit 0 after a blocked connect."""
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    rep = tmp_path / "r.jsonl"
    res = safedeploy("run", "--policy", str(pol), "--fail-on-violation", "--report", str(rep), "--",
                     sys.executable, "-c", PLANT, str(rep))
    assert res.returncode == 3, (res.stdout, res.stderr)
    summary = report.load_summary(rep)
    assert summary["blocked"] == 1 and summary["would_block"] == 0
    assert all(r["count"] > 0 for r in report.load(rep))


USERNS = r"""
import ctypes, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(rc):
    return "ok" if rc == 0 else os.strerror(ctypes.get_errno())
out = {"unshare": errno_of(libc.unshare(0x10000000)),                          # CLONE_NEWUSER
       "unshare_net": errno_of(libc.unshare(0x10000000 | 0x40000000)),         # with CLONE_NEWNET
       "clone3": errno_of(libc.syscall(435, 0, 0))}
pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)                           # clone(CLONE_NEWUSER|SIGCHLD)
if pid == 0:
    os._exit(0)
out["clone"] = "ok" if pid > 0 else os.strerror(ctypes.get_errno())
t = threading.Thread(target=lambda: None); t.start(); t.join()
out["thread"] = "ok"
out["fork"] = subprocess.run(["true"]).returncode
out["tool"] = subprocess.run(["unshare", "-U", "-r", "-n", "true"], capture_output=True, text=True).returncode
print(out)
"""


def test_a_run_cannot_make_a_user_namespace(tmp_path):
    """Found by an attacker: in a user namespace of its own a command regains CAP_NET_RAW over
    a network namespace of its own, and forged a DNS answer there (AF_PACKET) that the
    programs learned from. unshare/clone with CLONE_NEWUSER fail with EPERM, clone3 with ENOSYS
    (glibc falls back to clone); threads and processes still start."""
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    res = safedeploy("run", "--policy", str(pol), "--", sys.executable, "-c", USERNS)
    assert res.returncode == 0, res.stderr
    out = eval(res.stdout.strip().splitlines()[-1])  # noqa: S307 — our own script's dict
    assert out == {"unshare": "Operation not permitted", "unshare_net": "Operation not permitted",
                   "clone3": "Function not implemented", "clone": "Operation not permitted",
                   "thread": "ok", "fork": 0, "tool": 1}, out
    # outside a run, the same script makes its namespaces (the filter is the run's)
    outside = subprocess.run([sys.executable, "-c", USERNS], capture_output=True, text=True)
    assert "'unshare': 'ok'" in outside.stdout, outside.stdout
