"""`safedeploy run` keeps its command in its cgroup (issue 11 item 1): each way out is tried
from inside a real run and must fail, while what deploy steps do (chown, files, setuid,
sub-cgroups) still works and the policy still holds. Real kernel, real CLI."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, require
from ocihook import cgroup, loader

CLI = [sys.executable, "-m", "ocihook.cli"]
POLICY = "version: 1\nname: confined\ndefault: allow\ndeny: ['127.0.0.2']\n"

CLONE3 = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
/* clone3(CLONE_INTO_CGROUP) into the cgroup directory argv[1]; prints what happened */
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) { printf("open %s\n", strerror(errno)); return 0; }
    struct clone_args a; memset(&a, 0, sizeof a);
    a.flags = CLONE_INTO_CGROUP; a.exit_signal = SIGCHLD; a.cgroup = (uint64_t)fd;
    long pid = syscall(SYS_clone3, &a, sizeof a);
    if (pid < 0) { printf("clone3 %s\n", strerror(errno)); return 0; }
    if (pid == 0) { char buf[512]; int c = open("/proc/self/cgroup", O_RDONLY); int n = read(c, buf, sizeof buf - 1);
                    buf[n > 0 ? n : 0] = 0; printf("child-in %s", buf); fflush(stdout); _exit(0); }
    waitpid(pid, 0, 0); printf("clone3 ok\n"); return 0;
}
"""

PROBE = r'''
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def err(f):
    try:
        f(); return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def write_procs(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
target = sys.argv[1]
out["cgroup"] = open("/proc/self/cgroup").read().strip().splitlines()[-1]
out["procs_target"] = err(lambda: write_procs(target + "/cgroup.procs"))
out["procs_root"] = err(lambda: write_procs("/sys/fs/cgroup/unified/cgroup.procs"))
out["procs_via_pid1"] = err(lambda: write_procs("/proc/1/root" + target + "/cgroup.procs"))
def setns():
    fd = os.open("/proc/1/ns/cgroup", os.O_RDONLY)
    if libc.setns(fd, 0x02000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
out["setns"] = err(setns)
def unshare_mount():
    if libc.unshare(0x00020000) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
out["unshare_mount"] = err(unshare_mount)
def mount_cgroup2():
    os.makedirs("/tmp/sdcg", exist_ok=True)
    if libc.mount(b"cgroup2", b"/tmp/sdcg", b"cgroup2", ctypes.c_ulong(0), None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
out["mount_cgroup2"] = err(mount_cgroup2)
sys.path.insert(0, sys.argv[2])
from ocihook import bpfsys
def bpf_detach():  # the pinned program, detached from the run's own cgroup
    prog = bpfsys.obj_get(sys.argv[3] + "/prog_sd_connect4")
    bpfsys.prog_detach(prog, os.open("/sys/fs/cgroup/unified", os.O_RDONLY), bpfsys.CGROUP_INET4_CONNECT)
def errno_of(f):
    try:
        f(); return "ok"
    except bpfsys.BpfError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
out["bpf_detach"] = errno_of(bpf_detach)
out["bpffs"] = os.path.exists(sys.argv[3])
def bpf_load():  # BPF_PROG_LOAD of a trivial program: needs CAP_BPF
    insns = (ctypes.c_uint64 * 2)(0x00000000000000b7, 0x0000000000000095)  # r0 = 0; exit
    lic = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint64 * 16)()
    ctypes.memmove(attr, (ctypes.c_uint32 * 2)(8, 2), 8)  # prog_type=CGROUP_SKB, insn_cnt=2
    attr[1] = ctypes.addressof(insns); attr[2] = ctypes.addressof(lic)
    if libc.syscall(321, 5, attr, ctypes.sizeof(attr)) < 0:
        raise OSError(ctypes.get_errno(), "bpf")
out["bpf_load"] = err(bpf_load)
out["af_packet"] = err(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
out["raw_ip"] = err(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
def handle():  # open_by_handle_at needs CAP_DAC_READ_SEARCH
    if libc.open_by_handle_at(-100, ctypes.create_string_buffer(b"\x08\0\0\0\x01\0\0\0" + b"\0" * 8), 0) < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
out["open_by_handle"] = err(handle)
# what an apt-like step does
with open("/tmp/sdconfine-file", "w") as f:
    f.write("x")
out["chown"] = err(lambda: os.chown("/tmp/sdconfine-file", 65534, 65534))
os.unlink("/tmp/sdconfine-file")
def setuid_child():
    pid = os.fork()
    if pid == 0:
        os.setgid(65534); os.setuid(65534); os._exit(0 if os.getuid() == 65534 else 1)
    if os.waitpid(pid, 0)[1] != 0:
        raise OSError(errno.EPERM, "setuid")
out["setuid"] = err(setuid_child)
def subcgroup():
    os.makedirs("/sys/fs/cgroup/unified/step", exist_ok=True)
    write_procs("/sys/fs/cgroup/unified/step/cgroup.procs")
out["sub_cgroup"] = err(subcgroup)
out["cgroup_after"] = open("/proc/self/cgroup").read().strip().splitlines()[-1]
s = socket.socket(); s.settimeout(2)
out["denied_connect"] = err(lambda: s.connect(("127.0.0.2", 9)))
print("PROBE " + __import__("json").dumps(out))
'''


@pytest.fixture
def target():
    """A cgroup outside the run, as the escape target."""
    path = cgroup.create(f"escape-target-{secrets.token_hex(3)}")
    yield path
    cgroup.remove(path)


