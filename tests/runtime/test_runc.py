"""runc with the hook in config.json: real containers, real policies, real reports."""
from __future__ import annotations

import json
import os
from pathlib import Path
import secrets
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ocihook import cgroup, report
from ocihook import bpfsys
from ocihook.pinned import SPARES_MAX, U64, PinnedMaps
from rtutil import make_bundle, runc_run, wait_poststop

POLICY = """
version: 1
name: rollout
default: deny
allow:
  - "127.0.0.1/32"
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: auth service"}
"""

PROBE = "echo x | nc 127.0.0.2 80; echo a=$?; echo x | nc 127.0.0.1 {port}; echo b=$?"


def _listener():
    """A loopback service that answers and hangs up (so nc in the container finishes)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)

    def serve():
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            conn.sendall(b"ok\n")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return s


def _cid() -> str:
    return f"sdtest-{secrets.token_hex(4)}"


def _records(hook, cid):
    wait_poststop(hook.log_dir, hook.state_dir, cid)
    return report.load(hook.log_dir / f"{cid}.jsonl")


def test_runc_denied_eperm_allowed_ok_report_and_no_state(tmp_path, rootfs, hook):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    before = set()
    if os.path.exists(hook.pins):
        with PinnedMaps.open(hook.pins) as maps:
            before = set(maps.policed_cgroups())
    lst = _listener()
    cid = _cid()
    bundle = make_bundle(tmp_path / "b", rootfs, PROBE.format(port=lst.getsockname()[1]),
                         annotations={"safedeploy.policy": "rollout"}, hook_path=hook.path, hook_env=hook.env)
    res = runc_run(bundle, cid)
    lst.close()
    assert res.returncode == 0, res.stderr
    assert "Operation not permitted" in res.stderr and "a=1" in res.stdout and "b=0" in res.stdout
    recs = _records(hook, cid)
    blocked = [r for r in recs if r["verdict"] == "blocked"]
    assert len(blocked) == 1 and blocked[0]["dst_ip"] == "127.0.0.2" and blocked[0]["comm"] == "nc"
    assert blocked[0]["container"] == cid and blocked[0]["reason"] == "circular: auth service"
    assert any(r["verdict"] == "allowed" and r["dst_ip"] == "127.0.0.1" for r in recs)
    assert not (hook.state_dir / f"{cid}.json").exists()
    from ocihook.install import _live_cgroup_ids
    # the container's entries are gone: every policed cgroup left is live, or was policed
    # before this container started (an earlier test's leftovers are gc's business, and a
    # podman container of an earlier test may still be in its poststop)
    deadline = time.monotonic() + 10
    while True:
        live = _live_cgroup_ids()
        with PinnedMaps.open(hook.pins) as maps:
            stale = [cg for cg in maps.policed_cgroups() if cg not in live and cg not in before]
        if not stale or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stale == []


def test_runc_bad_policy_fails_closed(tmp_path, rootfs, hook):
    (hook.policy_dir / "bad.yaml").write_text("version: 1\nname: bad\nallow: ['*foo.com']\n")
    for value, needle in (("bad", "$.allow[0]"), ("nope", "unknown policy 'nope'"),
                          ("base64:!!!", "invalid base64"), ("{not json", "")):
        cid = _cid()
        bundle = make_bundle(tmp_path / cid, rootfs, "touch /ran",
                             annotations={"safedeploy.policy": value}, hook_path=hook.path, hook_env=hook.env)
        res = runc_run(bundle, cid)
        assert res.returncode != 0, f"{value}: container started"
        assert "safedeploy:" in res.stderr and needle in res.stderr, res.stderr
        assert not (bundle / "rootfs" / "ran").exists(), f"{value}: the container process ran"
        assert not (hook.state_dir / f"{cid}.json").exists()
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)


def test_runc_without_annotation_is_untouched(tmp_path, rootfs, hook):
    cid = _cid()
    bundle = make_bundle(tmp_path / "b", rootfs, "echo x | nc 127.0.0.2 9; echo a=$?",
                         hook_path=hook.path, hook_env=hook.env)
    res = runc_run(bundle, cid)
    assert res.returncode == 0
    assert "Connection refused" in res.stderr and "not permitted" not in res.stderr
    assert not (hook.log_dir / f"{cid}.jsonl").exists()
    assert not list(hook.state_dir.glob(f"{cid}*"))


def test_gc_after_runtime_skipped_poststop(tmp_path, rootfs, hook):
    """A runtime that dies never runs poststop: gc finds the vanished cgroup and cleans."""
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    cid = _cid()
    bundle = make_bundle(tmp_path / "b", rootfs, "echo x | nc 127.0.0.2 80; true",
                         annotations={"safedeploy.policy": "rollout"}, hook_path=hook.path, hook_env=hook.env,
                         stages=("prestart",))
    res = runc_run(bundle, cid)
    assert res.returncode == 0, res.stderr
    state = json.loads((hook.state_dir / f"{cid}.json").read_text())
    cgid = state["cgid"]
    with PinnedMaps.open(hook.pins) as maps:
        assert cgid in maps.policed_cgroups()
    from ocihook import install
    assert install.gc(log=lambda *_: None) >= 1
    assert not (hook.state_dir / f"{cid}.json").exists()
    with PinnedMaps.open(hook.pins) as maps:
        assert maps.entries_of(cgid) == 0
    assert [r["dst_ip"] for r in _records(hook, cid) if r["verdict"] == "blocked"] == ["127.0.0.2"]


def test_twenty_parallel_containers_each_get_their_own_policy(tmp_path, rootfs, hook):
    jobs = []
    for i in range(20):
        mine, other = f"127.0.1.{i + 1}", f"127.0.1.{(i + 1) % 20 + 1}"
        (hook.policy_dir / f"p{i}.yaml").write_text(
            f"version: 1\nname: p{i}\ndefault: allow\ndeny: ['{mine}']\n")
        script = f"echo x | nc {mine} 9; echo mine=$?; echo x | nc {other} 9; echo other=$?"
        cid = _cid()
        jobs.append((cid, make_bundle(tmp_path / cid, rootfs, script, annotations={"safedeploy.policy": f"p{i}"},
                                      hook_path=hook.path, hook_env=hook.env), mine, other))
    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(lambda j: runc_run(j[1], j[0], timeout=120), jobs))
    for (cid, _b, mine, other), res in zip(jobs, results):
        assert res.returncode == 0, res.stderr
        assert f"can't connect to remote host ({mine}): Operation not permitted" in res.stderr, res.stderr
        assert f"({other}): Connection refused" in res.stderr, res.stderr
        blocked = {r["dst_ip"] for r in _records(hook, cid) if r["verdict"] == "blocked"}
        assert blocked == {mine}
    assert not list(hook.state_dir.glob("sdtest-*.json"))
    assert os.path.isdir(cgroup.cgroup2_mount())


def test_500_lifecycles_leave_zero_leaks(tmp_path, rootfs, hook):
    """Start and stop 500 policed containers: no state file, map entry, cgroup or pin stays."""
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    bundle = make_bundle(tmp_path / "b", rootfs, "echo x | nc 127.0.0.2 9 2>/dev/null; true",
                         annotations={"safedeploy.policy": "rollout"}, hook_path=hook.path, hook_env=hook.env)
    pins_before = sorted(p.name for p in hook.pins.iterdir())
    cg_root = Path(cgroup.cgroup2_mount())
    for i in range(500):
        res = runc_run(bundle, f"sdleak-{i}")
        assert res.returncode == 0, (i, res.stderr)
    wait_poststop(hook.log_dir, hook.state_dir, "sdleak-499")
    import time
    for _ in range(200):                       # the background poststops finish
        if not list(hook.state_dir.glob("*.json")):
            break
        time.sleep(0.05)
    assert not list(hook.state_dir.glob("*.json"))
    assert len(list(hook.log_dir.glob("sdleak-*.jsonl"))) == 500
    assert all(r["verdict"] == "blocked" for r in report.load(hook.log_dir / "sdleak-499.jsonl"))
    assert not [p for p in cg_root.rglob("sdleak-*")]
    from ocihook.install import _live_cgroup_ids
    live = _live_cgroup_ids()
    with PinnedMaps.open(hook.pins) as maps:
        assert all(cg in live for cg in maps.policed_cgroups())
        assert all(k.value in live for k in bpfsys.map_keys(maps.fds["cgstats"], U64))  # no counters of a gone cgroup
        assert maps.stray_tables() == set()                       # its maps: emptied into the spares, or gone
        assert len(maps.spares()) <= SPARES_MAX
    assert sorted(p.name for p in hook.pins.iterdir()) == pins_before       # shared programs: no per-container pin
    assert not [p for p in hook.pins.parent.iterdir() if p.name.startswith("tmp_")]
    assert "sdleak" not in subprocess.run(["runc", "list"], capture_output=True, text=True).stdout


def test_watch_shows_a_blocked_event_while_the_container_runs(tmp_path, rootfs, hook):
    from helpers import start_watch
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    cid = _cid()
    bundle = make_bundle(tmp_path / "b", rootfs, "echo x | nc 127.0.0.2 80; sleep 1",  # lives on while watch reads
                         annotations={"safedeploy.policy": "rollout"}, hook_path=hook.path, hook_env=hook.env)
    watch = start_watch("--duration", "8", "--json")        # returns once its ring buffer is open
    try:
        res = runc_run(bundle, cid)
        out, _ = watch.communicate(timeout=30)
    finally:
        watch.kill()
    assert res.returncode == 0, res.stderr
    evs = [json.loads(line) for line in out.splitlines()]
    mine = [e for e in evs if e["container"] == cid]
    assert mine and mine[0]["verdict"] == "blocked" and mine[0]["dst_ip"] == "127.0.0.2" and mine[0]["comm"] == "nc"
    assert mine[0]["rule"] == "127.0.0.2/32" and mine[0]["reason"] == "circular: auth service"
