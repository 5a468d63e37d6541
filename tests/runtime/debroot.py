"""A fresh Debian bookworm root for package tests: debootstrap once into a cached tarball
(/var/cache/safedeploy-test/deb-install, override with SAFEDEPLOY_TEST_CACHE), unpacked per test; apt's
downloads are cached beside it. Everything that mounts runs inside one private mount
namespace (a holder process) so nothing propagates to the host."""
from __future__ import annotations

import fcntl
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("SAFEDEPLOY_TEST_CACHE", "/var/cache/safedeploy-test")) / "deb-install"
SUITE = "bookworm"
MIRROR = os.environ.get("SAFEDEPLOY_TEST_MIRROR", "http://deb.debian.org/debian")
BASE = CACHE / f"{SUITE}-minbase.tar"


def _sh(cmd: list[str], timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode:
        raise AssertionError(f"{' '.join(cmd[:6])}... failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def base_tarball() -> Path:
    """The cached debootstrap (minbase + apt lists); built once, under a lock."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if BASE.exists():
            return BASE
        work = CACHE / f"{SUITE}.build"
        remove_root(work)
        _sh(["debootstrap", "--variant=minbase", f"--cache-dir={archives()}", SUITE, str(work), MIRROR])
        (work / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
        ns = Namespace(work)
        try:
            ns.chroot("apt-get", "update", "-q")
        finally:
            ns.close()
        _sh(["tar", "-C", str(work), "-cf", f"{BASE}.tmp", "."])
        os.replace(f"{BASE}.tmp", BASE)
        remove_root(work)
        return BASE


def archives() -> Path:
    path = CACHE / "apt-archives"
    (path / "partial").mkdir(parents=True, exist_ok=True)
    return path


def fresh_root(dest: Path) -> Path:
    dest.mkdir(parents=True)
    _sh(["tar", "-C", str(dest), "-xf", str(base_tarball())])
    return dest


class Namespace:
    """A private mount namespace, held by a sleeping process, with ``root`` prepared for
    chroot: /proc, /sys (its own bpffs: pins never touch the host's), /dev, resolv.conf,
    the host's kernel headers for bcc (read-only), podman's storage (the bundles a hook
    reads, at the paths the runtime passes) and the apt download cache."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
                                       start_new_session=True)
        for _ in range(250):
            try:
                if os.readlink(f"/proc/{self.holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:   # never mount anything into the host's namespace
            self.close()
            raise AssertionError("unshare --mount did not give a private mount namespace")
        r = str(self.root)
        rel = platform.release()
        script = f"""set -e
mount -t proc proc {r}/proc
mount --rbind /sys {r}/sys
mount -t bpf bpf {r}/sys/fs/bpf
mount --rbind /dev {r}/dev
mkdir -p {r}/lib/modules/{rel} {r}/usr/src {r}/var/cache/apt/archives
mount --bind -o ro /lib/modules/{rel} {r}/lib/modules/{rel}
mount --bind -o ro /usr/src {r}/usr/src
mount --bind {archives()} {r}/var/cache/apt/archives
if [ -d /var/lib/containers ]; then   # podman's bundles: the hook reads their config.json
    mkdir -p {r}/var/lib/containers && mount --rbind /var/lib/containers {r}/var/lib/containers
fi
cp /etc/resolv.conf {r}/etc/resolv.conf 2>/dev/null || true
"""
        self.run("sh", "-c", script)

    def cmd(self, *args: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *args]

    def run(self, *args: str, check: bool = True, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout, **kw)
        if check and res.returncode:
            raise AssertionError(f"{' '.join(args)[:200]} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    def chroot(self, *args: str, check: bool = True, timeout: float = 1800, env: dict | None = None):
        base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        return self.run("chroot", str(self.root), *args, check=check, timeout=timeout, env={**base, **(env or {})})

    def close(self) -> None:
        os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()


def remove_root(root: Path) -> None:
    """rm -rf the root, unless something is mounted below it in this namespace (then the
    mounts leaked out of the private namespace: leave it, never recurse into /sys or /var)."""
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f]
    if any(m == str(root) or m.startswith(f"{root}/") for m in mounted):
        raise AssertionError(f"mounts below {root} in the test's own namespace: not removing it")
    shutil.rmtree(root, ignore_errors=True)
