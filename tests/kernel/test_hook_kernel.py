"""The hook against real processes and cgroups, without a runtime in between."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pathlib import Path

import pytest

from helpers import plain_bundle
from kutil import refusers
from ocihook import cgroup

BUNDLE = plain_bundle()

POLICY = '{"version": 1, "name": "k", "default": "allow", "deny": ["127.0.0.2"]}'


def _hook(state: dict, stage: str):
    return subprocess.run([sys.executable, "-m", "ocihook.hook", stage], input=json.dumps(state).encode(),
                          capture_output=True, timeout=60)


def test_refuses_to_police_the_runtimes_own_cgroup(pins):
    """A container without a cgroup of its own must not get the host policed."""
    st = {"id": "shared", "pid": os.getpid(), "status": "creating", "bundle": BUNDLE,
          "annotations": {"safedeploy.policy": POLICY}}
    res = _hook(st, "prestart")
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.startswith("safedeploy: container process") and ("runtime's cgroup" in err or "root cgroup" in err)
    assert not (Path(os.environ["SAFEDEPLOY_STATE_DIR"]) / "shared.json").exists()


def test_missing_process_fails_closed(pins):
    st = {"id": "gone", "pid": 2 ** 22 + 7, "status": "creating", "bundle": BUNDLE, "annotations": {"safedeploy.policy": POLICY}}
    res = _hook(st, "prestart")
    assert res.returncode == 1 and b"safedeploy: process 4194311 does not exist" in res.stderr


def test_prestart_then_poststop_on_a_real_cgroup(pins):
    path = Path(cgroup.create(f"hooktest-{os.getpid()}"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (path / "cgroup.procs").write_text(str(child.pid))
        st = {"id": "real", "pid": child.pid, "status": "creating", "bundle": BUNDLE, "annotations": {"safedeploy.policy": POLICY}}
        res = _hook(st, "prestart")
        assert res.returncode == 0, res.stderr
        sdir = Path(os.environ["SAFEDEPLOY_STATE_DIR"])
        rec = json.loads((sdir / "real.json").read_text())
        assert rec["cgid"] == cgroup.cgroup_id(path) and rec["attachment"]
        again = _hook(st, "prestart")
        assert again.returncode == 1 and b"already policed" in again.stderr
        assert _hook({"id": "real", "status": "stopped"}, "poststop").returncode == 0
        assert not (sdir / "real.json").exists()
        assert (Path(os.environ["SAFEDEPLOY_LOG_DIR"]) / "real.jsonl").exists()
        assert _hook({"id": "real", "status": "stopped"}, "poststop").returncode == 0  # idempotent
    finally:
        child.kill()
        child.wait()
        cgroup.remove(path)


def test_warm_prestart_imports_no_bcc_typer_jsonschema_or_policy_module(pins, tmp_path):
    """The warm hook path: cached compiled policy, pinned programs, plain bpf(2) calls."""
    path = Path(cgroup.create(f"hookwarm-{os.getpid()}"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (path / "cgroup.procs").write_text(str(child.pid))
        st = {"id": "warm0", "pid": child.pid, "status": "creating", "bundle": BUNDLE, "annotations": {"safedeploy.policy": POLICY}}
        assert _hook(st, "prestart").returncode == 0          # validates and fills the cache
        assert _hook({"id": "warm0"}, "poststop").returncode == 0
        st["id"] = "warm1"
        code = ("import sys, json\n"
                "from ocihook import hook\n"
                f"hook.run(['prestart'], json.dumps({st!r}).encode())\n"
                "bad = [m for m in ('bcc', 'typer', 'jsonschema', 'yaml', 'rich', 'ocihook.policy') if m in sys.modules]\n"
                "print(','.join(bad) or 'clean')")
        from ocihook import resources
        repo = resources.PKG_ROOT                              # the checkout, or the installed site-packages
        res = subprocess.run([sys.executable, "-S", "-E", "-c", f"import sys; sys.path.insert(0, {repo!r})\n" + code],
                             capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == "clean", res.stdout + res.stderr
        assert _hook({"id": "warm1"}, "poststop").returncode == 0
    finally:
        child.kill()
        child.wait()
        cgroup.remove(path)


def test_launcher_recompiles_missing_programs_with_a_cached_policy(tmp_path, monkeypatch):
    """The lean -S launcher, a policy already cached, and the pins gone (bpffs remounted,
    an old gc): the hook compiles and pins again instead of refusing the container."""
    import secrets
    import shutil as sh
    from ocihook import install, loader
    root = Path(f"/sys/fs/bpf/sdrelaunch{secrets.token_hex(4)}")
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", str(root))
    hook = tmp_path / "safedeploy-hook"
    install.write_hook_wrapper(hook)
    path = Path(cgroup.create(f"relaunch-{os.getpid()}"))
    child = subprocess.Popen(["sleep", "30"])
    try:
        (path / "cgroup.procs").write_text(str(child.pid))
        for i in range(2):
            st = {"id": f"relaunch{i}", "pid": child.pid, "status": "creating", "bundle": BUNDLE,
                  "annotations": {"safedeploy.policy": POLICY}}
            res = subprocess.run([str(hook), "prestart"], input=json.dumps(st).encode(), capture_output=True,
                                 timeout=120)
            assert res.returncode == 0, res.stderr
            assert subprocess.run([str(hook), "poststop"], input=json.dumps({"id": f"relaunch{i}"}).encode(),
                                  capture_output=True, timeout=60).returncode == 0
            sh.rmtree(loader.pin_dir())                     # gone before the second, cached-policy start
    finally:
        child.kill()
        child.wait()
        cgroup.remove(path)
        sh.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("policy, refuses", [
    (POLICY, False),                                                                   # CIDR deny, default allow
    ('{"version": 1, "name": "n", "default": "allow", "deny": ["auth.internal"]}', True),  # a name denied
    ('{"version": 1, "name": "d", "default": "deny", "allow": ["127.0.0.1"]}', True),      # default deny
    ('{"version": 1, "name": "r", "default": "allow", "dns": {"resolvers": ["127.0.0.53"]}}', True),
    ('{"version": 1, "name": "a", "mode": "audit", "default": "deny"}', False),           # audit refuses nothing
])
def test_a_container_gets_a_refuser_only_when_its_policy_can_refuse_a_query(pins, policy, refuses):
    """The prestart forks a refuser (ocihook/refuser.py) per container only under a policy
    whose egress can refuse a client's DNS query by name; under any other, nothing waits
    for the container's process."""
    from ocihook import refuser
    path = Path(cgroup.create(f"hookref-{os.getpid()}"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    cid = f"ref-{os.getpid()}"
    try:
        (path / "cgroup.procs").write_text(str(child.pid))
        st = {"id": cid, "pid": child.pid, "status": "creating", "bundle": BUNDLE,
              "annotations": {"safedeploy.policy": policy}}
        res = _hook(st, "prestart")
        assert res.returncode == 0, res.stderr
        cgid = cgroup.cgroup_id(path)
        deadline = time.monotonic() + 10 * refuser.START_S
        while not refusers(cgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bool(refusers(cgid)) == refuses
    finally:
        child.kill()
        child.wait()
        _hook({"id": cid, "status": "stopped"}, "poststop")
        cgroup.remove(path)
