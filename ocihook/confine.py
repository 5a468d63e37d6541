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

Before 3, with CAP_SYS_ADMIN among the dropped: safedeploy's own files (state dir, policy dir,
log dir, its code: :func:`protected_paths`) are bind-mounted onto themselves read-only in the
run's mount namespace, so a root command cannot rewrite the policies the hook trusts for later
containers (policy-cache), nor the code it runs; without CAP_SYS_ADMIN it cannot remount them.
The parent, outside the namespace, still writes the report.

docs/security.md ("Leaving the cgroup") explains each choice.
"""
from __future__ import annotations

import ctypes
import errno
import os

from . import caps, cgroup
from .errors import SafedeployError

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_SLAVE = 0x1, 0x2, 0x4, 0x8, 0x4000, 0x80000
MS_REMOUNT, MS_BIND = 0x20, 0x1000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
_KEEP = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
         (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))
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


def _mounts(fstype: str | None = None) -> list[str]:
    """Mount points (of fstype, or all), in mountinfo order."""
    return [point for point, t in cgroup.mounts() if fstype is None or t == fstype]


def protected_paths() -> list[str]:
    """What a run may not write (called in the parent): safedeploy's state dir (policy-cache,
    the program version, cgids, spool), policy dir, log dir (the parent writes the report)
    and code. From a checkout the code is the directory that holds ``ocihook/`` and ``bpf/``
    (the hook launcher puts it first on sys.path); installed, the package directory (its
    ``data/bpf`` included), not the shared site-packages around it, which apt/pip in a run
    must still be able to write; plus SAFEDEPLOY_BPF_SRC if set elsewhere."""
    from . import resources, settings  # noqa: PLC0415
    code = resources.PKG_DIR if resources.installed() else resources.PKG_ROOT
    return list(dict.fromkeys([settings.state_dir(), settings.policy_dir(), settings.log_dir(), code,
                               resources.PKG_DIR, resources.BPF_DIR]))


def make_readonly(paths) -> None:
    """Bind each existing path (and every mount below it) onto itself and remount it read-only,
    keeping its nosuid/nodev/noexec/atime flags; a missing path is skipped, any failure raises
    ConfineError. Only this (slave) mount namespace sees the read-only views."""
    c = _c()
    done: list[str] = []
    for p in sorted({os.path.realpath(p) for p in paths if p and os.path.lexists(p)}):
        if any(p == d or p.startswith(d.rstrip("/") + "/") for d in done):
            continue  # already inside a protected tree
        _check(c.mount(os.fsencode(p), os.fsencode(p), None, MS_BIND | MS_REC, None), f"binding {p}")
        below = [m for m in dict.fromkeys(_mounts()) if m == p or m.startswith(p.rstrip("/") + "/")]
        for m in [p, *(m for m in below if m != p)]:
            try:
                have = os.statvfs(m).f_flag
            except OSError as e:
                raise ConfineError(f"making {m} read-only: {e.strerror}") from None
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY
            for st, ms in _KEEP:
                if have & st:
                    flags |= ms
            _check(c.mount(None, os.fsencode(m), None, flags, None), f"making {m} read-only")
        if not os.statvfs(p).f_flag & os.ST_RDONLY:
            raise ConfineError(f"{p} is still writable after its read-only remount")
        done.append(p)


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


# -- no new user namespaces (seccomp) ---------------------------------------------------
# A user namespace needs no capability to make, and gives its creator every capability over
# the namespaces it then makes: CAP_NET_RAW over a network namespace of its own is enough to
# inject a forged DNS answer there (AF_PACKET), which the cgroup's programs would learn from
# (found by an attacker). So a run whose capabilities are dropped cannot make one: unshare(2)
# and clone(2) with CLONE_NEWUSER fail with EPERM, clone3(2) (whose flags a filter cannot
# read) with ENOSYS, which makes glibc fall back to clone(2); x32 system calls with ENOSYS.
CLONE_NEWUSER = 0x10000000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
# audit arch -> (unshare, clone, clone3, x32 bit or 0)
_USERNS_CALLS = {0xC000003E: (272, 56, 435, 0x40000000),   # x86_64
                 0x40000003: (310, 120, 435, 0),            # i386 (compat, int 0x80)
                 0xC00000B7: (97, 220, 435, 0)}             # aarch64


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def userns_filter() -> list[tuple[int, int, int, int]]:
    """The classic BPF program: (code, jt, jf, k) each. Reads struct seccomp_data: nr at 0,
    arch at 4, the first argument's low 32 bits at 16 (little-endian)."""
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    enosys, eperm = _RET_ERRNO | errno.ENOSYS, _RET_ERRNO | errno.EPERM
    prog: list[tuple[int, int, int, int]] = [(ld, 0, 0, 4)]
    for arch, (unshare_nr, clone_nr, clone3_nr, x32) in _USERNS_CALLS.items():
        body = [(ld, 0, 0, 0)]
        if x32:
            body += [(jset, 0, 1, x32), (ret, 0, 0, enosys)]
        body += [(jeq, 0, 1, clone3_nr), (ret, 0, 0, enosys),
                 (jeq, 1, 0, unshare_nr), (jeq, 0, 3, clone_nr),
                 (ld, 0, 0, 16), (jset, 0, 1, CLONE_NEWUSER), (ret, 0, 0, eperm),
                 (ret, 0, 0, _RET_ALLOW)]
        prog += [(jeq, 0, len(body), arch)] + body
    prog.append((ret, 0, 0, _RET_ALLOW))
    return prog


def forbid_user_namespaces() -> None:
    """Install userns_filter() for this process and what it runs (needs CAP_SYS_ADMIN, or
    no_new_privs, which would break setuid programs: call it before dropping capabilities)."""
    prog = userns_filter()
    arr = (_SockFilter * len(prog))(*(_SockFilter(*ins) for ins in prog))
    fprog = _SockFprog(len(prog), arr)
    _check(_c().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def confine(cgroup_path: str, drop: list[str], hide: list[str] = (), readonly: list[str] = ()) -> None:
    """All of it, in the child between fork and exec (hide: paths to cover with /dev/null;
    readonly: paths to make read-only, when CAP_SYS_ADMIN is dropped: a command keeping it
    could simply unmount them, and a podman it runs needs the hook's state dir writable).
    Any failure is written to stderr as one safedeploy: line and raised (the command then
    never runs)."""
    try:
        with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as f:
            f.write("0")
        private_cgroup_view(hide_bpffs="CAP_BPF" in drop and "CAP_SYS_ADMIN" in drop)
        if hide:  # name-service daemons' sockets (ocihook/nss.py): lookups go out as DNS instead
            from . import nss  # noqa: PLC0415
            nss.hide_sockets(list(hide))
        if readonly and "CAP_SYS_ADMIN" in drop:
            make_readonly(readonly)
        if drop:
            forbid_user_namespaces()
        drop_capabilities(drop)
    except Exception as e:  # noqa: BLE001 — whatever it was, the command must not run
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or e.__class__.__name__
        os.write(2, f"safedeploy: cannot confine the command to {cgroup_path}: {msg}\n".encode())
        raise

