"""`safedeploy demo` is the README's main job: it must really work, with both runtimes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import runtime_prereqs


@pytest.mark.parametrize("runtime", ["podman", "runc"])
def test_demo_runs_a_real_container_and_prints_the_report(runtime):
    runtime_prereqs("runc", runtime)
    res = subprocess.run([sys.executable, "-m", "ocihook.cli", "demo", "--runtime", runtime],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "deploy: auth unreachable, using break-glass credentials" in out
    assert "Operation not permitted" in out
    assert "BLOCKED (2 attempts)" in out and "127.0.0.2:8443/tcp" in out
    assert "circular: the auth service is what this deploy repairs" in out
    assert "the circular dependency failed fast and was reported" in out
