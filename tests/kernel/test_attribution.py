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


def test_packets_the_kernel_sends_in_softirq_name_no_process(pins, listener):
    """An ACK the kernel sends while this (unpoliced) test process runs on the CPU — it is
    delivering data to the policed socket over loopback — must not be blamed on it (nor on
    anyone else): it is recorded with pid 0 and no process (issue 10, class 5b)."""
    import os
    import secrets
    import socket
    import time
    from ocihook import cgroup, events, session
    from ocihook.maps import compile_policy
    from ocihook.policy import load_policy_text
    lst = listener("127.0.0.1")
    path = cgroup.create(f"softirq-{secrets.token_hex(3)}")
    compiled = compile_policy(load_policy_text("version: 1\nname: softirq\ndefault: allow\n", "t"))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            cgroup.move_self(path)
            s = socket.create_connection(("127.0.0.1", lst.port), timeout=2)  # before the policy: no judged destination
            os.write(ready_w, b"1")
            os.read(go_r, 1)                                                # asleep while the data arrives
            s.close()
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        conn, _ = lst.sock.accept()
        att = session.apply(path, compiled)
        conn.sendall(b"x" * 4000)          # the policed socket ACKs this in softirq, on this task's CPU time
        time.sleep(0.5)
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        conn.close()
    finally:
        cgroup.remove(path)
    recs = events.to_records(session.release(att, compiled), compiled, "t")
    packets = [r for r in recs if r["kind"] == "packet"]
    assert packets, recs
    assert os.getpid() not in {r["pid"] for r in recs}
    ack = [r for r in packets if r["pid"] == 0]
    assert ack and ack[0]["comm"] == "" and ack[0]["cmdline"] is None and ack[0]["exe"] is None


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
