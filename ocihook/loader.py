"""Compile (bcc, once), pin, open and attach safedeploy's BPF programs.

Cold path: :func:`ensure_programs` compiles ``bpf/*.c`` with bcc and pins every program
and map under ``$SAFEDEPLOY_BPFFS/<source-hash>/``. Warm path: the pins exist, so
:class:`Programs` opens them with plain bpf(2) calls — bcc is imported only to compile.
"""

import errno
import os
import sys
import time

from . import bpfsys, cgroup, enable_site_packages, read_text, settings, sha256_hex, write_atomic
from .errors import SafedeployError
from .pinned import PinnedMaps, pin_names
from .resources import BPF_DIR  # the checkout's bpf/, or the installed package data
from .abi import SD_ETAIL_QUERY, SD_ETAIL_VERDICT, SD_TAIL_ANSWERS, SD_TAIL_BEGIN, SD_TAIL_LEARN, SD_TAIL_RX, SD_TAIL_STORE

# bcc program type numbers (enum bpf_prog_type)
PROG_CGROUP_SKB = 8
PROG_CGROUP_SOCK = 9
PROG_CGROUP_SOCK_ADDR = 18
PROG_SOCK_OPS = 13
PROG_SK_MSG = 16
PROG_CGROUP_SOCKOPT = 25

# (function in bpf/*.c, program type, attach type)
PROGRAMS: tuple[tuple[str, int, int], ...] = (
    ("sd_connect4", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT),
    ("sd_connect6", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT),
    ("sd_sendmsg4", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP4_SENDMSG),
    ("sd_sendmsg6", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP6_SENDMSG),
    ("sd_bind4", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_BIND),
    ("sd_bind6", PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_BIND),
    ("sd_egress", PROG_CGROUP_SKB, bpfsys.CGROUP_INET_EGRESS),
    ("sd_dns_ingress", PROG_CGROUP_SKB, bpfsys.CGROUP_INET_INGRESS),
    ("sd_sock_create", PROG_CGROUP_SOCK, bpfsys.CGROUP_INET_SOCK_CREATE),
    ("sd_setsockopt", PROG_CGROUP_SOCKOPT, bpfsys.CGROUP_SETSOCKOPT),
    ("sd_stream_sockops", PROG_SOCK_OPS, bpfsys.CGROUP_SOCK_OPS),
)
# programs reached only by tail calls: (function, index, program array, attach type of the caller)
TAIL_PROGRAMS: tuple[tuple[str, int, str, int], ...] = (
    ("sd_dns_begin", SD_TAIL_BEGIN, "sd_tails", bpfsys.CGROUP_INET_INGRESS),
    ("sd_dns_answers", SD_TAIL_ANSWERS, "sd_tails", bpfsys.CGROUP_INET_INGRESS),
    ("sd_dns_learn", SD_TAIL_LEARN, "sd_tails", bpfsys.CGROUP_INET_INGRESS),
    ("sd_dns_store", SD_TAIL_STORE, "sd_tails", bpfsys.CGROUP_INET_INGRESS),
    ("sd_dns_rx", SD_TAIL_RX, "sd_tails", bpfsys.CGROUP_INET_INGRESS),
    ("sd_egress_query", SD_ETAIL_QUERY, "sd_egress_tails", bpfsys.CGROUP_INET_EGRESS),
    ("sd_egress_dns", SD_ETAIL_VERDICT, "sd_egress_tails", bpfsys.CGROUP_INET_EGRESS),
)
# (function, program type, attach type, sockhash): attached once to a pinned sockhash when
# the programs are compiled, not per cgroup. The cgroup sock_ops program above puts the
# sockets they judge into that sockhash (bpf/dns_stream.c: DNS over TCP as a stream).
MAP_PROGRAMS: tuple[tuple[str, int, int, str], ...] = (
    ("sd_stream_msg", PROG_SK_MSG, bpfsys.SK_MSG_VERDICT, "dns_socks"),
)
SOURCES = ("sock_addr.c", "dns_skb.c", "dns_stream.c")
CFLAGS = ("-Wno-unused-function", "-Wno-macro-redefined")
BPFFS_MAGIC_TYPE = "bpf"


