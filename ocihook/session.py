"""A policy's life on one cgroup: apply (maps + attach), release (detach, drain, clean).

Shared by ``safedeploy run`` and the OCI hook. All or nothing: a failure while applying
removes whatever was already written or attached.
"""

import os

from . import cgroup, loader
from .abi import SD_MAX_DEPTH
from .pinned import Drained, PinnedMaps


class Attachment:
    """What apply() did: which cgroup (and id) got which program version."""

    def __init__(self, cgroup, cgid: int, pin_dir):
        self.cgroup, self.cgid, self.pin_dir = os.fspath(cgroup), cgid, os.fspath(pin_dir)

    def to_dict(self) -> dict:
        return {"cgroup": self.cgroup, "cgid": self.cgid, "pin_dir": self.pin_dir}

    @classmethod
    def from_dict(cls, d: dict) -> "Attachment":
        return cls(d["cgroup"], int(d["cgid"]), d["pin_dir"])


def apply(cgroup_path, compiled: dict, log=None, pins=None, mount: str | None = None) -> Attachment:
    """Load a compiled policy (compiler.compile_policy) for cgroup_path and attach the shared
    programs (pinned at pins, by default those of loader.ensure_programs) to it. mount: the
    cgroup2 mount point, when the caller has it already."""
    cgroup_path = os.fspath(cgroup_path)
    mount = mount or cgroup.cgroup2_mount()
    depth = len([p for p in os.path.relpath(cgroup_path, mount).split("/") if p not in ("", ".")])
    if depth >= SD_MAX_DEPTH:
        raise cgroup.CgroupError(f"cgroup {cgroup_path} is {depth} levels deep: the programs look "
                                 f"{SD_MAX_DEPTH - 1} levels down at most; refusing to leave it unpoliced")
    pins = os.fspath(pins) if pins is not None else loader.ensure_programs(log)
    cgid = cgroup.cgroup_id(cgroup_path)
    att = Attachment(cgroup_path, cgid, pins)
    with PinnedMaps.open(pins) as maps, loader.Programs(pins) as progs:
        maps.load_policy(cgid, compiled)
        try:
            progs.attach(cgroup_path)
        except BaseException:
            maps.unload_policy(cgid, compiled)
            raise
    return att


def release(att: Attachment, compiled: dict | None = None, keep=None) -> Drained:
    """Detach (if the cgroup still exists), take the events, drop the cgroup's maps.
    keep(drained), when given, runs before anything is dropped: when it raises (a full disk
    where the records were to go), the kernel keeps them for the next release.
    Idempotent: releasing twice returns no events the second time."""
    if not os.path.exists(att.pin_dir):
        return Drained()
    with PinnedMaps.open(att.pin_dir) as maps:
        try:
            with loader.Programs(att.pin_dir) as progs:
                if os.path.exists(att.cgroup) and cgroup.cgroup_id(att.cgroup) == att.cgid:
                    progs.detach(att.cgroup)
        except loader.LoaderError:
            pass  # programs gone (an old version was removed): nothing left to detach
        out = maps.drain(att.cgid, delete=keep is None)
        if keep is not None:
            keep(out)
        maps.unload_policy(att.cgid, compiled)
        return out
