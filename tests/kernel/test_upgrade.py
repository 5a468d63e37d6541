"""Upgrades: a new version of the BPF sources loads beside the old one; cgroups on the old
programs stay enforced until they end; gc then removes the unused old version."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from kutil import connect, run_in
from ocihook import cgroup, loader, session
from ocihook.compiler import compile_policy
from ocihook.pinned import PinnedMaps
from ocihook.policy import load_policy_text

POLICY = "version: 1\nname: upg\ndefault: allow\ndeny: ['127.0.0.2']\n"


def test_new_version_beside_old_then_gc_removes_the_unused_old(tmp_path, monkeypatch):
    root = f"/sys/fs/bpf/sdupg{secrets.token_hex(4)}"
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", root)
    src = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, src)
    with open(src / "sock_addr.c", "a") as f:
        f.write("\n/* version 2 */\n")
    compiled = compile_policy(load_policy_text(POLICY, "t"))
    old_cg = cgroup.create(f"upg-old-{secrets.token_hex(3)}")
    new_cg = cgroup.create(f"upg-new-{secrets.token_hex(3)}")
    old_att = new_att = None
    try:
        old_att = session.apply(old_cg, compiled)                 # the running container, old programs
        env = dict(os.environ, SAFEDEPLOY_BPF_SRC=str(src))
        res = subprocess.run([sys.executable, "-c", "from ocihook import loader; print(loader.ensure_programs())"],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        new_pins = Path(res.stdout.strip())
        assert str(new_pins) != old_att.pin_dir and loader.is_pinned(new_pins) and loader.is_pinned(old_att.pin_dir)
        # a container started after the upgrade runs on the new programs
        with PinnedMaps.open(new_pins) as maps, loader.Programs(new_pins) as progs:
            cgid = cgroup.cgroup_id(new_cg)
            maps.load_policy(cgid, compiled)
            progs.attach(new_cg)
        new_att = session.Attachment(new_cg, cgid, new_pins)
        assert run_in(new_cg, connect, "127.0.0.2", 80) == "EPERM"
        assert run_in(old_cg, connect, "127.0.0.2", 80) == "EPERM"   # the old one keeps working
        gc = [sys.executable, "-m", "ocihook.cli", "gc"]
        out = subprocess.run(gc, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and os.path.exists(old_att.pin_dir)     # still in use: kept
        session.release(old_att, compiled)
        cgroup.remove(old_cg)
        out = subprocess.run(gc, env=env, capture_output=True, text=True, timeout=60)
        assert f"removed unused program version {os.path.basename(old_att.pin_dir)}" in out.stdout, out.stdout + out.stderr
        assert not os.path.exists(old_att.pin_dir) and loader.is_pinned(new_pins)
        assert run_in(new_cg, connect, "127.0.0.2", 80) == "EPERM"
    finally:
        for att in (old_att, new_att):
            if att:
                session.release(att, compiled)
        cgroup.remove(old_cg)
        cgroup.remove(new_cg)
        shutil.rmtree(root, ignore_errors=True)
