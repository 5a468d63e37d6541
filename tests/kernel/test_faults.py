"""Faults: the hook SIGKILLed at every bpf(2) call, full maps. Nothing half-open, nothing leaked."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import plain_bundle, require
from ocihook import cgroup, install, loader
from ocihook import bpfsys
from ocihook.pinned import SPARES_MAX, U64, PinnedMaps, SdCgroup

POLICY = '{"version": 1, "name": "faults", "default": "allow", "deny": ["127.0.0.2", "auth.internal"]}'
BUNDLE = plain_bundle()
HOOK = [sys.executable, "-m", "ocihook.hook", "prestart"]


def _state(cid, pid):
    return json.dumps({"id": cid, "pid": pid, "status": "creating", "bundle": BUNDLE,
                       "annotations": {"safedeploy.policy": POLICY}}).encode()


def _container():
    path = Path(cgroup.create(f"fault-{secrets.token_hex(4)}"))
    sleeper = subprocess.Popen(["sleep", "60"])
    (path / "cgroup.procs").write_text(str(sleeper.pid))
    return path, sleeper


def _pool(pins, spare: bool) -> None:
    """Spare table sets ready (the fast start) or none (the start makes its own set)."""
    with PinnedMaps.open(pins) as maps:
        maps.prime_spares() if spare else maps.drop_spares()


@pytest.mark.parametrize("spare", [True, False], ids=["spare-tables", "no-spare-tables"])
def test_hook_killed_at_every_bpf_call_leaves_nothing_that_gc_cannot_clean(pins, tmp_path, monkeypatch, spare):
    require(shutil.which("strace") is not None, "strace not installed (fault injection)")
    monkeypatch.setenv("SAFEDEPLOY_SERIAL_BPF", "1")      # strace (no -f: not the refuser the hook starts)
                                                          # follows one thread: keep the calls on it
    path, sleeper = _container()
    try:                                                    # a clean run: fills the policy cache,
        trace = tmp_path / "trace"                          # and counts the bpf(2) calls
        _pool(pins, spare)
        res = subprocess.run(["strace", "-qq", "-e", "trace=bpf", "-o", str(trace), *HOOK],
                             input=_state("count", sleeper.pid), capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr
        calls = sum(1 for line in trace.read_text().splitlines() if "bpf(" in line)
        assert calls > 10
        subprocess.run([sys.executable, "-m", "ocihook.hook", "poststop"], input=b'{"id": "count"}', check=True)
    finally:
        sleeper.kill()
        sleeper.wait()
        cgroup.remove(path)
    sdir = Path(os.environ["SAFEDEPLOY_STATE_DIR"])
    for n in range(1, calls + 1):
        path, sleeper = _container()
        cgid = cgroup.cgroup_id(path)
        cid = f"kill{n}"
        try:
            _pool(pins, spare)
            res = subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e", "trace=bpf",
                                  "-e", f"inject=bpf:signal=KILL:when={n}", *HOOK],
                                 input=_state(cid, sleeper.pid), capture_output=True, timeout=60)
            assert res.returncode != 0, f"bpf call {n}: the hook was not killed"   # the runtime refuses
        finally:
            sleeper.kill()
            sleeper.wait()
            cgroup.remove(path)                             # the runtime removes the container
        install.gc(log=lambda *_: None)
        assert not (sdir / f"{cid}.json").exists(), f"killed at bpf call {n}: state left"
        with PinnedMaps.open(pins) as maps:
            assert maps.entries_of(cgid) == 0, f"killed at bpf call {n}: map entries left"
            assert maps.stray_tables() == set(), f"killed at bpf call {n}: a table set nobody owns"
    _pool(pins, True)


def test_full_policy_map_fails_closed_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", f"/sys/fs/bpf/sdtest{secrets.token_hex(4)}")
    pins = loader.ensure_programs()
    try:
        with PinnedMaps.open(pins) as maps:
            cap = maps.fill()["cgroups"][1]
            for i in range(cap):                            # every policed-cgroup slot taken
                bpfsys.map_update(maps.fds["cgroups"], U64(2**62 + i), SdCgroup(dflt=1))
        pol = tmp_path / "p.yaml"
        pol.write_text("version: 1\nname: full\ndefault: allow\nallow: ['127.0.0.1']\n")
        marker = tmp_path / "ran"
        res = subprocess.run([sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--",
                              "touch", str(marker)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and not marker.exists()
        assert res.stderr.strip() == "safedeploy: policy map cgroups is full: too many policed cgroups"
        with PinnedMaps.open(pins) as maps:
            assert sum(1 for k in maps.policed_cgroups() if k < 2**62) == 0   # nothing half-loaded
            assert maps.stray_tables() == set()                 # no maps of its own: only spares
            assert 0 < len(maps.spares()) <= SPARES_MAX
    finally:
        shutil.rmtree(os.path.dirname(pins), ignore_errors=True)
