"""Helpers for real runc/podman tests: a busybox rootfs from busybox-static, bundles, podman."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "nc", "echo", "cat", "sleep", "touch", "ls", "true", "wget")
IMAGE = "localhost/safedeploy-test-busybox:latest"


def make_rootfs(dest: Path) -> Path:
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        link = dest / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (dest / d).mkdir(exist_ok=True)
    return dest


def rootfs_tar(rootfs: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        tar.add(rootfs, arcname=".")
    return out


def make_bundle(bundle: Path, rootfs: Path, script: str, *, annotations: dict | None = None,
                hook_path: Path | None = None, hook_env: list[str] | None = None,
                stages=("prestart", "poststop")) -> Path:
    """A runc bundle sharing the host network (loopback listeners are reachable)."""
    bundle.mkdir(parents=True, exist_ok=True)
    if not (bundle / "rootfs").exists():
        shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sh", "-c", script]
    cfg["root"]["readonly"] = False
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
    if annotations:
        cfg["annotations"] = annotations
    if hook_path:
        entry = {"path": str(hook_path), "env": hook_env or []}
        cfg["hooks"] = {st: [dict(entry, args=["safedeploy-hook", st])] for st in stages}
    (bundle / "config.json").write_text(json.dumps(cfg, indent=1))
    return bundle


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
