"""The bpf(2) syscall, from ctypes: the only way the warm path talks to the kernel.

No bcc, no compile: pinned objects are opened with BPF_OBJ_GET and maps are read and
written element by element. Errors become :class:`BpfError` with the errno and a
one-line message naming the operation.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
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
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP6_SENDMSG = 15

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A failed bpf(2) call; str() is one line (the message, without "[Errno N]")."""

    def __str__(self) -> str:
        return str(self.strerror)


def _bpf(cmd: int, attr: ctypes.Array, what: str) -> int:
    ret = _libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr() -> ctypes.Array:
    return (ctypes.c_uint8 * 128)()


def _put(attr: ctypes.Array, offset: int, ctype, value) -> None:
    ctype.from_buffer(attr, offset).value = value


def obj_get(path: str) -> int:
    """Open a pinned object; returns an fd (caller closes)."""
    attr = _attr()
    p = ctypes.create_string_buffer(os.fsencode(path))
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(p))
    return _bpf(BPF_OBJ_GET, attr, f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    attr = _attr()
    p = ctypes.create_string_buffer(os.fsencode(path))
    _put(attr, 0, ctypes.c_uint64, ctypes.addressof(p))
    _put(attr, 8, ctypes.c_uint32, fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def _elem(cmd: int, fd: int, key, value=None, flags: int = 0, what: str = "map") -> int:
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, fd)
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(key))
    if value is not None:
        _put(attr, 16, ctypes.c_uint64, ctypes.addressof(value))
    _put(attr, 24, ctypes.c_uint64, flags)
    return _bpf(cmd, attr, what)


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    """Write one element (key and value are ctypes structures)."""
    _elem(BPF_MAP_UPDATE_ELEM, fd, key, value, flags, "map update")


def map_lookup(fd: int, key, value) -> bool:
    """Fill value for key; False when the key is absent."""
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, fd, key, value, what="map lookup")
    except BpfError as e:
        if e.errno == _errno.ENOENT:
            return False
        raise
    return True


def map_delete(fd: int, key) -> bool:
    """Delete key; False when it was already gone."""
    try:
        _elem(BPF_MAP_DELETE_ELEM, fd, key, what="map delete")
    except BpfError as e:
        if e.errno == _errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_type) -> list:
    """Every key of a hash or LPM map (a snapshot; the map may change meanwhile)."""
    keys = []
    cur = None
    while True:
        nxt = key_type()
        attr = _attr()
        _put(attr, 0, ctypes.c_uint32, fd)
        _put(attr, 8, ctypes.c_uint64, 0 if cur is None else ctypes.addressof(cur))
        _put(attr, 16, ctypes.c_uint64, ctypes.addressof(nxt))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map iterate")
        except BpfError as e:
            if e.errno == _errno.ENOENT:
                return keys
            raise
        keys.append(nxt)
        cur = nxt


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, cgroup_fd)
    _put(attr, 4, ctypes.c_uint32, prog_fd)
    _put(attr, 8, ctypes.c_uint32, attach_type)
    _put(attr, 12, ctypes.c_uint32, flags)
    _bpf(BPF_PROG_ATTACH, attr, f"attach program (type {attach_type})")


def map_prog_attach(prog_fd: int, map_fd: int, attach_type: int) -> None:
    """Attach an sk_msg/sk_skb program to a sockmap or sockhash (no flags there)."""
    prog_attach(prog_fd, map_fd, attach_type, 0)


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> bool:
    """Detach; False when that program was not attached there."""
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, cgroup_fd)
    _put(attr, 4, ctypes.c_uint32, prog_fd)
    _put(attr, 8, ctypes.c_uint32, attach_type)
    try:
        _bpf(BPF_PROG_DETACH, attr, f"detach program (type {attach_type})")
    except BpfError as e:
        if e.errno in (_errno.ENOENT, _errno.EINVAL):
            return False
        raise
    return True


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup for one attach type."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, cgroup_fd)
    _put(attr, 4, ctypes.c_uint32, attach_type)
    _put(attr, 16, ctypes.c_uint64, ctypes.addressof(ids))
    _put(attr, 24, ctypes.c_uint32, len(ids))
    _bpf(BPF_PROG_QUERY, attr, "query attached programs")
    count = ctypes.c_uint32.from_buffer(attr, 24).value
    return list(ids[:count])


def prog_id(prog_fd: int) -> int:
    """The kernel id of a program fd (struct bpf_prog_info.id is at offset 4)."""
    info = (ctypes.c_uint8 * 256)()
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, prog_fd)
    _put(attr, 4, ctypes.c_uint32, ctypes.sizeof(info))
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    return ctypes.c_uint32.from_buffer(info, 4).value


def map_info(map_fd: int) -> dict:
    """type, key/value size and max_entries of a map (struct bpf_map_info)."""
    info = (ctypes.c_uint8 * 256)()
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, map_fd)
    _put(attr, 4, ctypes.c_uint32, ctypes.sizeof(info))
    _put(attr, 8, ctypes.c_uint64, ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    u32 = lambda off: ctypes.c_uint32.from_buffer(info, off).value  # noqa: E731
    return {"type": u32(0), "id": u32(4), "key_size": u32(8), "value_size": u32(12),
            "max_entries": u32(16), "flags": u32(20)}


BPF_MAP_CREATE = 0
BPF_MAP_GET_FD_BY_ID = 14


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "") -> int:
    """Create a map; returns its fd (caller closes)."""
    attr = _attr()
    for off, v in ((0, map_type), (4, key_size), (8, value_size), (12, max_entries), (16, flags)):
        _put(attr, off, ctypes.c_uint32, v)
    raw = name.encode()[:15]
    ctypes.memmove(ctypes.addressof(attr) + 28, raw, len(raw))
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name} ({max_entries} entries)")


def map_fd_by_id(map_id: int) -> int:
    """An fd of the map with this kernel id (e.g. an inner map of a map-in-map)."""
    attr = _attr()
    _put(attr, 0, ctypes.c_uint32, map_id)
    return _bpf(BPF_MAP_GET_FD_BY_ID, attr, f"open map id {map_id}")
