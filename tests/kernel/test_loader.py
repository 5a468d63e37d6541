"""Compiling and pinning: bpffs only at /sys/fs/bpf, parallel first users, partial pins."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from ocihook import loader


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _own_bpffs(path):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)


def test_bpffs_elsewhere_is_refused_never_mounted_over_its_parent(tmp_path, monkeypatch):
    """SAFEDEPLOY_BPFFS on a path that is not on bpffs: a clear error, and the parent
    (here a directory with a file in it) is left alone."""
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "README").write_text("mine")
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", str(tmp_path / "checkout" / "safedeploy"))
    try:
        loader.ensure_bpffs()
    except loader.LoaderError as e:
        assert "is not on a bpf filesystem" in str(e) and "/sys/fs/bpf" in str(e)
    else:
        raise AssertionError("ensure_bpffs accepted a path off bpffs")
    assert not loader._bpffs_mounted(tmp_path / "checkout")
    assert (tmp_path / "checkout" / "README").read_text() == "mine"
    res = subprocess.run([sys.executable, "-m", "ocihook.cli", "install", "--hooks-dir", str(tmp_path / "h"),
                          "--hook-path", str(tmp_path / "hook")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("safedeploy: SAFEDEPLOY_BPFFS="), res.stderr
    assert (tmp_path / "checkout" / "README").read_text() == "mine"


def test_parallel_first_users_share_one_compile(tmp_path):
    root = tmp_path / "bpf" / "safedeploy"          # a bpffs of the test's own (only /sys/fs/bpf is mounted by us)
    _own_bpffs(tmp_path / "bpf")
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
    _own_bpffs(tmp_path / "bpf")
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
