"""Judge a container's OCI config (the bundle's config.json) before it is policed: what
would let it leave its cgroup or get around the programs is refused unless the policy
allows it (`capabilities:`, `privileged:`; docs/policy.md, docs/security.md).

Warm path: plain dicts from ocihook.jsonfast, no re, no json."""

import os

from . import caps, cgroup
from .jsonfast import loads


class Refused(Exception):
    """The container must not start; str() is one line (without the 'safedeploy:' prefix)."""


def read_config(bundle) -> dict:
    """The bundle's config.json; unreadable means refused (we cannot see what it may do)."""
    if not isinstance(bundle, str) or not bundle:
        raise Refused("OCI state has no bundle: cannot check the container's capabilities")
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            cfg = loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise Refused(f"cannot read {path} to check the container's capabilities "
                      f"({getattr(e, 'strerror', None) or e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise Refused(f"{path} is not a JSON object")
    return cfg


def capabilities_of(cfg: dict) -> set[str]:
    """Every capability in any of the process's sets (bounding, effective, permitted,
    inheritable, ambient)."""
    proc = cfg.get("process")
    sets = proc.get("capabilities") if isinstance(proc, dict) else None
    out: set[str] = set()
    if isinstance(sets, dict):
        for names in sets.values():
            if isinstance(names, list):
                out.update(str(n).upper() for n in names)
    return out


def host_cgroupns(cfg: dict) -> bool:
    """True when config.json asks for no cgroup namespace of its own (or joins one by path)."""
    linux = cfg.get("linux")
    nss = linux.get("namespaces") if isinstance(linux, dict) else None
    for ns in nss if isinstance(nss, list) else ():
        if isinstance(ns, dict) and ns.get("type") == "cgroup":
            return bool(ns.get("path"))
    return True


_FS_TYPES = ("cgroup", "cgroup2", "bpf")


def _fs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str]]:
    """(mount point, fs type) of every cgroup, cgroup2 and bpf filesystem here."""
    return [(point, fstype) for point, fstype in cgroup.mounts(mountinfo) if fstype in _FS_TYPES]


def risky_mounts(cfg: dict, host_mounts=None) -> list[str]:
    """Why each risky mount is risky: a writable cgroup filesystem (a process writes its
    pid into any cgroup.procs it can reach), or any view of a bpf filesystem (pinned
    programs are detached by file permission alone). host_mounts: cgroup.mounts() of the
    host, when the caller read them already."""
    host = _fs_mounts() if host_mounts is None else [(p, t) for p, t in host_mounts if t in _FS_TYPES]
    out = []
    mounts = cfg.get("mounts")
    for m in mounts if isinstance(mounts, list) else ():
        if not isinstance(m, dict):
            continue
        opts = [str(o) for o in m.get("options") or () if isinstance(m.get("options"), list)]
        mtype, dest, src = str(m.get("type") or ""), str(m.get("destination") or ""), str(m.get("source") or "")
        writable = "ro" not in opts
        if mtype in ("cgroup", "cgroup2") and writable:
            out.append(f"mounts a writable cgroup filesystem at {dest}")
            continue
        if mtype == "bpf":
            out.append(f"mounts a bpf filesystem at {dest}")
            continue
        if "bind" not in opts and "rbind" not in opts and mtype != "bind":
            continue
        src = src.rstrip("/") or "/"
        for point, fstype in host:
            inside = point == src or point.startswith(src.rstrip("/") + "/")  # src is it, or above it
            below = src.startswith(point.rstrip("/") + "/")
            if not (inside or below):
                continue
            if fstype == "bpf":
                out.append(f"bind-mounts {src} (the bpf filesystem {point}) at {dest}")
                break
            # ro on a recursive bind of an ancestor leaves the submounts writable (runc < 1.3)
            if writable or (inside and point != src and "rbind" in opts):
                out.append(f"bind-mounts {src} (the cgroup filesystem {point}) writable at {dest}")
                break
    return out


def judge(cfg: dict, compiled: dict, cid: str, host_mounts=None) -> dict:
    """Refuse (raise Refused naming the first problem) unless the policy allows it; else
    what was allowed, for the state record and the report's summary line."""
    have = capabilities_of(cfg)
    privileged = bool(compiled.get("privileged"))
    allowed = list(compiled.get("capabilities") or ())
    name = compiled.get("name", "?")
    host_ns = host_cgroupns(cfg)
    if not privileged:
        bad = caps.dangerous_in(have, allowed)
        if bad:
            cap = bad[0]
            linux = cfg.get("linux") if isinstance(cfg.get("linux"), dict) else {}
            if len(have) >= len(caps.NUMBERS) - 3 or (cap == "CAP_SYS_ADMIN" and not linux.get("maskedPaths")):
                what = f"is privileged (--privileged: every capability, {cap} among them)"
                fix = "privileged: true"
            else:
                what = f"has {cap}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                fix = f"capabilities: [{cap[4:]}]"
            raise Refused(f"container {cid} {what}: refused, {cap} {caps.DANGEROUS[cap]}; policy {name!r} "
                          f"allows it only with '{fix}' (docs/security.md)")
        risky = risky_mounts(cfg, host_mounts)
        if risky:
            raise Refused(f"container {cid} {risky[0]}: refused, it could leave its cgroup or detach the "
                          f"programs; policy {name!r} allows it only with 'privileged: true' (docs/security.md)")
    return {"capabilities_allowed": caps.dangerous_in(have) if privileged else [c for c in allowed if c in have],
            "privileged": privileged, "cgroupns": "host" if host_ns else "private"}
