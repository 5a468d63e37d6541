"""Helpers for real runc/podman tests (rootfs, bundles and images come from ocihook.demo)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ocihook.demo import CONTAINERS_CONF, import_image, make_bundle, make_rootfs  # noqa: F401 — re-exported

IMAGE = "localhost/safedeploy-test-busybox:latest"


def runc_run(bundle: Path, cid: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, text=True,
                          timeout=timeout)


def podman(*args: str, conf: Path, hooks_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    return subprocess.run(["podman", "--runtime", "runc", "--hooks-dir", str(hooks_dir), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def wait_poststop(log_dir: Path, state_dir: Path, pattern: str = "*", timeout: float = 20) -> list[Path]:
    """The hook's poststop drains in the background: wait for its reports to appear and
    for the matching state files to go. Returns the reports."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        reports = sorted(Path(log_dir).glob(f"{pattern}.jsonl"))
        if reports and not list(Path(state_dir).glob(f"{pattern}.json")):
            return reports
        if time.monotonic() > deadline:
            return reports
        time.sleep(0.05)


def containers_conf(path: Path) -> Path:
    path.write_text(CONTAINERS_CONF)
    return path
