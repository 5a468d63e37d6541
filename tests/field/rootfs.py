"""A Debian bookworm rootfs (debootstrap minbase + real clients), built once per host and
cached under /var/cache/safedeploy-test, imported into podman as an image for the container leg.

    python3 tests/field/rootfs.py      # build (or reuse) it and print its path
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("SAFEDEPLOY_TEST_CACHE", "/var/cache/safedeploy-test"))
ROOTFS = CACHE / "debian-rootfs"
IMAGE = "localhost/safedeploy-field-debian:bookworm"
MIRROR = os.environ.get("SAFEDEPLOY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
INCLUDE = ["curl", "wget", "bind9-dnsutils", "bind9-host", "python3", "python3-requests", "git",
           "ca-certificates", "busybox", "python3-pip", "netbase"]
# bump when INCLUDE changes: a cached rootfs of another recipe is rebuilt
RECIPE = "1:" + ",".join(INCLUDE)


class RootfsError(Exception):
    pass


def build(log=lambda m: print(m, file=sys.stderr)) -> Path:
    """The cached rootfs, debootstrapped first if missing or of another recipe (under a lock,
    so parallel test runs build it once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = ROOTFS / ".safedeploy-recipe"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == RECIPE:
            return ROOTFS
        if not shutil.which("debootstrap"):
            raise RootfsError("debootstrap not installed (packaging/setup-host.sh installs it)")
        tmp = CACHE / "debian-rootfs.building"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"field: debootstrap bookworm into {tmp} (once; a few minutes)")
        res = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                              "bookworm", str(tmp), MIRROR], capture_output=True, text=True, timeout=1800)
        if res.returncode:
            raise RootfsError(f"debootstrap failed: {(res.stdout + res.stderr).strip()[-400:]}")
        subprocess.run(["chroot", str(tmp), "apt-get", "clean"], capture_output=True)
        (tmp / ".safedeploy-recipe").write_text(RECIPE)
        shutil.rmtree(ROOTFS, ignore_errors=True)
        tmp.rename(ROOTFS)
        (CACHE / "image-imported").unlink(missing_ok=True)
        return ROOTFS


def import_image(env: dict | None = None) -> str:
    """The rootfs as a podman image (re-imported when the rootfs was rebuilt or the image is gone)."""
    rootfs = build()
    have = subprocess.run(["podman", "image", "exists", IMAGE], env=env).returncode == 0
    marker = CACHE / "image-imported"
    if have and marker.exists() and marker.read_text() == RECIPE:
        return IMAGE
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tar = Path(tmp) / "rootfs.tar"
            with tarfile.open(tar, "w") as t:
                t.add(rootfs, arcname=".")
            res = subprocess.run(["podman", "import", str(tar), IMAGE], capture_output=True, text=True, env=env)
        if res.returncode:
            raise RootfsError(f"podman import failed: {res.stderr.strip()[:300]}")
        marker.write_text(RECIPE)
    return IMAGE


if __name__ == "__main__":
    print(build())
