"""One error type: every product exception derives from SafedeployError, and the CLI
turns any of them into `safedeploy: ...` lines and exit status 1."""
from __future__ import annotations

import subprocess
import sys

from ocihook import abigen, bpfsys, caps, cgroup, confine, demo, hook, loader, origin, policy, report, runner, watch
from ocihook.errors import SafedeployError


def test_every_product_exception_derives_from_the_base():
    for cls in (report.ReportError, cgroup.CgroupError, watch.WatchError, demo.DemoError, runner.RunError,
                policy.PolicyError, hook.HookError, bpfsys.BpfError, loader.LoaderError, confine.ConfineError,
                origin.OriginError, caps.CapError, abigen.AbiError):
        assert issubclass(cls, SafedeployError), cls


def test_policy_error_keeps_every_line():
    e = policy.PolicyError(["p.yaml: $.a: bad", "p.yaml: $.b: worse"])
    assert e.lines() == ["p.yaml: $.a: bad", "p.yaml: $.b: worse"] and str(e) == "p.yaml: $.a: bad (and 1 more error)"
    assert report.ReportError("x: no such report").lines() == ["x: no such report"]


def test_cli_prints_a_known_error_as_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ocihook.cli", "report", str(tmp_path / "nosuch.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr == f"safedeploy: {tmp_path / 'nosuch.jsonl'}.jsonl: no such report\n"
