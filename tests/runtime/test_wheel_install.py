"""The wheel is complete (issue 14): built from the checkout, installed into a fresh venv,
then `safedeploy install`, `doctor`, `policy validate` and a policed podman container all
work with the checkout hidden (an empty tmpfs over it), and nothing installed names it."""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import zipfile
from pathlib import Path

from helpers import REPO, runtime_prereqs
from ocihook import report
from pkgbuild import build_wheel, clean_env, hidden_checkout
from rtutil import IMAGE, wait_poststop

POLICY = "version: 1\nname: wheeled\ndefault: allow\ndeny:\n  - {cidr: 127.0.0.2/32, reason: 'circular: auth'}\n"
DATA = {"ocihook/data/bpf/safedeploy.h", "ocihook/data/bpf/sock_addr.c", "ocihook/data/bpf/dns_skb.c",
        "ocihook/data/schemas/policy.schema.json", "ocihook/data/hooks_d/safedeploy-prestart.json",
        "ocihook/data/hooks_d/safedeploy-poststop.json", "ocihook/data/policies/example.yaml"}


def test_wheel_installs_and_polices_without_the_checkout(tmp_path, podman_image, request):
    runtime_prereqs("runc", "podman")
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert DATA <= names, DATA - names

    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True, cwd=tmp_path)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                         cwd=tmp_path, env=clean_env(), timeout=600)
    assert res.returncode == 0, res.stderr
    sd = str(venv / "bin" / "safedeploy")
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import ocihook, os; print(os.path.dirname(ocihook.__file__))"],
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env(), check=True).stdout.strip()
    assert site.startswith(str(venv)), site
    same = ("import importlib.resources as ir, os\n"
            "from ocihook import resources\n"
            "for name in resources.DATA:\n"
            "    assert str(ir.files('ocihook').joinpath('data', name)) == resources.path(name), name\n"
            "    assert os.listdir(resources.path(name)), name\n"
            "print(resources.installed())")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", same], capture_output=True, text=True, cwd=tmp_path,
                         env=clean_env())
    assert res.stdout.strip() == "True", res.stderr          # importlib.resources agrees with resources.path

    pol, log, state = tmp_path / "policies", tmp_path / "log", tmp_path / "state"
    bpffs = f"/sys/fs/bpf/sdwheel{secrets.token_hex(4)}"   # its own pins: compiled from the installed sources
    request.addfinalizer(lambda: shutil.rmtree(bpffs, ignore_errors=True))
    env = clean_env(SAFEDEPLOY_POLICY_DIR=str(pol), SAFEDEPLOY_LOG_DIR=str(log), SAFEDEPLOY_STATE_DIR=str(state),
                    SAFEDEPLOY_BPFFS=bpffs)
    hooks, launcher = tmp_path / "hooks.d", tmp_path / "libexec" / "safedeploy-hook"

    def run(*cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(hidden_checkout(list(cmd)), capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=timeout)

    inst = run(sd, "install", "--hooks-dir", str(hooks), "--hook-path", str(launcher))
    assert inst.returncode == 0, inst.stdout + inst.stderr
    assert "hook chain: hooks.d -> launcher -> python -> ocihook.hook runs" in inst.stdout
    for f in (launcher, *hooks.glob("*.json")):
        assert str(REPO) not in f.read_text(), f
    assert f"root={site.rsplit('/', 1)[0]}\n" in launcher.read_text()      # the venv's site-packages
    assert json.loads((hooks / "safedeploy-prestart.json").read_text())["hook"]["args"][3] == str(launcher)

    val = run(sd, "policy", "validate", str(pol / "example.yaml"))
    assert val.returncode == 0, val.stderr
    doctor = run(sd, "doctor", "--hooks-dir", str(hooks))
    assert doctor.returncode == 0 and "ok   bcc" in doctor.stdout, doctor.stdout
    assert f"ok   hooks.d: {hooks}: entry -> launcher -> python -> ocihook.hook runs" in doctor.stdout, doctor.stdout

    (pol / "wheeled.yaml").write_text(POLICY)
    name = f"sdwheel-{secrets.token_hex(4)}"
    ctr_env = dict(env, CONTAINERS_CONF=str(podman_image))
    ctr = subprocess.run(hidden_checkout(["podman", "--runtime", "runc", "--hooks-dir", str(hooks), "run", "--rm",
                                          "--name", name, "--network", "host", "--annotation",
                                          "safedeploy.policy=wheeled", IMAGE, "sh", "-c",
                                          "echo x | nc 127.0.0.2 80; echo a=$?"]),
                         capture_output=True, text=True, cwd=tmp_path, env=ctr_env, timeout=180)
    assert ctr.returncode == 0 and "a=1" in ctr.stdout and "Operation not permitted" in ctr.stderr, ctr.stderr
    reports = wait_poststop(log, state)
    assert len(reports) == 1
    blocked = [r for r in report.load(reports[0]) if r["verdict"] == "blocked"]
    assert [(r["dst_ip"], r["reason"]) for r in blocked] == [("127.0.0.2", "circular: auth")]
    out = run(sd, "uninstall", "--hooks-dir", str(hooks), "--hook-path", str(launcher))
    assert out.returncode == 0 and not launcher.exists() and not Path(bpffs).exists(), out.stdout + out.stderr
