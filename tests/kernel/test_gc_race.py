"""gc beside starting containers (issue 11 item 8), made deterministic: a container that
registers while gc is busy releasing a stale one (the slow part) keeps its policy, and
its events stay its own."""
from __future__ import annotations

import secrets
from pathlib import Path

from kutil import connect, run_in
from ocihook import cgroup, hook, install, report
from ocihook.compiler import compile_policy
from ocihook.pinned import PinnedMaps
from ocihook.policy import load_policy_text

COMPILED = compile_policy(load_policy_text("version: 1\nname: race\ndefault: allow\ndeny: ['127.0.0.2']\n", "t"))


def _register(name: str) -> tuple[str, dict]:
    path = cgroup.create(f"{name}-{secrets.token_hex(3)}")
    rec = hook.register_and_apply({"id": f"{name}{secrets.token_hex(3)}", "pid": 1, "compiled": COMPILED,
                                   "cgroup": path, "cgid": cgroup.cgroup_id(path), "attachment": None})
    return path, rec


def test_a_container_registered_while_gc_releases_a_stale_one_stays_policed(pins, monkeypatch):
    stale_path, stale = _register("stale")
    assert run_in(stale_path, connect, "127.0.0.2", 9) == "EPERM"
    cgroup.remove(stale_path)                        # its runtime died: no poststop
    born: list = []
    real_stop = hook.stop

    def slow_stop(state):                            # while gc releases the stale one ...
        if not born:
            born.append(_register("born"))           # ... a container starts
        return real_stop(state)

    monkeypatch.setattr(hook, "stop", slow_stop)
    try:
        install.gc(log=lambda *_: None)
        (path, rec), = born
        with PinnedMaps.open(pins) as maps:
            assert rec["cgid"] in maps.policed_cgroups(), "gc unpoliced a container that started meanwhile"
        assert run_in(path, connect, "127.0.0.2", 9) == "EPERM"
        assert not (Path(hook.settings.state_dir()) / f"{stale['id']}.json").exists()
        cgroup.remove(path)                          # the new container ends normally
        out = real_stop({"id": rec["id"]})
        assert report.load_summary(out)["blocked"] == 1          # its own attempt, in its own report
        assert report.load_summary(Path(hook.settings.log_dir()) / f"{stale['id']}.jsonl")["blocked"] == 1
    finally:
        for p, _r in born:
            cgroup.remove(p)


def test_gc_finishes_a_run_whose_safedeploy_process_was_killed(tmp_path):
    """`safedeploy run` SIGKILLed: its command finishes later in the still-policed cgroup;
    gc then writes the run's report and removes the empty cgroup. A live one is left alone."""
    import os
    import signal
    import subprocess
    import sys
    import time
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\nname: killed\ndefault: allow\ndeny: ['127.0.0.2']\n")
    out, go = tmp_path / "out", tmp_path / "go"     # the command connects once `go` exists: after its runner died
    code = (f"import os, socket, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "try:\n    socket.create_connection(('127.0.0.2', 9))\nexcept OSError as e:\n    print(e.errno, flush=True)\n")
    run = subprocess.Popen([sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--", "sh", "-c",
                            f"{sys.executable} -c \"{code}\" > {out}"], start_new_session=True)
    sdir = Path(hook.settings.state_dir())
    for _ in range(200):                             # its command runs (waiting for `go`) in its cgroup
        recs = [r for r in hook.state_records().values() if r.get("kind") == "run"]
        if recs and os.path.exists(recs[0]["cgroup"]) and cgroup.procs(recs[0]["cgroup"]):
            break
        time.sleep(0.05)
    (rec,) = recs
    os.kill(run.pid, signal.SIGKILL)                 # the runner dies; its command goes on
    run.wait()
    install.gc(log=lambda *_: None)                  # still running: untouched
    assert (sdir / f"{rec['id']}.json").exists()
    go.touch()
    for _ in range(100):
        if out.exists() and out.read_text().strip():
            break
        time.sleep(0.05)
    assert out.read_text().split() == ["1"]          # EPERM: still policed after its runner died
    for _ in range(200):                             # the command and its shell exit: the cgroup empties
        if not cgroup.procs(rec["cgroup"]):
            break
        time.sleep(0.01)
    install.gc(log=lambda *_: None)
    assert not (sdir / f"{rec['id']}.json").exists() and not Path(rec["cgroup"]).exists()
    assert report.load_summary(Path(hook.settings.log_dir()) / f"{rec['id']}.jsonl")["blocked"] == 1
