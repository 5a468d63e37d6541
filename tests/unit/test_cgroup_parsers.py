"""The cgroup v2 parsers of ocihook.cgroup fed made-up /proc files: mountinfo lines of
hybrid and pure v2 hosts, escaped mount points, /proc/<pid>/cgroup of v1+v2 hosts."""
from __future__ import annotations

import pytest

from ocihook import cgroup

HYBRID = """\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 22 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
"""
PURE = """\
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
NO_OPTIONAL = "40 1 0:33 / /cg2 rw - cgroup2 none rw\n"
MANY_OPTIONAL = "41 1 0:34 / /mnt/cg rw shared:3 master:1 propagate_from:2 unbindable - cgroup2 cgroup2 rw\n"
ESCAPED = "42 1 0:35 / /mnt/my\\040cg\\011x\\134y rw shared:4 - cgroup2 cgroup2 rw\n"
V1_ONLY = "27 25 0:25 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu\n"
# a filesystem whose *source* says cgroup2 is not a cgroup2 mount
DECOY = "50 1 0:40 / /not/it rw - tmpfs cgroup2 rw\n" + PURE


@pytest.mark.parametrize("text, mount", [(HYBRID, "/sys/fs/cgroup/unified"), (PURE, "/sys/fs/cgroup"),
                                         (NO_OPTIONAL, "/cg2"), (MANY_OPTIONAL, "/mnt/cg"),
                                         (ESCAPED, "/mnt/my cg\tx\\y"), (DECOY, "/sys/fs/cgroup"),
                                         (PURE + HYBRID, "/sys/fs/cgroup")])
def test_the_first_cgroup2_mount_point(tmp_path, text, mount):
    (tmp_path / "mountinfo").write_text(text)
    assert cgroup.cgroup2_mount(str(tmp_path / "mountinfo")) == mount


def test_every_mount_with_its_type_and_escapes_decoded(tmp_path):
    """cgroup.mounts: the one mountinfo parser (the cgroup view, the bpffs check, the
    container mount judgement and the run's read-only binds all read it)."""
    (tmp_path / "mountinfo").write_text(HYBRID + ESCAPED + DECOY + "garbage\n")
    assert cgroup.mounts(str(tmp_path / "mountinfo")) == [
        ("/sys", "sysfs"), ("/sys/fs/cgroup", "tmpfs"), ("/sys/fs/cgroup/unified", "cgroup2"),
        ("/sys/fs/cgroup/systemd", "cgroup"), ("/mnt/my cg\tx\\y", "cgroup2"), ("/not/it", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2")]


@pytest.mark.parametrize("text", [V1_ONLY, "", "garbage without fields - cgroup2\n", "\n\n"])
def test_no_cgroup2_mount_is_a_clear_error(tmp_path, text):
    (tmp_path / "mountinfo").write_text(text)
    with pytest.raises(cgroup.CgroupError, match="no cgroup v2 hierarchy is mounted"):
        cgroup.cgroup2_mount(str(tmp_path / "mountinfo"))


def test_unreadable_mountinfo_is_a_clear_error(tmp_path):
    with pytest.raises(cgroup.CgroupError, match=r"^cannot read .*/nosuch: No such file or directory$"):
        cgroup.cgroup2_mount(str(tmp_path / "nosuch"))


def _proc(tmp_path, pid: int, text: str):
    d = tmp_path / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(text)
    return str(tmp_path / "proc")


def test_cgroup_of_pid_on_a_hybrid_host(tmp_path):
    mount = tmp_path / "unified"
    (mount / "machine.slice" / "libpod-abc.scope").mkdir(parents=True)
    proc = _proc(tmp_path, 42, "12:cpu,cpuacct:/machine.slice\n1:name=systemd:/machine.slice/libpod-abc.scope\n"
                               "0::/machine.slice/libpod-abc.scope\n")
    assert cgroup.cgroup_of_pid(42, proc=proc, mount=mount) == str(mount / "machine.slice" / "libpod-abc.scope")


def test_cgroup_of_pid_in_the_root_and_a_deleted_cgroup(tmp_path):
    mount = tmp_path / "cg"
    (mount / "gone").mkdir(parents=True)
    assert cgroup.cgroup_of_pid(1, proc=_proc(tmp_path, 1, "0::/\n"), mount=mount) == str(mount)
    assert cgroup.cgroup_of_pid(2, proc=_proc(tmp_path, 2, "0::/gone (deleted)\n"), mount=mount) == str(mount / "gone")


@pytest.mark.parametrize("text, message", [
    ("1:name=systemd:/x\n", "is in no cgroup v2"),
    ("0::/not/there\n", "of process 7 is gone"),
])
def test_cgroup_of_pid_errors(tmp_path, text, message):
    mount = tmp_path / "cg"
    mount.mkdir()
    with pytest.raises(cgroup.CgroupError, match=message):
        cgroup.cgroup_of_pid(7, proc=_proc(tmp_path, 7, text), mount=mount)


def test_cgroup_of_a_missing_process(tmp_path):
    with pytest.raises(cgroup.CgroupError, match="^process 99 does not exist$"):
        cgroup.cgroup_of_pid(99, proc=str(tmp_path), mount=tmp_path)
