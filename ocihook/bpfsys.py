"""The bpf(2) syscall, through ctypes' C core (``cdata``): the only way the warm path talks to the kernel.

No bcc, no compile: pinned objects are opened with BPF_OBJ_GET and maps are read and
written element by element. Errors become :class:`BpfError` with the errno and a
one-line message naming the operation.
"""

import errno
import os

from . import cdata
from .errors import SafedeployError

# bpf(2) per architecture (os.uname().machine); elsewhere every call is refused
_NR_BPF_BY_MACHINE = {"x86_64": 321, "i386": 357, "i686": 357, "aarch64": 280, "armv7l": 386, "armv8l": 386,
                      "ppc64le": 361, "ppc64": 361, "s390x": 351, "riscv64": 280, "loongarch64": 280}
MACHINE = os.uname().machine
_NR_BPF = _NR_BPF_BY_MACHINE.get(MACHINE)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_ALLOW_MULTI = 2

# enum bpf_attach_type
CGROUP_INET_INGRESS = 0
CGROUP_INET_EGRESS = 1
CGROUP_INET_SOCK_CREATE = 2
CGROUP_SOCK_OPS = 3
SK_SKB_STREAM_PARSER = 4     # programs attached to a sockmap/sockhash, not to a cgroup
SK_SKB_STREAM_VERDICT = 5
SK_MSG_VERDICT = 7
CGROUP_INET4_BIND = 8
CGROUP_INET6_BIND = 9
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15
CGROUP_SETSOCKOPT = 22

_syscall = cdata.libc_function("syscall")

U32, U64 = cdata.c_uint32, cdata.c_uint64


# -- union bpf_attr (include/uapi/linux/bpf.h): the members this module uses ---------------
class ObjAttr(cdata.Structure):
    """BPF_OBJ_PIN, BPF_OBJ_GET."""
    _fields_ = [("pathname", U64), ("bpf_fd", U32), ("file_flags", U32)]


class MapCreateAttr(cdata.Structure):
    """BPF_MAP_CREATE."""
    _fields_ = [("map_type", U32), ("key_size", U32), ("value_size", U32), ("max_entries", U32),
                ("map_flags", U32), ("inner_map_fd", U32), ("numa_node", U32), ("map_name", cdata.c_char * 16)]


class GetIdAttr(cdata.Structure):
    """BPF_MAP_GET_FD_BY_ID."""
    _fields_ = [("id", U32), ("next_id", U32), ("open_flags", U32)]


class ElemAttr(cdata.Structure):
    """BPF_MAP_*_ELEM and BPF_MAP_GET_NEXT_KEY (``value`` is ``next_key`` there)."""
    _fields_ = [("map_fd", U32), ("pad", U32), ("key", U64), ("value", U64), ("flags", U64)]


class AttachAttr(cdata.Structure):
    """BPF_PROG_ATTACH, BPF_PROG_DETACH."""
    _fields_ = [("target_fd", U32), ("attach_bpf_fd", U32), ("attach_type", U32), ("attach_flags", U32)]


class QueryAttr(cdata.Structure):
    """BPF_PROG_QUERY."""
    _fields_ = [("target_fd", U32), ("attach_type", U32), ("query_flags", U32), ("attach_flags", U32),
                ("prog_ids", U64), ("prog_cnt", U32)]


