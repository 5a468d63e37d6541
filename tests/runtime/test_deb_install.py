"""The Debian package (issue 14): `apt-get install ./safedeploy_*.deb` on a fresh bookworm
root (debootstrap, cached) gives a working `doctor`, `policy validate` and a policed podman
container through the package's own hook; an upgrade keeps running containers enforced while
new ones get the new programs and `gc` retires the old; remove/purge leave no hooks.d entry,
no pins and no state. No checkout on any path: the root is fresh, podman runs on the host in
a private mount namespace (the chroot's mounts and its own bpffs never reach the host)."""
from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

import pytest

from debroot import Namespace, fresh_root, remove_root
from helpers import runtime_prereqs
from pkgbuild import build_deb, build_wheel, build_wheel_from, source_copy
from rtutil import IMAGE

POLICY = "version: 1\nname: pkgtest\ndefault: allow\ndeny:\n  - {cidr: 127.0.0.2/32, reason: 'circular: auth'}\n"
PROBE = "echo x | nc 127.0.0.2 80; echo a=$?"
HOOKS_D = "usr/share/containers/oci/hooks.d"


@pytest.fixture
def deb_root(tmp_path, podman_image):     # the image first: podman's storage exists to be bound
    runtime_prereqs("runc", "podman")
    for tool in ("debootstrap", "unshare", "nsenter", "dpkg-deb"):
        assert shutil.which(tool), f"{tool} missing (packaging/setup-host.sh installs it)"
    root = fresh_root(tmp_path / "root")
    ns = Namespace(root)
    yield root, ns
    ns.run("sh", "-c", "podman rm -f -a --filter name=sddeb- >/dev/null 2>&1; true", check=False)
    ns.close()
    remove_root(root)   # ~0.5 GB; the namespace's mounts are not visible from here


def _shim_hooks(root: Path, dest: Path) -> Path:
    """podman runs on the host: the package's own hooks.d entries, each run inside the root
    (chroot ROOT, then exactly the entry's path and args)."""
    dest.mkdir()
    for f in sorted((root / HOOKS_D).glob("safedeploy-*.json")):
        doc = json.loads(f.read_text())
        doc["hook"]["args"] = ["chroot", str(root), doc["hook"]["path"], *doc["hook"]["args"][1:]]
        doc["hook"]["path"] = shutil.which("chroot")
        (dest / f.name).write_text(json.dumps(doc))
    return dest


def _podman(ns: Namespace, hooks: Path, conf: Path, *args: str, check=False):
    return ns.run("env", f"CONTAINERS_CONF={conf}", "podman", "--runtime", "runc", "--hooks-dir", str(hooks),
                  *args, check=check, timeout=240)


def _report(root: Path, cid: str, timeout: float = 30) -> list[dict]:
    path = root / "var/log/safedeploy" / f"{cid}.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.exists() and not (root / "run/safedeploy" / f"{cid}.json").exists()):
        assert time.monotonic() < deadline, f"no report {path}"
        time.sleep(0.1)
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def _pin_versions(ns: Namespace) -> set[str] | None:
    """Program versions pinned in the root's own bpffs (mounted in the namespace only); None:
    not even the directory."""
    res = ns.chroot("ls", "/sys/fs/bpf/safedeploy", check=False)
    return set(res.stdout.split()) if res.returncode == 0 else None


