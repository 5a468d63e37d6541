"""Who did it: command lines and parents captured in the kernel, after the process is gone."""
from __future__ import annotations

import subprocess
import sys

from ocihook import report

POLICY = """
version: 1
name: attrib
default: allow
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: auth service"}
"""


def test_report_names_the_command_line_and_parent_of_an_exited_process(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    rep = tmp_path / "r.jsonl"
    one_liner = "import socket; socket.create_connection(('127.0.0.2', 443), timeout=2)"
    script = tmp_path / "deploy.sh"
    script.write_text(f"#!/bin/sh\n{sys.executable} -c \"{one_liner}\" || echo denied\n")
    script.chmod(0o755)
    res = subprocess.run([sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--report", str(rep),
                          "--", "sh", "-c", f"{script} --env prod"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "denied" in res.stdout, res.stderr
    rec = [r for r in report.load(rep) if r["verdict"] == "blocked"][0]
    assert rec["cmdline"] == f"{sys.executable} -c {one_liner}"      # captured in the kernel: long gone now
    assert rec["comm"].startswith("python")
    comms = [p.split(" ", 1)[1] for p in rec["parents"]]
    assert comms == ["deploy.sh", "sh"], rec["parents"]     # python <- deploy.sh <- sh -c; then safedeploy
