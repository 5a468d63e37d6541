"""cgroup v2 plumbing: find the mount, ids, a process's cgroup, transient cgroups, locks.

The mount is discovered from /proc/self/mountinfo (hybrid ``/sys/fs/cgroup/unified`` or
pure v2 ``/sys/fs/cgroup``), never assumed. Roots are injectable for tests.
"""

import errno
import fcntl
import os
import time

from .errors import SafedeployError


class CgroupError(SafedeployError):
    """A cgroup problem; str() is one line."""


def _unmangle(field: str) -> str:
    """A mountinfo field with the kernel's octal escapes (\\040 space, \\011 tab,
    \\012 newline, \\134 backslash) decoded."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _each_mount(mountinfo: str):
    with open(mountinfo) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split(" ")
            if len(fields) > 4:
                yield _unmangle(fields[4]), post.split(" ", 1)[0]


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount of this mount namespace, in mountinfo
    order, the kernel's escapes decoded. OSError when mountinfo cannot be read."""
    return list(_each_mount(mountinfo))


def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo", mounts=None) -> str:
    """The first cgroup2 mount point of this mount namespace (read up to it, no further), or
    of mounts (a list from mounts(), read once by a caller that needs both)."""
    try:
        found = next((point for point, fstype in (mounts if mounts is not None else _each_mount(mountinfo))
                      if fstype == "cgroup2"), None)
    except OSError as e:
        raise CgroupError(f"cannot read {mountinfo}: {e.strerror}") from None
    if found is None:
        raise CgroupError("no cgroup v2 hierarchy is mounted (need cgroup2 in /proc/self/mountinfo)")
    return found


def cgroup_id(path) -> int:
    """The kernel's cgroup id: the inode number of the cgroup directory."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise CgroupError(f"cgroup {path} does not exist") from None


def cgroup_of_pid(pid: int, proc: str = "/proc", mount=None) -> str:
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
            path = os.path.join(os.fspath(mount or cgroup2_mount()), rel.lstrip("/")).rstrip("/")
            if not os.path.isdir(path):
                raise CgroupError(f"cgroup {path} of process {pid} is gone")
            return path
    raise CgroupError(f"process {pid} is in no cgroup v2 (no '0::' line in {proc}/{pid}/cgroup)")


def create(name: str, parent=None) -> str:
    """Create a transient cgroup ``<mount>/safedeploy/<name>`` (parent created as needed)."""
    base = os.fspath(parent) if parent else os.path.join(cgroup2_mount(), "safedeploy")
    path = os.path.join(base, name)
    try:
        os.makedirs(base, exist_ok=True)
        os.mkdir(path)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}: {e.strerror}") from None
    return path


def procs(path) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def move_self(path) -> None:
    """Move the calling process into a cgroup (used between fork and exec)."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")


def run_in(path, fn, *args):
    """Call fn(*args) in a forked child that has joined cgroup `path`, and return its
    (pickled) result; what the child raises comes back as a RuntimeError with the child's
    traceback. For tests and benchmarks: real code in a real policed cgroup."""
    import pickle  # noqa: PLC0415 — not on the hook's path
    import signal  # noqa: PLC0415
    import traceback  # noqa: PLC0415
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                move_self(path)
                out = ("ok", fn(*args))
            except BaseException:  # noqa: BLE001 — everything goes back to the parent
                out = ("error", traceback.format_exc())
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"the child in cgroup {path} died without a result")
    status, value = pickle.loads(data)
    if status != "ok":
        raise RuntimeError(f"the child in cgroup {path} failed:\n{value}")
    return value


def remove(path, timeout: float = 5.0) -> None:
    """Kill whatever still runs in the cgroup tree and remove it, deepest first."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    deadline = time.monotonic() + timeout
    while True:
        live = False
        for sub, _, _ in os.walk(path, topdown=False):
            subp = sub
            pids = procs(subp)
            if pids:
                live = True
                kill = os.path.join(subp, "cgroup.kill")
                if os.path.exists(kill):
                    try:
                        with open(kill, "w") as f:
                            f.write("1")
                    except OSError:
                        pass  # emptied meanwhile
                else:
                    import signal  # noqa: PLC0415 — its enums cost the hook's hot path ~3 ms
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                continue
            try:
                os.rmdir(subp)
            except OSError as e:
                if e.errno not in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                    raise CgroupError(f"cannot remove cgroup {subp}: {e.strerror}") from None
                live = True
        if not live and not os.path.exists(path):
            return
        if time.monotonic() > deadline:
            raise CgroupError(f"cgroup {path} still busy after {timeout:.0f}s")
        time.sleep(0.01)


class locked:  # noqa: N801 — used like a function: `with locked(path):`
    """An exclusive flock held for the duration of the block (serialises parallel callers).
    lock_path may be a directory (e.g. on bpffs, where no regular file can be created)."""

    def __init__(self, lock_path):
        self.path = os.fspath(lock_path)
        self.fd = -1

    def __enter__(self) -> None:
        if os.path.isdir(self.path):
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
