"""install / uninstall / gc against the real system pieces (a test-local hooks dir)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "ocihook.cli"]


def test_install_then_uninstall(tmp_path, monkeypatch):
    import secrets
    root = Path(f"/sys/fs/bpf/sdinst{secrets.token_hex(4)}")   # uninstall unpins: not the shared programs
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", str(root))
    hooks, hook = tmp_path / "hooks.d", tmp_path / "libexec" / "safedeploy-hook"
    res = subprocess.run([*CLI, "install", "--hooks-dir", str(hooks), "--hook-path", str(hook)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert os.access(hook, os.X_OK)
    for name in ("safedeploy-prestart.json", "safedeploy-poststop.json"):
        entry = json.loads((hooks / name).read_text())["hook"]
        assert entry["path"] == "/bin/sh" and entry["args"][3] == str(hook)
    assert "hook chain: hooks.d -> launcher -> python -> ocihook.hook runs" in res.stdout
    assert (Path(os.environ["SAFEDEPLOY_POLICY_DIR"]) / "example.yaml").exists()
    val = subprocess.run([*CLI, "policy", "validate", str(Path(os.environ["SAFEDEPLOY_POLICY_DIR"]) / "example.yaml")],
                         capture_output=True, text=True)
    assert val.returncode == 0
    # the launcher really runs the hook: garbage in, one clear line out
    bad = subprocess.run([str(hook), "prestart"], input=b"nope", capture_output=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith(b"safedeploy: OCI state on stdin is not JSON")
    doctor = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 0 and "ok   programs: pinned" in doctor.stdout, doctor.stdout
    res = subprocess.run([*CLI, "uninstall", "--hooks-dir", str(hooks), "--hook-path", str(hook)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not hook.exists() and not list(hooks.glob("*.json"))
    assert not root.exists()                                          # nothing policed: programs unpinned
