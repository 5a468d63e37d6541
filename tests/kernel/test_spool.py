"""A full log directory never loses a report (issue 11 item 5): the kernel's records are
spooled in the state dir before the report is written; when the write fails (ENOSPC on
a real, tiny tmpfs), the spool and the state file stay, and a later poststop or gc writes
the full report."""
from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import plain_bundle
from kutil import connect, run_in
from ocihook import cgroup, report
from ocihook.pinned import PinnedMaps

CLI = [sys.executable, "-m", "ocihook.cli"]
POLICY = "version: 1\nname: full\ndefault: allow\ndeny: ['127.0.0.2']\n"


@pytest.fixture
def full_log_dir(tmp_path, monkeypatch):
    log = tmp_path / "log"
    log.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(log)], check=True)
    filler = log / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC
    monkeypatch.setenv("SAFEDEPLOY_LOG_DIR", str(log))
    yield log, filler
    subprocess.run(["umount", "-l", str(log)], check=False)


def _state_dir() -> Path:
    return Path(os.environ["SAFEDEPLOY_STATE_DIR"])


def test_run_with_a_full_log_dir_keeps_its_records_until_gc_writes_them(tmp_path, full_log_dir, pins):
    log, filler = full_log_dir
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    code = "import socket\nfor _ in range(3):\n    s = socket.socket()\n    try: s.connect(('127.0.0.2', 9))\n    except OSError as e: print(e.errno)\n"
    res = subprocess.run([*CLI, "run", "--policy", str(pol), "--", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["1", "1", "1"]               # blocked (EPERM) three times
    assert res.returncode == 1 and "safedeploy: cannot write report" in res.stderr, res.stderr
    assert "No space left on device" in res.stderr and "until 'safedeploy gc' can write it" in res.stderr
    (state,) = _state_dir().glob("run-*.json")
    rec = json.loads(state.read_text())                        # the kernel's entries are gone ...
    with PinnedMaps.open(rec["attachment"]["pin_dir"]) as maps:
        assert maps.entries_of(rec["cgid"]) == 0
    spool = _state_dir() / "spool" / f"{rec['id']}.jsonl"
    assert json.loads(spool.read_text())["records"][0]["count"] == 3   # ... because they are here
    assert not list(log.glob("run-*"))                         # no half-written report or temp file
    res = subprocess.run([*CLI, "gc"], capture_output=True, text=True, timeout=60)   # still full
    assert "cannot write report" in res.stdout and spool.exists()
    filler.unlink()
    res = subprocess.run([*CLI, "gc"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and f"released {rec['id']}" in res.stdout, res.stdout + res.stderr
    recs = report.load(log / f"{rec['id']}.jsonl")
    assert [(r["verdict"], r["dst_ip"], r["count"]) for r in recs] == [("blocked", "127.0.0.2", 3)]
    assert report.load_summary(log / f"{rec['id']}.jsonl")["blocked"] == 3
    assert not state.exists() and not spool.exists()


def test_poststop_with_a_full_log_dir_then_poststop_again_writes_the_full_report(full_log_dir, pins):
    log, filler = full_log_dir
    path = Path(cgroup.create(f"spool-{secrets.token_hex(3)}"))
    child = subprocess.Popen(["sleep", "60"])
    cid = f"spool{secrets.token_hex(3)}"
    hook = [sys.executable, "-m", "ocihook.hook"]
    try:
        (path / "cgroup.procs").write_text(str(child.pid))
        st = {"id": cid, "pid": child.pid, "status": "creating", "bundle": plain_bundle(),
              "annotations": {"safedeploy.policy": json.dumps({"version": 1, "name": "full", "default": "allow",
                                                                "deny": ["127.0.0.2"]})}}
        res = subprocess.run([*hook, "prestart"], input=json.dumps(st).encode(), capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert run_in(path, connect, "127.0.0.2", 9) == "EPERM"
    finally:
        child.kill()
        child.wait()
        cgroup.remove(path)
    stop = json.dumps({"id": cid, "status": "stopped"}).encode()
    res = subprocess.run([*hook, "poststop"], input=stop, capture_output=True, timeout=60)
    assert b"safedeploy: cannot write report" in res.stderr
    assert (_state_dir() / f"{cid}.json").exists() and (_state_dir() / "spool" / f"{cid}.jsonl").exists()
    filler.unlink()
    res = subprocess.run([*hook, "poststop"], input=stop, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    recs = report.load(log / f"{cid}.jsonl")
    assert [(r["verdict"], r["dst_ip"], r["count"]) for r in recs] == [("blocked", "127.0.0.2", 1)]
    assert not (_state_dir() / f"{cid}.json").exists()


def test_a_full_state_dir_leaves_the_records_in_the_kernel_until_gc(tmp_path, monkeypatch, pins):
    """Not even the spool fits: nothing is dropped from the kernel until it is on disk."""
    state = tmp_path / "fullstate"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state)], check=True)
    try:
        monkeypatch.setenv("SAFEDEPLOY_STATE_DIR", str(state))
        pol = tmp_path / "p.yaml"
        pol.write_text(POLICY)
        code = "import socket\nfor _ in range(3):\n    s = socket.socket()\n    try: s.connect(('127.0.0.2', 9))\n    except OSError as e: print(e.errno)\n"
        filler = state / "filler"

        # fill the state dir (from here: a run cannot write it) while the command runs, after
        # the run's own state file is written; the command waits for that
        ready, go = tmp_path / "ready", tmp_path / "go"
        script = code + (f"import os, time\nopen({str(ready)!r}, 'w').close()\n"
                         f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n")
        proc = subprocess.Popen([*CLI, "run", "--policy", str(pol), "--", sys.executable, "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(3000):
                if ready.exists() or proc.poll() is not None:
                    break
                time.sleep(0.01)
            try:
                filler.write_bytes(b"x" * (1 << 20))
            except OSError:
                pass  # full: what the test wants
            go.touch()
            out, errs = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert out.split() == ["1", "1", "1"] and proc.returncode == 1, errs
        (rec_path,) = state.glob("run-*.json")
        rec = json.loads(rec_path.read_text())
        with PinnedMaps.open(rec["attachment"]["pin_dir"]) as maps:
            assert maps.counters(rec["cgid"])["blocked"] == 3          # still in the kernel
        filler.unlink()
        res = subprocess.run([*CLI, "gc"], capture_output=True, text=True, timeout=60)
        assert f"released {rec['id']}" in res.stdout, res.stdout + res.stderr
        out = Path(os.environ["SAFEDEPLOY_LOG_DIR"]) / f"{rec['id']}.jsonl"
        assert [(r["verdict"], r["count"]) for r in report.load(out)] == [("blocked", 3)]
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