class LoaderError(SafedeployError):
    """Programs could not be compiled, pinned, opened or attached; str() is one line."""


def _inline(name: str, seen: set[str]) -> list[str]:
    """The lines of bpf/<name> with its local #includes inlined, each header once."""
    out = []
    for line in read_text(os.path.join(BPF_DIR, name)).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "#include" and parts[1].startswith('"'):
            inc = parts[1].strip('"')
            if inc not in seen:
                seen.add(inc)
                out += _inline(inc, seen)
            continue
        out.append(line)
    return out


def source_text() -> str:
    """One translation unit: every source with the local headers inlined (bcc rewrites
    map calls only in the main file, so headers are inlined rather than #included)."""
    seen: set[str] = set()
    lines: list[str] = []
    for name in SOURCES:
        lines += _inline(name, seen)
    return "\n".join(lines)


RACY_S = 2.0  # a source file changed this recently may change again within the same timestamp


def _source_signature() -> tuple[str, bool]:
    """What the sources' hash depends on, as the file system tells it without reading them:
    every file of bpf/ (inode, size, mtime, ctime: a write always moves ctime), the flags and
    the kernel. Also whether a file changed within RACY_S (then its timestamps may not tell
    a second change in the same clock tick apart: the hash is not cached, as git does)."""
    now, racy, parts = time.time_ns(), False, [BPF_DIR, " ".join(CFLAGS), os.uname().release]
    for name in sorted(os.listdir(BPF_DIR)):
        st = os.stat(os.path.join(BPF_DIR, name))
        parts.append(f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        racy = racy or now - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_S * 1e9
    return sha256_hex("\0".join(parts).encode()), racy


def _hash_cache() -> str:
    return os.path.join(settings.state_dir(), ".source-hash")


def source_hash() -> str:
    """Version of the programs: sources, flags and the running kernel. Hashing the inlined
    sources costs a start ~2.5 ms, so the result is kept in the state directory under the
    files' signature (_source_signature) and recomputed when any of them changes."""
    sig, racy = _source_signature()
    try:
        cached_sig, _, cached = read_text(_hash_cache()).partition(" ")
        if cached_sig == sig and len(cached) == 16:
            return cached
    except OSError:
        pass
    version = sha256_hex(f"{source_text()}\0{' '.join(CFLAGS)}\0{os.uname().release}".encode())[:16]
    if not racy:
        try:
            write_atomic(_hash_cache(), f"{sig} {version}")
        except OSError:
            pass  # not root, read-only state dir: only slower
    return version


def pin_dir(version: str | None = None) -> str:
    return os.path.join(settings.bpffs_root(), version or source_hash())


def _pin_names() -> list[str]:
    return ([f"prog_{name}" for name, _, _ in PROGRAMS] + [f"prog_{name}" for name, *_ in MAP_PROGRAMS]
            + [f"map_{name}" for name in pin_names()])


def is_pinned(path) -> bool:
    try:
        have = set(os.listdir(path))  # one call, not a stat per pin (the warm path asks every start)
    except OSError:
        return False
    return have.issuperset(_pin_names())


def _bpffs_mounted(path) -> bool:
    target = os.path.realpath(path)
    return any(fstype == BPFFS_MAGIC_TYPE and (target == mnt or target.startswith(mnt.rstrip("/") + "/"))
               for mnt, fstype in cgroup.mounts())


def ensure_bpffs() -> str:
    """Make sure $SAFEDEPLOY_BPFFS lives on a bpf filesystem. A bpffs is only ever mounted
    at the system location, /sys/fs/bpf; any other path must already be on one (mounting
    over an arbitrary parent would hide whatever lives there)."""
    root = settings.bpffs_root().rstrip("/")
    if not _bpffs_mounted(root):
        system = "/sys/fs/bpf"
        if os.path.dirname(os.path.realpath(root)) != system and os.path.realpath(root) != system:
            raise LoaderError(f"SAFEDEPLOY_BPFFS={root} is not on a bpf filesystem; safedeploy mounts bpffs "
                              f"only at {system} (mount one yourself: mount -t bpf bpf <dir>)")
        if not _bpffs_mounted(system):
            os.makedirs(system, exist_ok=True)
            import ctypes  # noqa: PLC0415 — cold path (bpffs not mounted)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(b"bpf", system.encode(), b"bpf", 0, b"mode=0700") != 0:
                err = ctypes.get_errno()
                raise LoaderError(f"cannot mount bpffs at {system}: {os.strerror(err)}")
    os.makedirs(root, exist_ok=True)
    return root


# (struct, member) -> the -D macro bpf/safedeploy.h expects for process attribution
BTF_OFFSETS = {("task_struct", "mm"): "SD_OFF_TASK_MM", ("task_struct", "real_parent"): "SD_OFF_TASK_REAL_PARENT",
               ("task_struct", "tgid"): "SD_OFF_TASK_TGID", ("task_struct", "comm"): "SD_OFF_TASK_COMM",
               ("mm_struct", "arg_start"): "SD_OFF_MM_ARG_START", ("mm_struct", "arg_end"): "SD_OFF_MM_ARG_END",
               ("task_struct", "group_leader"): "SD_OFF_TASK_GROUP_LEADER",
               ("task_struct", "start_time"): "SD_OFF_TASK_START_TIME"}
# the executable's path (mm->exe_file walked up through dentries and mounts); optional on its own
BTF_EXE_OFFSETS = {("mm_struct", "exe_file"): "SD_OFF_MM_EXE_FILE", ("file", "f_path"): "SD_OFF_FILE_F_PATH",
                   ("path", "mnt"): "SD_OFF_PATH_MNT", ("path", "dentry"): "SD_OFF_PATH_DENTRY",
                   ("dentry", "d_parent"): "SD_OFF_DENTRY_D_PARENT", ("dentry", "d_name"): "SD_OFF_DENTRY_D_NAME",
                   ("qstr", "name"): "SD_OFF_QSTR_NAME", ("mount", "mnt"): "SD_OFF_MOUNT_MNT",
                   ("mount", "mnt_parent"): "SD_OFF_MOUNT_MNT_PARENT",
                   ("mount", "mnt_mountpoint"): "SD_OFF_MOUNT_MNT_MOUNTPOINT",
                   ("vfsmount", "mnt_root"): "SD_OFF_VFSMOUNT_MNT_ROOT"}

# where the next byte written to a TCP socket goes and the oldest one not acknowledged (the
# sk_msg program accounts for the stream it judged and keeps its bytes: bpf/dns_stream.h);
# optional on its own
BTF_TCP_OFFSETS = {("tcp_sock", "write_seq"): "SD_OFF_TCP_WRITE_SEQ", ("tcp_sock", "snd_una"): "SD_OFF_TCP_SND_UNA"}
# whether a packet's data sits in pages the process can still change (sent by reference:
# splice, sendfile, zero-copy): the sk_buff's shared-info flags (bpf/dns_skb.c sd_skb_byref);
# optional on its own. Enumerators are (None, name).
BTF_SKB_OFFSETS = {("sk_buff", "head"): "SD_OFF_SKB_HEAD", ("sk_buff", "end"): "SD_OFF_SKB_END",
                   ("skb_shared_info", "flags"): "SD_OFF_SHINFO_FLAGS",
                   ("skb_shared_info", "frag_list"): "SD_OFF_SHINFO_FRAG_LIST",
                   (None, "SKBFL_SHARED_FRAG"): "SD_SKBFL_SHARED_FRAG",
                   (None, "SKBFL_ZEROCOPY_ENABLE"): "SD_SKBFL_ZEROCOPY_ENABLE"}
# the current task's cgroup id from the task (bpf/proc.h sd_self_current: one helper call for
# the cgroup, pid and start time of a connect); optional on its own
BTF_CGROUP_OFFSETS = {("task_struct", "cgroups"): "SD_OFF_TASK_CGROUPS", ("css_set", "dfl_cgrp"): "SD_OFF_CSS_SET_DFL_CGRP",
                      ("cgroup", "kn"): "SD_OFF_CGROUP_KN", ("kernfs_node", "id"): "SD_OFF_KERNFS_NODE_ID"}
BTF_GROUPS = (BTF_OFFSETS, BTF_EXE_OFFSETS, BTF_TCP_OFFSETS, BTF_SKB_OFFSETS, BTF_CGROUP_OFFSETS)


def btf_offsets(vmlinux: str = "/sys/kernel/btf/vmlinux") -> dict[str, int]:
    """Byte offsets of the kernel fields the programs read (and the values of the enumerators
    they test), from the running kernel's BTF (bcc compiles against Debian's headers, whose
    layouts need not match this kernel). Empty when BTF or bpftool is missing: the programs
    then capture no command lines (and the rest of BTF_GROUPS is off)."""
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    try:
        out = subprocess.run(["bpftool", "btf", "dump", "file", vmlinux, "-j"], capture_output=True,
                             timeout=60, check=True).stdout
        types = {t["id"]: t for t in json.loads(out)["types"]}
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return {}
    wanted: dict[str, dict[str, str]] = {}
    enums: dict[str, str] = {}
    for group in BTF_GROUPS:
        for (struct, member), macro in group.items():
            if struct is None:
                enums[member] = macro
            else:
                wanted.setdefault(struct, {})[member] = macro
    found: dict[str, int] = {}

    def walk(t: dict, base: int, members: dict[str, str]) -> None:
        for m in t.get("members", ()):
            off = base + m["bits_offset"] // 8
            if m["name"] in members:
                found[members[m["name"]]] = off
            elif m["name"] in ("", "(anon)"):
                sub = types[m["type_id"]]
                while sub.get("kind") in ("TYPEDEF", "CONST", "VOLATILE"):
                    sub = types[sub["type_id"]]
                walk(sub, off, members)
    for t in types.values():
        if t.get("kind") == "STRUCT" and t.get("name") in wanted:
            walk(t, 0, wanted[t["name"]])
        elif t.get("kind") == "ENUM":
            for v in t.get("values", ()):
                if v.get("name") in enums:
                    found[enums[v["name"]]] = v["val"]
    out: dict[str, int] = {}
    for group in BTF_GROUPS:  # each group is used whole or not at all
        if all(macro in found for macro in group.values()):
            out.update({macro: found[macro] for macro in group.values()})
    return out


def _compile_and_pin(target: str, log=None) -> None:
    enable_site_packages()
    try:
        from bcc import BPF  # noqa: PLC0415 — the only bcc import, cold path only
    except ImportError as e:
        raise LoaderError(f"bcc is not importable ({e}); install python3-bpfcc") from None
    t0 = time.monotonic()
    if log:
        log(f"safedeploy: compiling BPF programs {os.path.basename(target)} (first use on this kernel)...")
    # bcc prints "Unable to find kernel headers" to stdout: keep stdout clean for callers
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        try:
            offsets = btf_offsets()
            if not offsets and log:
                log("safedeploy: no kernel BTF: reports will lack command lines of exited processes")
            b = BPF(text=source_text().encode(), cflags=[*CFLAGS, *(f"-D{k}={v}" for k, v in offsets.items())])
        except Exception as e:
            raise LoaderError(f"BPF compile failed ({e}); check kernel headers with 'safedeploy doctor'") from None
        tmp = os.path.join(os.path.dirname(target), f"tmp_{os.getpid()}_{int(time.time() * 1000)}")
        os.mkdir(tmp)
        try:
            for name, ptype, atype in PROGRAMS:
                try:
                    fn = b.load_func(name, ptype, attach_type=atype)
                except Exception as e:
                    raise LoaderError(f"kernel rejected BPF program {name}: {str(e).splitlines()[0]}") from None
                bpfsys.obj_pin(fn.fd, os.path.join(tmp, f"prog_{name}"))
            for name, index, array, atype in TAIL_PROGRAMS:
                try:
                    fn = b.load_func(name, PROG_CGROUP_SKB, attach_type=atype)
                except Exception as e:
                    raise LoaderError(f"kernel rejected BPF program {name}: {str(e).splitlines()[0]}") from None
                b.get_table(array)[index] = fn.fd
            from bcc.libbcc import lib  # noqa: PLC0415 — bcc's tables do not know sockhashes
            for name, ptype, atype, sockmap in MAP_PROGRAMS:
                try:
                    fn = b.load_func(name, ptype)
                    bpfsys.map_prog_attach(fn.fd, lib.bpf_table_fd(b.module, sockmap.encode()), atype)
                except Exception as e:
                    raise LoaderError(f"kernel rejected BPF program {name}: {str(e).splitlines()[0]}") from None
                bpfsys.obj_pin(fn.fd, os.path.join(tmp, f"prog_{name}"))
            for name in pin_names():
                bpfsys.obj_pin(lib.bpf_table_fd(b.module, name.encode()), os.path.join(tmp, f"map_{name}"))
            try:
                os.rename(tmp, target)
            except OSError as e:  # someone pinned this version meanwhile (another bpffs user)
                if e.errno not in (17, 39) or not is_pinned(target):
                    raise
                import shutil  # noqa: PLC0415
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            import shutil  # noqa: PLC0415
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            b.cleanup()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    if log:
        log(f"safedeploy: programs pinned at {target} in {time.monotonic() - t0:.2f}s")


def ensure_programs(log=None) -> str:
    """The pin directory of the current program version, compiling and pinning it first
    when absent. Safe against parallel callers (flock)."""
    target = pin_dir()
    if is_pinned(target):
        return target
    root = ensure_bpffs()
    with cgroup.locked(root):  # the pins are shared by every state dir: lock where they live
        if is_pinned(target):
            return target
        if os.path.exists(target):  # a partial directory (e.g. pins removed by hand): rebuild
            import shutil  # noqa: PLC0415
            shutil.rmtree(target, ignore_errors=True)
        _compile_and_pin(target, log)
        with PinnedMaps.open(target) as maps:  # spare table sets: the first policies start fast too
            made = maps.prime_spares()
        if log:
            log(f"safedeploy: {made} spare table sets ready")
    return target


class Programs:
    """Open fds of the pinned programs of one version; attach them to cgroups."""

    def __init__(self, path):
        self.path = path
        self.fds: dict[str, int] = {}
        try:
            for name, _, _ in PROGRAMS:
                self.fds[name] = bpfsys.obj_get(os.path.join(path, f"prog_{name}"))
        except bpfsys.BpfError as e:
            self.close()
            raise LoaderError(f"programs at {path} are not usable: {e}") from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> "Programs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def attach(self, cgroup_path) -> None:
        """Attach every program (BPF_F_ALLOW_MULTI); all or nothing."""
        fd = _open_cgroup(cgroup_path)
        done = []
        try:
            for name, _, atype in PROGRAMS:
                try:
                    bpfsys.prog_attach(self.fds[name], fd, atype)
                except bpfsys.BpfError as e:
                    # the same program twice: EEXIST on older kernels, EINVAL on newer ones
                    if e.errno in (errno.EEXIST, errno.EINVAL) and bpfsys.prog_id(self.fds[name]) in bpfsys.prog_query(fd, atype):
                        continue
                    raise LoaderError(f"cannot attach {name} to {cgroup_path}: {e.strerror}") from None
                done.append((name, atype))
        except BaseException:
            for name, atype in done:
                try:
                    bpfsys.prog_detach(self.fds[name], fd, atype)
                except bpfsys.BpfError:
                    pass  # best effort: the original error is what matters
            raise
        finally:
            os.close(fd)

    def detach(self, cgroup_path) -> int:
        """Detach every program from a cgroup; returns how many were attached."""
        try:
            fd = _open_cgroup(cgroup_path)
        except LoaderError:
            return 0  # cgroup gone: the kernel detached them
        try:
            return sum(int(bpfsys.prog_detach(self.fds[name], fd, atype)) for name, _, atype in PROGRAMS)
        finally:
            os.close(fd)

    def attached_to(self, cgroup_path) -> int:
        fd = _open_cgroup(cgroup_path)
        try:
            mine = {bpfsys.prog_id(pfd) for pfd in self.fds.values()}
            return sum(len(mine.intersection(bpfsys.prog_query(fd, atype))) for _, _, atype in PROGRAMS)
        finally:
            os.close(fd)


def _open_cgroup(path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise LoaderError(f"cannot open cgroup {path}: {e.strerror}") from None


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
