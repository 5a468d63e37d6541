"""Test helpers shared by every test directory."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent


def require(ok: bool, why: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI=true: {why}", pytrace=False)
    pytest.skip(why)


def kernel_prereqs() -> None:
    require(os.geteuid() == 0, "needs root (CAP_BPF, CAP_SYS_ADMIN)")
    from ocihook import cgroup
    try:
        cgroup.cgroup2_mount()
    except cgroup.CgroupError as e:
        require(False, str(e))
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "bcc (python3-bpfcc) not importable")
    require((Path("/lib/modules") / platform.release() / "build" / "include").is_dir(),
            "kernel headers for bcc missing (run packaging/setup-host.sh)")


def runtime_prereqs(*tools: str) -> None:
    kernel_prereqs()
    for tool in tools:
        require(shutil.which(tool) is not None, f"{tool} not installed")


def start_watch(*args: str, env: dict | None = None):
    """`safedeploy watch ARGS` with stdout piped, returned once it says (on stderr) that its
    ring buffer is open: every event from then on reaches its output. No sleeping."""
    import subprocess
    import sys
    w = subprocess.Popen([sys.executable, "-m", "ocihook.cli", "watch", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    line = w.stderr.readline()
    if not line.startswith("safedeploy: watching "):
        w.kill()
        raise AssertionError(f"watch did not start: {line}{w.stderr.read()}")
    return w


def plain_bundle() -> str:
    """An OCI bundle directory whose config.json asks for nothing the hook refuses (runc
    spec's default capabilities, its own namespaces), for hook tests that feed a state by
    hand: the hook reads the bundle's capabilities and fails closed without one."""
    import json
    import tempfile
    path = Path(tempfile.gettempdir()) / "safedeploy-test-plain-bundle"
    path.mkdir(exist_ok=True)
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    cfg = {"ociVersion": "1.0.2", "process": {"capabilities": {k: caps for k in ("bounding", "effective", "permitted")}},
           "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")],
                     "maskedPaths": ["/proc/kcore"]},
           "mounts": [{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                       "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}]}
    tmp = path / f".config.json.{os.getpid()}"
    tmp.write_text(json.dumps(cfg))
    os.replace(tmp, path / "config.json")
    return str(path)
