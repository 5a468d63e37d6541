"""Compiling and pinning: bpffs mounted on demand, parallel first users, partial pins."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from ocihook import loader


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_bpffs_is_mounted_when_absent_and_parallel_first_users_share_one_compile(tmp_path):
    root = tmp_path / "bpf" / "safedeploy"          # /tmp is not bpffs: safedeploy mounts one
    code = ("import sys; from ocihook import loader; p = loader.ensure_programs(loader.stderr_log); print(p)")
    env = [dict(os.environ, SAFEDEPLOY_BPFFS=str(root), SAFEDEPLOY_STATE_DIR=str(tmp_path / f"state{i}"))
           for i in range(3)]
    try:
        with ThreadPoolExecutor(3) as ex:
            results = list(ex.map(lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True,
                                                           text=True, timeout=120), env))
        for r in results:
            assert r.returncode == 0, r.stderr
        assert len({r.stdout for r in results}) == 1
        assert loader._bpffs_mounted(root)
        pins = sorted(p.name for p in root.iterdir())
        assert len(pins) == 1 and not pins[0].startswith("tmp_")    # one version, no leftovers
        compiles = sum(r.stderr.count("compiling BPF programs") for r in results)
        assert compiles == 1                                        # the others waited and reused it
    finally:
        _umount(tmp_path / "bpf")


def test_removed_pins_are_rebuilt_by_the_next_user(tmp_path, monkeypatch):
    root = tmp_path / "bpf" / "safedeploy"
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", str(root))
    try:
        first = loader.ensure_programs()
        os.unlink(os.path.join(first, "prog_sd_connect4"))   # someone removed a pin
        assert not loader.is_pinned(first)
        again = loader.ensure_programs()
        assert again == first and loader.is_pinned(again)
        shutil.rmtree(root)                          # or everything
        assert loader.is_pinned(loader.ensure_programs())
    finally:
        _umount(tmp_path / "bpf")