def _run(tmp_path, *args, policy=POLICY, cmd):
    pol = tmp_path / "p.yaml"
    pol.write_text(policy)
    return subprocess.run([*CLI, "run", "--policy", str(pol), *args, "--", *cmd], capture_output=True, text=True,
                          timeout=120)


def _probe(res) -> dict:
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line, (res.stdout, res.stderr)
    return json.loads(line[6:])


def test_run_cannot_leave_its_cgroup_and_deploy_steps_still_work(tmp_path, target):
    res = _run(tmp_path, cmd=[sys.executable, "-c", PROBE, target, str(REPO), loader.pin_dir()])
    out = _probe(res)
    assert res.returncode == 0, res.stderr
    assert out["cgroup"] == "0::/"                         # a cgroup namespace rooted at the run
    assert out["procs_target"] == "ENOENT"                 # the host's cgroups are not reachable by path
    assert out["procs_root"] == "ok"                       # "/" is the run's own cgroup: a no-op
    assert out["procs_via_pid1"] in ("EACCES", "EPERM")    # nor through another process's root
    assert out["setns"] in ("EACCES", "EPERM")
    assert out["unshare_mount"] == "EPERM" and out["mount_cgroup2"] == "EPERM"
    assert out["bpffs"] is False and out["bpf_detach"] == "ENOENT"   # pins are out of reach
    assert out["bpf_load"] == "EPERM"
    assert out["af_packet"] == "EPERM" and out["raw_ip"] == "EPERM"
    assert out["open_by_handle"] == "EPERM"
    assert out["chown"] == "ok" and out["setuid"] == "ok"  # apt-like steps work
    assert out["sub_cgroup"] == "ok" and out["cgroup_after"] == "0::/step"
    assert out["denied_connect"] == "EPERM"                # and the policy still holds
    assert cgroup.procs(target) == []                      # nothing arrived in the target
    assert "capabilities kept: none" in res.stderr
    report = Path(res.stderr.split("report: ")[1].split(" (")[0])
    summary = json.loads(report.read_text().splitlines()[-1])
    assert summary["capabilities_kept"] == [] and summary["blocked"] == 1


def test_clone3_into_another_cgroup_fails(tmp_path, target):
    require(subprocess.run(["which", "gcc"], capture_output=True).returncode == 0, "gcc not installed")
    src, exe = tmp_path / "clone3.c", tmp_path / "clone3"
    src.write_text(CLONE3)
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    outside = subprocess.run([str(exe), target], capture_output=True, text=True, timeout=30)
    assert "0::/" + os.path.relpath(target, cgroup.cgroup2_mount()) + "\n" in outside.stdout  # the helper works
    res = _run(tmp_path, cmd=["sh", "-c", f"{exe} {target}; {exe} /proc/1/root{target}"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "open No such file or directory", res.stdout
    assert res.stdout.splitlines()[1] in ("open Permission denied", "open Operation not permitted"), res.stdout
    assert "child-in" not in res.stdout and cgroup.procs(target) == []


def test_keep_cap_and_policy_capabilities_opt_back_in(tmp_path):
    code = textwrap.dedent("""
        import socket
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
        print("PACKET ok")
    """)
    res = _run(tmp_path, "--keep-cap", "net_raw", cmd=[sys.executable, "-c", code])
    assert res.returncode == 0 and "PACKET ok" in res.stdout, res.stderr
    assert "capabilities kept: CAP_NET_RAW" in res.stderr
    res = _run(tmp_path, policy=POLICY + "capabilities: [NET_RAW, CAP_SYS_PTRACE]\n",
               cmd=["grep", "CapBnd", "/proc/self/status"])
    bnd = int(res.stdout.split()[1], 16)
    assert bnd >> 13 & 1 and bnd >> 19 & 1 and not bnd >> 21 & 1          # NET_RAW, SYS_PTRACE kept; SYS_ADMIN not
    assert "capabilities kept: CAP_NET_RAW, CAP_SYS_PTRACE" in res.stderr
    bad = _run(tmp_path, "--keep-cap", "FLY", cmd=["true"])
    assert bad.returncode == 2 and "safedeploy: --keep-cap: unknown capability 'FLY'" in bad.stderr


def test_run_refuses_a_network_socket_as_stdio(tmp_path):
    """A connection opened outside the cgroup (inetd-style stdin) is never handed in; a
    pipe or an AF_UNIX socketpair is fine."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    try:
        res = subprocess.run([*CLI, "run", "--policy", str(pol), "--", "touch", str(tmp_path / "ran")],
                             stdin=conn.fileno(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and not (tmp_path / "ran").exists()
        assert res.stderr.startswith("safedeploy: stdin is a network socket, opened outside the cgroup"), res.stderr
        a, b = socket.socketpair()
        res = subprocess.run([*CLI, "run", "--policy", str(pol), "--", "touch", str(tmp_path / "ran")],
                             stdin=a.fileno(), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and (tmp_path / "ran").exists(), res.stderr
        a.close()
        b.close()
    finally:
        for s in (cli, conn, srv):
            s.close()


def test_a_run_inside_a_run_is_refused(tmp_path):
    """Even with SYS_ADMIN kept (needed to nest at all), an inner run would put a deeper
    policy, which would win, below the outer one: refused."""
    inner = tmp_path / "inner.yaml"
    inner.write_text("version: 1\nname: loose\ndefault: allow\n")
    res = _run(tmp_path, "--keep-cap", "SYS_ADMIN", cmd=[*CLI, "run", "--policy", str(inner), "--", "echo", "RAN"])
    assert "RAN" not in res.stdout
    assert "safedeploy: this process is already policed by run-" in res.stderr, res.stderr
