"""Helpers for real runc/podman tests (rootfs, bundles and images come from ocihook.demo)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ocihook.demo import import_image, make_bundle, make_rootfs  # noqa: F401 — re-exported for tests

IMAGE = "localhost/safedeploy-test-busybox:latest"


def runc_run(bundle: Path, cid: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, text=True,
                          timeout=timeout)


def podman(*args: str, conf: Path, hooks_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    return subprocess.run(["podman", "--runtime", "runc", "--hooks-dir", str(hooks_dir), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def containers_conf(path: Path) -> Path:
    path.write_text("[containers]\ndefault_ulimits = []\n")
    return path