def test_deb_install_police_upgrade_remove_purge(deb_root, tmp_path, podman_image):
    root, ns = deb_root
    out1, out2 = tmp_path / "v1", tmp_path / "v2"
    out1.mkdir(), out2.mkdir()
    deb1 = build_deb(out1, build_wheel(out1))
    shutil.copy(deb1, root / "tmp")

    # -- install: nothing else, no checkout, Debian's own python3-* packages
    inst = ns.chroot("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb1.name}")
    assert "Setting up safedeploy (0.1.0-1)" in inst.stdout, inst.stdout[-2000:]
    assert (root / "usr/libexec/safedeploy/safedeploy-hook").exists()
    assert (root / "etc/safedeploy/policies/example.yaml").exists()
    conffiles = ns.chroot("dpkg-query", "-W", "-f=${Conffiles}", "safedeploy").stdout
    assert "/etc/safedeploy/policies/example.yaml" in conffiles and "/etc/logrotate.d/safedeploy" in conffiles
    for rel in ("lib/systemd/system/safedeploy.service", "usr/lib/tmpfiles.d/safedeploy.conf"):
        assert (root / rel).exists(), rel
    assert (root / "run/safedeploy").is_dir() and (root / "var/log/safedeploy").is_dir()

    val = ns.chroot("safedeploy", "policy", "validate", "/etc/safedeploy/policies/example.yaml", check=False)
    assert val.returncode == 0, val.stderr
    doctor = ns.chroot("safedeploy", "doctor", check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok   hooks.d: /usr/share/containers/oci/hooks.d: entry -> launcher -> python -> ocihook.hook runs" \
        in doctor.stdout, doctor.stdout

    # doctor follows the chain into the package: a broken install is a FAIL with the reason
    hook_py = root / "usr/lib/python3/dist-packages/ocihook/hook.py"
    hook_py.rename(hook_py.with_suffix(".moved"))
    broken = ns.chroot("safedeploy", "doctor", check=False)
    hook_py.with_suffix(".moved").rename(hook_py)
    assert broken.returncode == 1 and "FAIL hooks.d:" in broken.stdout and "ocihook is missing" in broken.stdout

    # -- a policed container through the package's hook, with no other step (no systemd in the
    # chroot to preload: the first container's hook compiles and pins the programs)
    assert _pin_versions(ns) is None
    (root / "etc/safedeploy/policies/pkgtest.yaml").write_text(POLICY)
    hooks = _shim_hooks(root, tmp_path / "hooks.d")
    ann = ("--network", "host", "--annotation", "safedeploy.policy=pkgtest", IMAGE)
    name = f"sddeb-{secrets.token_hex(4)}"
    ctr = _podman(ns, hooks, podman_image, "run", "--rm", "--name", name, *ann, "sh", "-c", PROBE)
    assert ctr.returncode == 0 and "a=1" in ctr.stdout and "Operation not permitted" in ctr.stderr, ctr.stderr
    deadline = time.monotonic() + 30                                # poststop drains in the background
    while not (cid := [p.stem for p in (root / "var/log/safedeploy").glob("*.jsonl")]):
        assert time.monotonic() < deadline, "no report"
        time.sleep(0.1)
    blocked = [r for r in _report(root, cid[0]) if r.get("verdict") == "blocked"]
    assert [(r["dst_ip"], r["reason"]) for r in blocked] == [("127.0.0.2", "circular: auth")]
    v1, = _pin_versions(ns)
    assert "ok   programs: pinned" in ns.chroot("safedeploy", "doctor").stdout

    # -- upgrade while a container runs
    old = f"sddeb-old-{secrets.token_hex(3)}"
    run = _podman(ns, hooks, podman_image, "run", "-d", "--name", old, *ann, "sleep", "600")
    assert run.returncode == 0, run.stderr
    old_id = run.stdout.strip()
    old_state = json.loads((root / "run/safedeploy" / f"{old_id}.json").read_text())
    assert old_state["attachment"]["pin_dir"].endswith(f"/{v1}")
    src2 = source_copy(tmp_path / "src2", "0.1.1", "release 0.1.1")
    deb2 = build_deb(out2, build_wheel_from(src2, out2), src=src2)
    shutil.copy(deb2, root / "tmp")
    up = ns.chroot("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb2.name}")
    assert "Unpacking safedeploy (0.1.1-1) over (0.1.0-1)" in up.stdout, up.stdout[-2000:]
    assert _pin_versions(ns) == {v1}
    pre = ns.chroot("safedeploy", "preload", timeout=600)  # safedeploy.service's job (postinst restarts it)
    v2 = (_pin_versions(ns) - {v1}).pop()
    assert pre.stdout.strip().endswith(f"programs: /sys/fs/bpf/safedeploy/{v2}"), pre.stdout
    still = _podman(ns, hooks, podman_image, "exec", old, "sh", "-c", PROBE)
    assert "a=1" in still.stdout and "Operation not permitted" in still.stderr, still.stdout + still.stderr
    new = f"sddeb-new-{secrets.token_hex(3)}"
    run = _podman(ns, hooks, podman_image, "run", "-d", "--name", new, *ann, "sleep", "600")
    assert run.returncode == 0, run.stderr
    new_id = run.stdout.strip()
    new_state = json.loads((root / "run/safedeploy" / f"{new_id}.json").read_text())
    assert new_state["attachment"]["pin_dir"].endswith(f"/{v2}")
    newer = _podman(ns, hooks, podman_image, "exec", new, "sh", "-c", PROBE)
    assert "a=1" in newer.stdout and "Operation not permitted" in newer.stderr
    gc = ns.chroot("safedeploy", "gc")
    assert _pin_versions(ns) == {v1, v2}, gc.stdout                # v1 still in use: kept
    _podman(ns, hooks, podman_image, "rm", "-f", "-t", "0", old, check=True)
    assert [r["dst_ip"] for r in _report(root, old_id) if r.get("verdict") == "blocked"] == ["127.0.0.2"]
    gc = ns.chroot("safedeploy", "gc")
    assert f"removed unused program version {v1}" in gc.stdout and _pin_versions(ns) == {v2}, gc.stdout
    _podman(ns, hooks, podman_image, "rm", "-f", "-t", "0", new, check=True)
    _report(root, new_id)

    # -- remove, then purge: no hooks.d entry, no pins, no state
    rm = ns.chroot("apt-get", "remove", "-y", "-q", "safedeploy")
    assert "containers annotated safedeploy.policy will now start UNPOLICED" in rm.stdout + rm.stderr
    assert not list((root / HOOKS_D).glob("safedeploy*"))
    assert not (root / "usr/libexec/safedeploy").exists()
    assert _pin_versions(ns) is None
    assert not list((root / "run/safedeploy").glob("*.json"))
    assert (root / "etc/safedeploy/policies/example.yaml").exists()  # conffiles stay until purge
    ns.chroot("apt-get", "purge", "-y", "-q", "safedeploy")
    for rel in ("etc/safedeploy", "var/log/safedeploy", "run/safedeploy", "usr/lib/python3/dist-packages/ocihook"):
        assert not (root / rel).exists(), (rel, [str(p) for p in (root / rel).rglob("*")][:10])
