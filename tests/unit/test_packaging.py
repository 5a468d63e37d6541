"""The packaged oci-hooks(5) files: podman refuses to create containers if they are broken."""
from __future__ import annotations

import json
from pathlib import Path

from ocihook import install

PACKAGED = Path(__file__).resolve().parents[2] / "packaging" / "hooks.d"


def test_packaged_hooks_are_valid_oci_hooks_1_0_0():
    files = sorted(PACKAGED.glob("*.json"))
    assert [f.name for f in files] == sorted(install.HOOK_FILES)
    stages = {}
    for f in files:
        doc = json.loads(f.read_text())
        assert doc["version"] == "1.0.0"
        assert set(doc) == {"version", "hook", "when", "stages"}
        hook = doc["hook"]
        assert Path(hook["path"]).is_absolute() and hook["timeout"] > 0
        assert hook["args"][0] == "safedeploy-hook" and len(hook["args"]) == 2
        env = dict(e.split("=", 1) for e in hook["env"])
        assert {"PATH", "SAFEDEPLOY_POLICY_DIR", "SAFEDEPLOY_LOG_DIR", "SAFEDEPLOY_STATE_DIR",
                "SAFEDEPLOY_BPFFS"} <= env.keys()
        # every container: one without the annotation may still be created from a policed
        # cgroup (a deploy script running podman), and must then get its policy
        assert doc["when"] == {"always": True}
        stages[hook["args"][1]] = doc["stages"]
    assert stages == {"prestart": ["prestart"], "poststop": ["poststop"]}


def test_install_renders_the_real_hook_path_and_this_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDEPLOY_LOG_DIR", "/srv/reports")
    docs = install.render_hooks(tmp_path / "hook")
    for doc in docs.values():
        assert doc["hook"]["path"] == str(tmp_path / "hook")
        assert "SAFEDEPLOY_LOG_DIR=/srv/reports" in doc["hook"]["env"]
