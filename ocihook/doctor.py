"""``safedeploy doctor``: is this host able to enforce policies? Each check says why not."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

from . import cgroup, loader, settings

Check = tuple[str, bool, str, bool]  # name, ok, detail, required


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401, PLC0415
    except ImportError as e:
        return ("bcc", False, f"not importable ({e}); apt install python3-bpfcc and use a "
                "--system-site-packages venv", True)
    return ("bcc", True, f"bcc from {Path(bcc.__file__).parent}", True)


def _headers() -> Check:
    kdir = Path("/lib/modules") / platform.release()
    build = kdir / "build"
    if (build / "include").is_dir():
        return ("kernel headers", True, f"{build} -> {build.resolve()}", True)
    return ("kernel headers", False, f"{build} missing; apt install linux-headers-$(uname -r) "
            "(a custom kernel: packaging/setup-host.sh links Debian's linux-headers for bcc)", True)


def _cgroup2() -> Check:
    try:
        mnt = cgroup.cgroup2_mount()
    except cgroup.CgroupError as e:
        return ("cgroup v2", False, str(e), True)
    return ("cgroup v2", True, f"mounted at {mnt}", True)


def _bpffs() -> Check:
    root = Path(settings.bpffs_root())
    if loader._bpffs_mounted(root.parent):
        return ("bpffs", True, f"{root.parent} is a bpf filesystem", True)
    return ("bpffs", False, f"{root.parent} is not bpffs (safedeploy mounts it on first use)", False)


def _root() -> Check:
    if os.geteuid() == 0:
        return ("privileges", True, "root (CAP_BPF, CAP_SYS_ADMIN)", True)
    return ("privileges", False, "not root: loading programs and attaching to cgroups needs root", True)


def _capabilities() -> Check:
    caps = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    need = {"CAP_SYS_ADMIN": 21, "CAP_NET_ADMIN": 12, "CAP_PERFMON": 38, "CAP_BPF": 39}
    missing = [name for name, bit in need.items() if not caps >> bit & 1]
    if missing:
        return ("capabilities", False, f"missing {', '.join(missing)}", True)
    return ("capabilities", True, ", ".join(need), True)


def _hooks_d(hooks_dir: Path | None = None) -> Check:
    from .install import DEFAULT_HOOKS_DIR, HOOK_FILES, verify_chain  # noqa: PLC0415
    hooks_dir = Path(hooks_dir or DEFAULT_HOOKS_DIR)
    missing = [n for n in HOOK_FILES if not (hooks_dir / n).exists()]
    if missing:
        return ("hooks.d", False, f"{', '.join(missing)} not in {hooks_dir}: run `safedeploy install` "
                "(stock podman reads only /usr/share/containers/oci/hooks.d)", False)
    problems = verify_chain(hooks_dir)
    if problems:   # installed but broken: annotated containers are refused (or worse, unpoliced)
        return ("hooks.d", False, "; ".join(problems), True)
    return ("hooks.d", True, f"{hooks_dir}: entry -> launcher -> python -> ocihook.hook runs", False)


def _kernel() -> Check:
    rel = platform.release()
    ok = Path("/sys/kernel/btf/vmlinux").exists()
    return ("kernel", True, f"{rel}" + (", BTF" if ok else ", no BTF (reports lack the command lines of exited "
                                        "processes; DNS data sent by reference is not refused: docs/security.md)"), True)


def _tool(name: str, required: bool) -> Check:
    path = shutil.which(name)
    if not path:
        return (name, False, "not installed", required)
    try:
        ver = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        ver = "installed"
    return (name, True, f"{path}: {ver}", required)


def _programs() -> Check:
    pins = loader.pin_dir()
    if loader.is_pinned(pins):
        return ("programs", True, f"pinned at {pins} (warm start)", False)
    return ("programs", False, f"not pinned yet at {pins} (first use compiles them)", False)


def _name_service() -> Check:
    from . import nss  # noqa: PLC0415
    live = nss.live_sockets()
    if not live:
        return ("name service", True, "no nscd or systemd-resolved socket: glibc resolves over DNS, "
                "which the kernel sees", False)
    found = ", ".join(f"{daemon} at {path}" for daemon, path in live)
    return ("name service", True, f"{found}: `safedeploy run` hides them in its own mount namespace so "
            "lookups go out as DNS the kernel judges (containers have their own /run)", False)


def run_checks(hooks_dir: Path | None = None) -> list[Check]:
    return [_root(), _capabilities(), _kernel(), _cgroup2(), _bpffs(), _bcc(), _headers(), _programs(),
            _tool("runc", False), _tool("podman", False), _hooks_d(hooks_dir), _name_service()]
