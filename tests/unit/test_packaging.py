"""The packaged oci-hooks(5) files: podman refuses to create containers if they are broken."""
from __future__ import annotations

import json
from pathlib import Path

from ocihook import install

PACKAGED = install.HOOKS_TEMPLATES


def test_packaged_hooks_are_valid_oci_hooks_1_0_0():
    files = sorted(PACKAGED.glob("*.json"))
    assert [f.name for f in files] == sorted(install.HOOK_FILES)
    stages = {}
    for f in files:
        doc = json.loads(f.read_text())
        assert doc["version"] == "1.0.0"
        assert set(doc) == {"version", "hook", "when", "stages"}
        hook = doc["hook"]
        assert hook["timeout"] > 0
        # fail closed: /bin/sh always exists (podman skips an entry whose path is missing)
        assert hook["path"] == "/bin/sh" and hook["args"][:3] == ["sh", "-c", install.GUARD]
        assert Path(hook["args"][3]).is_absolute() and len(hook["args"]) == 5
        env = dict(e.split("=", 1) for e in hook["env"])
        assert {"PATH", "SAFEDEPLOY_POLICY_DIR", "SAFEDEPLOY_LOG_DIR", "SAFEDEPLOY_STATE_DIR",
                "SAFEDEPLOY_BPFFS"} <= env.keys()
        # every container: one without the annotation may still be created from a policed
        # cgroup (a deploy script running podman), and must then get its policy
        assert doc["when"] == {"always": True}
        stages[hook["args"][4]] = doc["stages"]
    assert stages == {"prestart": ["prestart"], "poststop": ["poststop"]}


def test_install_renders_the_real_hook_path_and_this_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDEPLOY_LOG_DIR", "/srv/reports")
    docs = install.render_hooks(tmp_path / "hook")
    for doc in docs.values():
        assert doc["hook"]["path"] == "/bin/sh" and doc["hook"]["args"][3] == str(tmp_path / "hook")
        assert "SAFEDEPLOY_LOG_DIR=/srv/reports" in doc["hook"]["env"]


def test_the_guard_runs_the_launcher_or_refuses_with_a_safedeploy_line(tmp_path):
    """The hooks.d entry as the runtime runs it: argv from the file, executable /bin/sh."""
    import subprocess
    launcher = tmp_path / "hook"
    args = install.hook_args(launcher, "prestart")
    gone = subprocess.run(args, executable=install.GUARD_SHELL, capture_output=True, text=True)
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"safedeploy: hook launcher {launcher} is missing: refusing"), gone.stderr
    launcher.write_text('#!/bin/sh\necho "ran $# $1"; exit 7\n')
    launcher.chmod(0o755)
    ran = subprocess.run(args, executable=install.GUARD_SHELL, capture_output=True, text=True)
    assert (ran.returncode, ran.stdout) == (7, "ran 1 prestart\n")


def test_launcher_refuses_when_its_python_or_package_is_gone(tmp_path):
    import subprocess
    for python, root, missing in (("/nonexistent/python3", install.resources.PKG_ROOT, "/nonexistent/python3"),
                                  ("/usr/bin/python3", str(tmp_path), f"{tmp_path}/ocihook")):
        hook = tmp_path / "safedeploy-hook"
        install.write_hook_wrapper(hook, python=python, root=root)
        res = subprocess.run([str(hook), "prestart"], input="{}", capture_output=True, text=True)
        assert res.returncode == 1 and res.stderr.startswith(f"safedeploy: hook launcher {hook}: "), res.stderr
        assert missing in res.stderr
