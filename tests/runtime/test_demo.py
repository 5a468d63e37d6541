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
    assert "artefact v42" in out                                  # the mirror, by name
    assert "deploy: still unreachable, using break-glass credentials" in out
    assert "nc: bad address 'auth.demo.test'" in out               # the denied lookup fails
    assert "nc: bad address 'token.cdn.demo.test'" in out          # so does its CDN alias's (a CNAME of it)
    assert "Operation not permitted" in out                        # the unlisted telemetry IP's connect fails
    assert "BLOCKED (3 attempts)" in out
    assert "token.cdn.demo.test (127.0.53." in out and "auth.demo.test (127.0.53." in out
    assert "[the domain is a CNAME of auth.demo.test]" in out
    assert "(kernel, no process)" not in out                       # the dropped answer names who asked
    assert "mirror.demo.test (127.0.0.1:" in out
    assert "circular: the auth service is what this deploy repairs" in out
    assert "the circular dependency (auth.demo.test, and its CDN alias) failed fast and was reported" in out
    assert "container finished in" in out
    secs = float(out.split("container finished in ")[1].split("s,")[0])
    assert secs < 5, f"the deploy did not fail fast: {secs}s"
