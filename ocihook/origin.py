"""Where a container comes from: is it created from inside a policed cgroup (a deploy
script under `safedeploy run` running podman or runc)? docs/hook.md, "Containers started
by a policed deploy".

The state dir keeps ``cgids/<cgid>``, a symlink per policed cgroup to its state file, so
the hook's answer for an unannotated container costs one listdir when nothing is policed
and a few stat() calls otherwise. Warm path: no json, re or pathlib."""

import os

from . import cgroup, read_text, settings
from .errors import SafedeployError
from .jsonfast import loads


class OriginError(SafedeployError):
    """The origin is policed but unreadable; str() is one line."""


def cgid_index(cgid: int) -> str:
    """$STATE_DIR/cgids/<cgid>: a symlink to the state file of the run or container that
    polices that cgroup (one lstat tells the hook whether a cgroup is policed)."""
    return os.path.join(settings.state_dir(), "cgids", str(cgid))


def _policed_ancestor(path: str, mount: str) -> tuple[int, str] | None:
    """(cgid, state file) of the nearest policed cgroup at or above path (up to the mount)."""
    while True:
        try:
            cgid = os.stat(path).st_ino
        except OSError:
            return None
        link = cgid_index(cgid)
        if os.path.lexists(link):
            return cgid, link
        if path == mount or len(path) <= len(mount):
            return None
        path = os.path.dirname(path)


def _parent_pids(limit: int = 16) -> list[int]:
    """The hook's ancestors: the runtime, whoever started it, and so on up to pid 1."""
    out, pid = [], os.getppid()
    while pid > 1 and len(out) < limit:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def policed_origin(state: dict) -> dict | None:
    """Was this container created from inside a policed cgroup? Looks at the container's
    own cgroup (a runtime in a `safedeploy run` nests it there), the runtime's cgroup
    namespace root and the cgroups of the hook's ancestors (runc, conmon, podman, the
    deploy script). None, at the cost of one listdir, when nothing is policed."""
    try:
        if not os.listdir(os.path.join(settings.state_dir(), "cgids")):
            return None
    except OSError:
        return None
    try:
        mount = cgroup.cgroup2_mount()
    except cgroup.CgroupError:
        return None
    found = None
    pid = state.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            own = cgroup.cgroup_of_pid(pid, mount=mount)
            # strictly above: the container's own cgroup may still carry a policy of an
            # earlier container in it whose poststop has not run yet
            found = _policed_ancestor(os.path.dirname(own), mount) if own != mount else None
        except cgroup.CgroupError:
            pass
        if found:
            return _origin_record(found, nested=True)
    found = _policed_ancestor(mount, mount)  # a cgroup namespace (and cgroup2 view) rooted at a policed cgroup
    for ppid in _parent_pids() if not found else ():
        try:
            found = _policed_ancestor(cgroup.cgroup_of_pid(ppid, mount=mount), mount)
        except cgroup.CgroupError:
            continue
        if found:
            break
    return _origin_record(found, nested=False) if found else None


def policed_above(pid: int | str = "self") -> str | None:
    """The id of the run or container whose policed cgroup holds process pid (or is the
    root of the cgroup2 view this process sees), else None."""
    try:
        if not os.listdir(os.path.join(settings.state_dir(), "cgids")):
            return None
        mount = cgroup.cgroup2_mount()
        found = _policed_ancestor(mount, mount) or _policed_ancestor(
            cgroup.cgroup_of_pid(os.getpid() if pid == "self" else pid, mount=mount), mount)
    except (OSError, cgroup.CgroupError):
        return None
    return _origin_record(found, nested=True).get("id") if found else None


def _origin_record(found: tuple[int, str], nested: bool) -> dict:
    cgid, link = found
    try:
        rec = loads(read_text(link))
    except (OSError, ValueError) as e:
        raise OriginError(f"the container is created from policed cgroup {cgid}, whose state {link} is "
                        f"unreadable ({e.__class__.__name__}): refusing to start it unpoliced") from None
    return dict(rec, nested=nested)
