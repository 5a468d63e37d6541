"""Who did it: command lines and parents captured in the kernel, after the process is gone."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

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


def test_packets_the_kernel_sends_in_softirq_name_no_process(policed, listener):
    """A SYN the egress program drops (source_routes: allow, an LSRR whose first hop is
    denied) is retransmitted by the TCP timer, in softirq, on whatever task the CPU was
    running: here unpoliced spinners keep both CPUs busy. Those retransmissions must not be
    blamed on them: they are recorded with pid 0 and no process (issue 10, class 5b)."""
    import os
    import signal
    import time
    from netns import lsrr
    lst = listener("127.0.0.1")
    p = policed(POLICY + "source_routes: allow\n")

    def syn_via_denied_hop():
        s = socket.socket()
        s.setsockopt(0, 4, lsrr(["127.0.0.2"]))                 # SOL_IP, IP_OPTIONS
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", lst.port))
        except BlockingIOError:
            pass
        time.sleep(3.6)                                          # SYN retransmits at +1 s, +3 s
        s.close()
        return os.getpid()

    spinners = []
    try:
        for _ in range(os.cpu_count() or 2):
            pid = os.fork()
            if pid == 0:
                while True:
                    pass
            spinners.append(pid)
        me = p.run(syn_via_denied_hop)
        recs = p.close()
    finally:
        for pid in spinners:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    syns = [r for r in recs if r["kind"] == "packet" and r["verdict"] == "blocked" and r["dst_ip"] == "127.0.0.2"]
    pids = {r["pid"] for r in recs}
    assert not pids & set(spinners) and os.getpid() not in pids, recs
    assert [r for r in syns if r["pid"] == me], syns                # the first SYN, sent by connect()
    by_kernel = [r for r in syns if r["pid"] == 0]
    assert by_kernel, syns                                          # the retransmissions
    assert all(r["comm"] == "" and r["exe"] is None and r["cmdline"] is None for r in by_kernel), by_kernel


def test_exe_names_the_real_executable_whatever_argv_and_comm_claim(policed):
    """argv and comm are the process's to rewrite; the executable's path comes from its mm
    (mm->exe_file), walked through two stacked tmpfs mounts here (issue 10, class 5c)."""
    import os
    import secrets
    import shutil
    d = f"/dev/shm/sd-exe-{secrets.token_hex(3)}"
    os.mkdir(d)
    exe = os.path.join(d, "not-apt-get")
    shutil.copy(os.path.realpath(sys.executable), exe)
    code = ("import ctypes, socket; ctypes.CDLL(None).prctl(15, b'apt-get', 0, 0, 0); s = socket.socket(); "
            "s.settimeout(1)\ntry: s.connect(('127.0.0.2', 443))\nexcept OSError: pass")
    p = policed(POLICY)
    try:
        rc = p.run(lambda: subprocess.run(["apt-get", "-c", code, "update"], executable=exe,
                                          env={"PYTHONHOME": sys.base_prefix}, timeout=30).returncode)
        recs = [r for r in p.close() if r["verdict"] == "blocked"]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0
    assert recs and recs[0]["comm"] == "apt-get" and recs[0]["cmdline"].startswith("apt-get -c")
    assert recs[0]["exe"] == exe
    table = report.format_table(recs)
    assert "EXE" in table and exe in table