class InfoAttr(cdata.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""
    _fields_ = [("bpf_fd", U32), ("info_len", U32), ("info", U64)]


BPF_ENABLE_STATS = 32  # returns an fd; run-time statistics stay on until it is closed
BPF_STATS_RUN_TIME = 0


class StatsAttr(cdata.Structure):
    """BPF_ENABLE_STATS."""
    _fields_ = [("type", U32)]


class BpfAttr(cdata.Union):
    """128 bytes, zeroed: the kernel refuses non-zero bytes past a command's members."""
    _fields_ = [("obj", ObjAttr), ("create", MapCreateAttr), ("get_id", GetIdAttr), ("elem", ElemAttr), ("attach", AttachAttr), ("query", QueryAttr),
                ("info", InfoAttr), ("enable_stats", StatsAttr), ("raw", cdata.c_uint8 * 128)]


class ProgInfo(cdata.Structure):
    """struct bpf_prog_info up to verified_insns (the members in between are not used
    here); the kernel fills at most info_len bytes."""
    _fields_ = [("type", U32), ("id", U32), ("tag", cdata.c_uint8 * 8), ("jited_prog_len", U32),
                ("xlated_prog_len", U32), ("unused", cdata.c_uint8 * 168), ("run_time_ns", U64),
                ("run_cnt", U64), ("recursion_misses", U64), ("verified_insns", U32), ("rest", cdata.c_uint8 * 36)]


class MapInfo(cdata.Structure):
    """The head of struct bpf_map_info."""
    _fields_ = [("type", U32), ("id", U32), ("key_size", U32), ("value_size", U32), ("max_entries", U32),
                ("map_flags", U32), ("rest", cdata.c_uint8 * 232)]


class BpfError(SafedeployError, OSError):
    """A failed bpf(2) call; str() is one line (the message, without "[Errno N]")."""

    def __str__(self) -> str:
        return str(self.strerror)


def _bpf(cmd: int, attr: BpfAttr, what: str) -> int:
    if _NR_BPF is None:
        raise SafedeployError(f"bpf(2) has no known syscall number on this architecture ({MACHINE}): "
                              f"safedeploy supports {', '.join(sorted(_NR_BPF_BY_MACHINE))}")
    ret = _syscall(_NR_BPF, cmd, cdata.byref(attr), cdata.sizeof(attr))
    if ret < 0:
        err = cdata.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _addr(obj) -> int:
    return cdata.addressof(obj)


def obj_get(path: str) -> int:
    """Open a pinned object; returns an fd (caller closes)."""
    attr = BpfAttr()
    p = cdata.create_string_buffer(os.fsencode(path))
    attr.obj.pathname = _addr(p)
    return _bpf(BPF_OBJ_GET, attr, f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    attr = BpfAttr()
    p = cdata.create_string_buffer(os.fsencode(path))
    attr.obj.pathname = _addr(p)
    attr.obj.bpf_fd = fd
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def elem_attr(fd: int, key, value=None, flags: int = 0) -> BpfAttr:
    """The attribute of a map element command (key, value: ctypes objects, or None)."""
    attr = BpfAttr()
    attr.elem.map_fd = fd
    attr.elem.key = 0 if key is None else _addr(key)
    attr.elem.value = 0 if value is None else _addr(value)
    attr.elem.flags = flags
    return attr


def _elem(cmd: int, fd: int, key, value=None, flags: int = 0, what: str = "map") -> int:
    return _bpf(cmd, elem_attr(fd, key, value, flags), what)


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    """Write one element (key and value are ctypes structures)."""
    _elem(BPF_MAP_UPDATE_ELEM, fd, key, value, flags, "map update")


def _present(cmd: int, fd: int, key, value, what: str) -> bool:
    """A map element command that may find nothing: False on ENOENT."""
    try:
        _elem(cmd, fd, key, value, what=what)
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(fd: int, key, value) -> bool:
    """Fill value for key; False when the key is absent."""
    return _present(BPF_MAP_LOOKUP_ELEM, fd, key, value, "map lookup")


def map_delete(fd: int, key) -> bool:
    """Delete key; False when it was already gone."""
    return _present(BPF_MAP_DELETE_ELEM, fd, key, None, "map delete")


def map_pop(fd: int, value) -> bool:
    """Take the oldest element of a queue map into value; False when it is empty."""
    return _present(BPF_MAP_LOOKUP_AND_DELETE_ELEM, fd, None, value, "map pop")


def map_peek(fd: int, value) -> bool:
    """Read the oldest element of a queue map without taking it; False when it is empty."""
    return map_lookup(fd, None, value)


def map_keys(fd: int, key_type) -> list:
    """Every key of a hash or LPM map (a snapshot; the map may change meanwhile)."""
    keys = []
    cur = None
    while True:
        nxt = key_type()
        try:
            _elem(BPF_MAP_GET_NEXT_KEY, fd, cur, nxt, what="map iterate")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return keys
            raise
        keys.append(nxt)
        cur = nxt


def attach_attr(prog_fd: int, cgroup_fd: int, attach_type: int, flags: int = 0) -> BpfAttr:
    attr = BpfAttr()
    attr.attach.target_fd = cgroup_fd
    attr.attach.attach_bpf_fd = prog_fd
    attr.attach.attach_type = attach_type
    attr.attach.attach_flags = flags
    return attr


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    _bpf(BPF_PROG_ATTACH, attach_attr(prog_fd, cgroup_fd, attach_type, flags),
         f"attach program (type {attach_type})")


def map_prog_attach(prog_fd: int, map_fd: int, attach_type: int) -> None:
    """Attach an sk_msg/sk_skb program to a sockmap or sockhash (no flags there)."""
    prog_attach(prog_fd, map_fd, attach_type, 0)


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> bool:
    """Detach; False when that program was not attached there."""
    try:
        _bpf(BPF_PROG_DETACH, attach_attr(prog_fd, cgroup_fd, attach_type),
             f"detach program (type {attach_type})")
    except BpfError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup for one attach type."""
    ids = (U32 * 64)()
    attr = BpfAttr()
    attr.query.target_fd = cgroup_fd
    attr.query.attach_type = attach_type
    attr.query.prog_ids = _addr(ids)
    attr.query.prog_cnt = len(ids)
    _bpf(BPF_PROG_QUERY, attr, "query attached programs")
    return list(ids[:attr.query.prog_cnt])


def obj_info(fd: int, info, what: str = "object info"):
    """Fill info (ProgInfo, MapInfo) for a program or map fd (BPF_OBJ_GET_INFO_BY_FD)."""
    attr = BpfAttr()
    attr.info.bpf_fd = fd
    attr.info.info_len = cdata.sizeof(info)
    attr.info.info = _addr(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return info


def enable_stats() -> int:
    """Kernel-wide BPF run-time statistics on (run_cnt, run_time_ns) until the returned fd
    is closed."""
    attr = BpfAttr()
    attr.enable_stats.type = BPF_STATS_RUN_TIME
    return _bpf(BPF_ENABLE_STATS, attr, "enable BPF run-time stats")


def prog_id(prog_fd: int) -> int:
    """The kernel id of a program fd (struct bpf_prog_info.id)."""
    return obj_info(prog_fd, ProgInfo(), "program info").id


def map_info(map_fd: int) -> dict:
    """type, key/value size and max_entries of a map (struct bpf_map_info)."""
    info = obj_info(map_fd, MapInfo(), "map info")
    return {"type": info.type, "id": info.id, "key_size": info.key_size, "value_size": info.value_size,
            "max_entries": info.max_entries, "flags": info.map_flags}


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "") -> int:
    """Create a map; returns its fd (caller closes)."""
    attr = BpfAttr()
    c = attr.create
    c.map_type, c.key_size, c.value_size, c.max_entries, c.map_flags = map_type, key_size, value_size, \
        max_entries, flags
    c.map_name = name.encode()[:15]
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name} ({max_entries} entries)")


def map_fd_by_id(map_id: int) -> int:
    """An fd of the map with this kernel id (e.g. an inner map of a map-in-map)."""
    attr = BpfAttr()
    attr.get_id.id = map_id
    return _bpf(BPF_MAP_GET_FD_BY_ID, attr, f"open map id {map_id}")
