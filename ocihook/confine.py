"""Keep ``safedeploy run``'s command in its cgroup: runs in the forked child before exec.

1. join the run's cgroup;
2. a new cgroup namespace rooted there (``/proc/self/cgroup`` shows ``0::/``) and a new
   mount namespace (slave: the host's mounts still arrive, the run's never leave) in which
   every cgroup2 mount is replaced by a fresh one, which shows only the run's own subtree:
   no ``cgroup.procs`` or cgroup directory outside it can be reached by path, so neither
   ``echo $$ > .../cgroup.procs`` nor ``clone3(CLONE_INTO_CGROUP)`` can leave;
   every bpf filesystem is unmounted there too (pinned programs and maps are opened by
   file permission alone: root without CAP_BPF could detach or rewrite them);
3. drop the dangerous capabilities (ocihook.caps.DANGEROUS) from the bounding, effective,
   permitted and inheritable sets and clear the ambient set, so the command cannot mount a
   cgroupfs again, setns() out, open the host's cgroupfs by handle, reach another process's
   root through /proc, detach or rewrite BPF programs and maps, or send raw frames.
   Root keeps everything else (chown, DAC override, setuid, kill, ...): apt and friends work.

docs/security.md ("Leaving the cgroup") explains each choice.
"""
from __future__ import annotations

import ctypes
import os

from . import caps
from .errors import SafedeployError

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_SLAVE = 0x2, 0x4, 0x8, 0x4000, 0x80000
MNT_DETACH = 2
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_V3 = 0x20080522


class ConfineError(SafedeployError):
    """The child could not be confined; str() is one line."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ConfineError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _mounts(fstype: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ", 1)[0] == fstype:
                out.append(pre.split(" ")[4].replace("\\040", " "))
    return out


def private_cgroup_view(hide_bpffs: bool = True) -> None:
    """New cgroup + mount namespaces; every cgroup2 mount replaced by one rooted at the
    current cgroup (call after joining it)."""
    c = _c()
    _check(c.unshare(CLONE_NEWCGROUP | CLONE_NEWNS), "unshare(cgroup, mount namespaces)")
    _check(c.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "making / a slave mount")
    targets = list(dict.fromkeys(_mounts("cgroup2")))
    for _ in range(8):  # stacked mounts: detach until none of the old ones is left
        old = [m for m in _mounts("cgroup2") if m in targets]
        if not old:
            break
        for m in reversed(old):
            _check(c.umount2(os.fsencode(m), MNT_DETACH), f"detaching cgroup2 at {m}")
    for m in targets:
        _check(c.mount(b"cgroup2", os.fsencode(m), b"cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
               f"mounting the run's own cgroup2 view at {m}")
    if hide_bpffs:
        # BPF_OBJ_GET and BPF_PROG_DETACH check file permissions, not capabilities: root
        # without CAP_BPF could still open the pinned programs and maps, detach the
        # programs from its own cgroup or rewrite its policy. No bpffs, no pins.
        for _ in range(8):
            found = _mounts("bpf")
            if not found:
                break
            for m in reversed(found):
                _check(c.umount2(os.fsencode(m), MNT_DETACH), f"hiding bpffs at {m}")


def drop_capabilities(names) -> None:
    """Remove names from the bounding set and from the effective, permitted and
    inheritable sets; clear the ambient set."""
    c = _c()
    nums = [caps.NUMBERS[n] for n in names]
    for n in nums:
        if c.prctl(PR_CAPBSET_DROP, n, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: kernel lacks it
            raise ConfineError(f"cannot drop {caps.NAMES[n]} from the bounding set: {os.strerror(ctypes.get_errno())}")
    c.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on kernels without ambient: nothing to clear
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    _check(c.capget(ctypes.byref(hdr), data), "capget")
    for n in nums:
        word, bit = divmod(n, 32)
        mask = ~(1 << bit) & 0xFFFFFFFF
        data[word].effective &= mask
        data[word].permitted &= mask
        data[word].inheritable &= mask
    _check(c.capset(ctypes.byref(hdr), data), "capset")


def confine(cgroup_path: str, drop: list[str], hide: list[str] = ()) -> None:
    """All of it, in the child between fork and exec (hide: paths to cover with /dev/null). Any failure is written to stderr as
    one safedeploy: line and raised (the command then never runs)."""
    try:
        with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
            f.write("0")
        private_cgroup_view(hide_bpffs="CAP_BPF" in drop and "CAP_SYS_ADMIN" in drop)
        if hide:  # name-service daemons' sockets (ocihook/nss.py): lookups go out as DNS instead
            from . import nss  # noqa: PLC0415
            nss.hide_sockets(list(hide))
        drop_capabilities(drop)
    except Exception as e:  # noqa: BLE001 — whatever it was, the command must not run
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or e.__class__.__name__
        os.write(2, f"safedeploy: cannot confine the command to {cgroup_path}: {msg}\n".encode())
        raise

