"""bpf(2) attribute packing (ocihook.bpfsys): the ctypes members sit where the installed
uapi header <linux/bpf.h> puts them (a C compiler prints offsetof/sizeof), and the
syscall is refused, not guessed, on an architecture without a known number."""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import pytest

from helpers import require
from ocihook import bpfsys
from ocihook.errors import SafedeployError

# (our structure, its member) -> the C expression of the same member
MEMBERS = {
    (bpfsys.ObjAttr, "pathname"): ("union bpf_attr", "pathname"),
    (bpfsys.ObjAttr, "bpf_fd"): ("union bpf_attr", "bpf_fd"),
    (bpfsys.ObjAttr, "file_flags"): ("union bpf_attr", "file_flags"),
    (bpfsys.ElemAttr, "map_fd"): ("union bpf_attr", "map_fd"),
    (bpfsys.ElemAttr, "key"): ("union bpf_attr", "key"),
    (bpfsys.ElemAttr, "value"): ("union bpf_attr", "value"),
    (bpfsys.ElemAttr, "flags"): ("union bpf_attr", "flags"),
    (bpfsys.AttachAttr, "target_fd"): ("union bpf_attr", "target_fd"),
    (bpfsys.AttachAttr, "attach_bpf_fd"): ("union bpf_attr", "attach_bpf_fd"),
    (bpfsys.AttachAttr, "attach_type"): ("union bpf_attr", "attach_type"),
    (bpfsys.AttachAttr, "attach_flags"): ("union bpf_attr", "attach_flags"),
    (bpfsys.QueryAttr, "target_fd"): ("union bpf_attr", "query.target_fd"),
    (bpfsys.QueryAttr, "attach_type"): ("union bpf_attr", "query.attach_type"),
    (bpfsys.QueryAttr, "query_flags"): ("union bpf_attr", "query.query_flags"),
    (bpfsys.QueryAttr, "attach_flags"): ("union bpf_attr", "query.attach_flags"),
    (bpfsys.QueryAttr, "prog_ids"): ("union bpf_attr", "query.prog_ids"),
    (bpfsys.QueryAttr, "prog_cnt"): ("union bpf_attr", "query.prog_cnt"),
    (bpfsys.InfoAttr, "bpf_fd"): ("union bpf_attr", "info.bpf_fd"),
    (bpfsys.InfoAttr, "info_len"): ("union bpf_attr", "info.info_len"),
    (bpfsys.InfoAttr, "info"): ("union bpf_attr", "info.info"),
    (bpfsys.ProgInfo, "type"): ("struct bpf_prog_info", "type"),
    (bpfsys.ProgInfo, "id"): ("struct bpf_prog_info", "id"),
    (bpfsys.ProgInfo, "tag"): ("struct bpf_prog_info", "tag"),
    (bpfsys.ProgInfo, "jited_prog_len"): ("struct bpf_prog_info", "jited_prog_len"),
    (bpfsys.ProgInfo, "xlated_prog_len"): ("struct bpf_prog_info", "xlated_prog_len"),
    (bpfsys.ProgInfo, "run_time_ns"): ("struct bpf_prog_info", "run_time_ns"),
    (bpfsys.ProgInfo, "run_cnt"): ("struct bpf_prog_info", "run_cnt"),
    (bpfsys.ProgInfo, "recursion_misses"): ("struct bpf_prog_info", "recursion_misses"),
    (bpfsys.ProgInfo, "verified_insns"): ("struct bpf_prog_info", "verified_insns"),
    (bpfsys.StatsAttr, "type"): ("union bpf_attr", "enable_stats.type"),
    (bpfsys.MapInfo, "type"): ("struct bpf_map_info", "type"),
    (bpfsys.MapInfo, "id"): ("struct bpf_map_info", "id"),
    (bpfsys.MapInfo, "key_size"): ("struct bpf_map_info", "key_size"),
    (bpfsys.MapInfo, "value_size"): ("struct bpf_map_info", "value_size"),
    (bpfsys.MapInfo, "max_entries"): ("struct bpf_map_info", "max_entries"),
    (bpfsys.MapInfo, "map_flags"): ("struct bpf_map_info", "map_flags"),
}
CONSTANTS = ["BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM", "BPF_MAP_GET_NEXT_KEY",
             "BPF_OBJ_PIN", "BPF_OBJ_GET", "BPF_PROG_ATTACH", "BPF_PROG_DETACH", "BPF_OBJ_GET_INFO_BY_FD",
             "BPF_PROG_QUERY", "BPF_ANY", "BPF_NOEXIST", "BPF_F_ALLOW_MULTI", "BPF_ENABLE_STATS",
             "BPF_STATS_RUN_TIME"]
