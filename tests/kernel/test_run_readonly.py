"""A root command in `safedeploy run` cannot rewrite safedeploy's own state, policies, reports
or code (ocihook.confine.make_readonly): each write fails with EROFS and the host's files are
unchanged, while the command still writes elsewhere and the run's report is still written.
Real kernel, real CLI."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from ocihook import report, resources

CLI = [sys.executable, "-m", "ocihook.cli"]
POLICY = "version: 1\nname: readonly\ndefault: allow\n"

PROBE = r'''
import errno, json, os, sys
def err(f):
    try:
        f(); return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def write(path, mode="w"):
    with open(path, mode) as f:
        f.write("attacker")
out, others = {}, {}
for name, path in json.loads(sys.argv[1]).items():
    out[name] = err(lambda: write(path))
    if len(sys.argv) > 3 and os.path.exists(path):   # the other ways to change a file there
        others[name] = sorted({err(lambda: os.unlink(path)), err(lambda: os.rename(path, path + ".x")),
                               err(lambda: os.chmod(path, 0o777)), err(lambda: os.truncate(path, 0)),
                               err(lambda: os.symlink("/etc/passwd", path + ".l")),
                               err(lambda: os.mkdir(os.path.join(os.path.dirname(path), ".sd-dir")))})
out["elsewhere"] = err(lambda: write(sys.argv[2]))
if len(sys.argv) > 3:                                 # and undoing the read-only view
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def call(rc):
        return errno.errorcode.get(ctypes.get_errno(), "?") if rc else "ok"
    out["remount"] = call(libc.mount(None, sys.argv[3].encode(), None, 0x20 | 0x1000, None))  # MS_REMOUNT|MS_BIND, rw
    out["umount"] = call(libc.umount2(sys.argv[3].encode(), 2))                               # MNT_DETACH
    out["unshare"] = call(libc.unshare(0x00020000))                                           # CLONE_NEWNS
print("PROBE " + json.dumps(out))
print("OTHERS " + json.dumps(others))
'''


def test_root_run_cannot_rewrite_safedeploy_state_policies_or_code(tmp_path):
    assert os.geteuid() == 0
    tag = secrets.token_hex(4)
    state, policies, logs = (Path(os.environ[v]) for v in
                             ("SAFEDEPLOY_STATE_DIR", "SAFEDEPLOY_POLICY_DIR", "SAFEDEPLOY_LOG_DIR"))
    cached = state / "policy-cache" / f"{tag}.json"
    # the code: a checkout's root (the launcher puts it first on sys.path), or, installed, the
    # package directory only (not the site-packages around it, which apt/pip in a run write)
    code = Path(resources.PKG_DIR if resources.installed() else resources.PKG_ROOT)
    victims = {
        "policy_cache": cached,
        "source_hash": state / ".source-hash-probe",
        "policy": policies / "deploy.yaml",
        "log": logs / f"old-{tag}.jsonl",
        "pkg_root": code / f".sd-readonly-{tag}",
        "pkg_dir": Path(resources.PKG_DIR) / f"_sd_readonly_{tag}.py",
    }
    for p in victims.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("original")
    attempts = {name: str(p) for name, p in victims.items()}
    attempts["state_new"] = str(state / f"new-{tag}")                  # creating files fails too
    attempts["pkg_new"] = str(code / f".sd-new-{tag}")
    elsewhere = tmp_path / "elsewhere.txt"
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    try:
        res = subprocess.run([*CLI, "run", "--policy", str(pol), "--", sys.executable, "-c", PROBE,
                              json.dumps(attempts), str(elsewhere), str(state)], capture_output=True, text=True,
                             timeout=120)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")), None)
        assert res.returncode == 0 and line, (res.stdout, res.stderr)
        out = json.loads(line[6:])
        others = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("OTHERS "))[7:])
        tries = {k: v for k, v in out.items() if k not in ("elsewhere", "remount", "umount", "unshare")}
        assert tries == {k: "EROFS" for k in attempts}, out
        assert others and all(v == ["EROFS"] for v in others.values()), others   # unlink, rename, chmod...
        assert (out["remount"], out["umount"], out["unshare"]) == ("EPERM", "EPERM", "EPERM"), out
        assert out["elsewhere"] == "ok" and elsewhere.read_text() == "attacker"
        assert all(p.read_text() == "original" for p in victims.values())
        assert not Path(attempts["state_new"]).exists() and not Path(attempts["pkg_new"]).exists()
        # the report (written by safedeploy outside the run's namespace) is in the read-only log dir
        written = list(logs.glob("run-*.jsonl"))
        assert len(written) == 1 and report.load_summary(written[0])["capabilities_kept"] == []
        # nothing leaked back to the host: the same directories are writable here
        for d in (state, policies, logs, code):
            probe = d / f".sd-host-{tag}"
            probe.write_text("x")
            probe.unlink()
    finally:
        for p in (*victims.values(), Path(attempts["pkg_new"])):   # also what a failing run made
            for q in (p, Path(f"{p}.x"), Path(f"{p}.l")):
                q.unlink(missing_ok=True)
            if (p.parent / ".sd-dir").is_dir():
                (p.parent / ".sd-dir").rmdir()


def test_kept_sys_admin_leaves_them_writable(tmp_path):
    """SYS_ADMIN kept (podman in a run: its hook writes the state dir) could unmount any
    read-only view anyway: none is made."""
    state = Path(os.environ["SAFEDEPLOY_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    target = state / f"kept-{secrets.token_hex(3)}"
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    res = subprocess.run([*CLI, "run", "--policy", str(pol), "--keep-cap", "SYS_ADMIN", "--", sys.executable, "-c",
                          PROBE, json.dumps({"state": str(target)}), str(tmp_path / "e")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert '"state": "ok"' in res.stdout and target.read_text() == "attacker"
