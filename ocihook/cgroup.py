"""cgroup v2 plumbing: find the mount, ids, a process's cgroup, transient cgroups, locks.

The mount is discovered from /proc/self/mountinfo (hybrid ``/sys/fs/cgroup/unified`` or
pure v2 ``/sys/fs/cgroup``), never assumed. Roots are injectable for tests.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import time
from pathlib import Path


class CgroupError(Exception):
    """A cgroup problem; str() is one line."""


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """The first cgroup2 mount point of this mount namespace."""
    try:
        with open(mountinfo) as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                if post.split(" ", 1)[0] == "cgroup2":
                    return Path(pre.split(" ")[4].replace("\\040", " "))
    except OSError as e:
        raise CgroupError(f"cannot read {mountinfo}: {e.strerror}") from None
    raise CgroupError("no cgroup v2 hierarchy is mounted (need cgroup2 in /proc/self/mountinfo)")


def cgroup_id(path: Path | str) -> int:
    """The kernel's cgroup id: the inode number of the cgroup directory."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise CgroupError(f"cgroup {path} does not exist") from None


def cgroup_of_pid(pid: int, proc: str = "/proc", mount: Path | None = None) -> Path:
    """The cgroup v2 directory of a process, from /proc/<pid>/cgroup (the ``0::`` line)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise CgroupError(f"process {pid} does not exist") from None
    except OSError as e:
        raise CgroupError(f"cannot read {proc}/{pid}/cgroup: {e.strerror}") from None
    for line in lines:
        if line.startswith("0::"):
            rel = line[3:].removesuffix(" (deleted)")
            path = (mount or cgroup2_mount()) / rel.lstrip("/")
            if not path.is_dir():
                raise CgroupError(f"cgroup {path} of process {pid} is gone")
            return path
    raise CgroupError(f"process {pid} is in no cgroup v2 (no '0::' line in {proc}/{pid}/cgroup)")


def create(name: str, parent: Path | None = None) -> Path:
    """Create a transient cgroup ``<mount>/safedeploy/<name>`` (parent created as needed)."""
    base = parent or (cgroup2_mount() / "safedeploy")
    try:
        base.mkdir(exist_ok=True)
        path = base / name
        path.mkdir()
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {base / name}: {e.strerror}") from None
    return path


def procs(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def move_self(path: Path) -> None:
    """Move the calling process into a cgroup (used between fork and exec)."""
    with open(path / "cgroup.procs", "w") as f:
        f.write("0")


def remove(path: Path, timeout: float = 5.0) -> None:
    """Kill whatever still runs in the cgroup tree and remove it, deepest first."""
    if not path.is_dir():
        return
    deadline = time.monotonic() + timeout
    while True:
        live = False
        for sub, _, _ in os.walk(path, topdown=False):
            subp = Path(sub)
            pids = procs(subp)
            if pids:
                live = True
                kill = subp / "cgroup.kill"
                if kill.exists():
                    with contextlib.suppress(OSError):
                        kill.write_text("1")
                else:
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                continue
            try:
                subp.rmdir()
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                    raise CgroupError(f"cannot remove cgroup {subp}: {e.strerror}") from None
                live = True
        if not live and not path.exists():
            return
        if time.monotonic() > deadline:
            raise CgroupError(f"cgroup {path} still busy after {timeout:.0f}s")
        time.sleep(0.01)


@contextlib.contextmanager
def locked(lock_path: Path):
    """An exclusive flock held for the duration of the block (serialises parallel callers).
    lock_path may be a directory (e.g. on bpffs, where no regular file can be created)."""
    if lock_path.is_dir():
        fd = os.open(lock_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