ATTACH = {"CGROUP_INET_INGRESS": "BPF_CGROUP_INET_INGRESS", "CGROUP_INET_EGRESS": "BPF_CGROUP_INET_EGRESS",
          "CGROUP_INET_SOCK_CREATE": "BPF_CGROUP_INET_SOCK_CREATE",
          "CGROUP_INET4_CONNECT": "BPF_CGROUP_INET4_CONNECT", "CGROUP_INET6_CONNECT": "BPF_CGROUP_INET6_CONNECT",
          "CGROUP_UDP4_SENDMSG": "BPF_CGROUP_UDP4_SENDMSG", "CGROUP_UDP6_SENDMSG": "BPF_CGROUP_UDP6_SENDMSG"}


@pytest.fixture(scope="module")
def uapi(tmp_path_factory):
    cc = shutil.which("cc")
    require(cc is not None, "a C compiler (cc) to read <linux/bpf.h>")
    d = tmp_path_factory.mktemp("uapi")
    lines = []
    for (_ours, _name), (ctype, member) in MEMBERS.items():
        key = f"{ctype}.{member}"
        lines.append(f'printf("\\"{key}\\": [%zu, %zu],\\n", offsetof({ctype}, {member}), '
                     f"sizeof((({ctype} *)0)->{member}));")
    for name in [*CONSTANTS, *ATTACH.values()]:
        lines.append(f'printf("\\"{name}\\": [%lld, 0],\\n", (long long){name});')
    (d / "abi.c").write_text("#include <stddef.h>\n#include <stdio.h>\n#include <linux/bpf.h>\n"
                             "int main(void) {\nprintf(\"{\\n\");\n" + "\n".join(lines) +
                             '\nprintf("\\"union\\": [%zu, 0]}\\n", sizeof(union bpf_attr));\nreturn 0;\n}\n')
    res = subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], capture_output=True, text=True)
    require(res.returncode == 0, f"cannot compile against <linux/bpf.h>: {res.stderr[:300]}")
    return json.loads(subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout)


def test_attribute_members_match_the_uapi_header(uapi):
    for (ours, name), (ctype, member) in MEMBERS.items():
        field = getattr(ours, name)
        assert [field.offset, field.size] == uapi[f"{ctype}.{member}"], (ours.__name__, name)


def test_command_and_attach_numbers_match_the_uapi_header(uapi):
    for name in CONSTANTS:
        assert getattr(bpfsys, name) == uapi[name][0], name
    for ours, theirs in ATTACH.items():
        assert getattr(bpfsys, ours) == uapi[theirs][0], ours


def test_elem_attr_packs_fd_key_value_and_flags():
    key, val = ctypes.c_uint64(7), ctypes.c_uint32(9)
    attr = bpfsys.elem_attr(5, key, val, bpfsys.BPF_NOEXIST)
    raw = bytes(attr.raw)
    assert int.from_bytes(raw[0:4], "little") == 5
    assert int.from_bytes(raw[8:16], "little") == ctypes.addressof(key)
    assert int.from_bytes(raw[16:24], "little") == ctypes.addressof(val)
    assert int.from_bytes(raw[24:32], "little") == bpfsys.BPF_NOEXIST
    assert raw[32:] == bytes(96)                         # the kernel refuses stray bytes
    assert bytes(bpfsys.elem_attr(5, None).raw)[8:24] == bytes(16)


def test_unknown_architecture_is_refused_not_guessed(monkeypatch):
    monkeypatch.setattr(bpfsys, "_NR_BPF", None)
    monkeypatch.setattr(bpfsys, "MACHINE", "vax")
    with pytest.raises(SafedeployError, match=r"^bpf\(2\) has no known syscall number on this architecture \(vax\)"):
        bpfsys.obj_get("/sys/fs/bpf/nothing")


def test_bpf_error_is_a_safedeploy_error_and_an_os_error():
    import errno
    e = bpfsys.BpfError(errno.ENOENT, "open pin /x: No such file or directory")
    assert isinstance(e, SafedeployError) and isinstance(e, OSError) and e.errno == errno.ENOENT
    assert str(e) == "open pin /x: No such file or directory"
