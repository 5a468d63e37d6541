"""A hook that cannot run must refuse the container (issue 11, item 4): podman
skips a hooks.d entry whose path is missing, so the entry runs /bin/sh, which always exists,
and the launcher checks its python and package before it runs them."""
from __future__ import annotations

import secrets
import shutil
import subprocess
import sys

from ocihook import install, resources
from rtutil import IMAGE, podman

MARK = "container-ran"


def _run(hook, conf, annotated=True):
    ann = ["--annotation", "safedeploy.policy=example"] if annotated else []
    return podman("run", "--rm", "--name", f"sdmiss-{secrets.token_hex(4)}", "--network", "host", *ann,
                  IMAGE, "echo", MARK, conf=conf, hooks_dir=hook.dir)


def test_missing_launcher_or_package_refuses_annotated_containers(hook, podman_image, tmp_path):
    ok = _run(hook, podman_image)
    assert ok.returncode == 0 and MARK in ok.stdout, ok.stderr          # the chain works

    hook.path.unlink()                                                  # launcher gone
    res = _run(hook, podman_image)
    assert res.returncode != 0 and MARK not in res.stdout
    assert f"safedeploy: hook launcher {hook.path} is missing: refusing the container" in res.stderr
    problems = install.verify_chain(hook.dir)
    assert len(problems) == 2 and all(f"hook launcher {hook.path} is missing" in p for p in problems), problems
    doctor = subprocess.run([sys.executable, "-m", "ocihook.cli", "doctor", "--hooks-dir", str(hook.dir)],
                            capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 1 and f"FAIL hooks.d: {hook.dir}/safedeploy-prestart.json -> {hook.path}: exit 1: " \
        f"safedeploy: hook launcher {hook.path} is missing" in doctor.stdout, doctor.stdout

    # the package directory gone (a removed venv, a deleted checkout): the launcher says so
    root = tmp_path / "site"
    shutil.copytree(resources.PKG_DIR, root / "ocihook", ignore=shutil.ignore_patterns("__pycache__", "data"))
    for name in resources.DATA:                                         # laid out as a wheel installs it
        shutil.copytree(resources.path(name), root / "ocihook" / "data" / name)
    install.write_hook_wrapper(hook.path, root=str(root))
    assert _run(hook, podman_image).returncode == 0                     # a working copy runs
    shutil.rmtree(root / "ocihook")
    res = _run(hook, podman_image)
    assert res.returncode != 0 and MARK not in res.stdout
    assert f"safedeploy: hook launcher {hook.path}: " in res.stderr and f"{root}/ocihook is missing" in res.stderr

    # an importable-looking but broken package: the import error, one line, still refused
    (root / "ocihook").mkdir()
    (root / "ocihook" / "hook.py").write_text("raise ImportError('half-removed')\n")
    res = _run(hook, podman_image)
    assert res.returncode != 0 and MARK not in res.stdout
    assert f"safedeploy: cannot import the hook from {root}: ImportError: half-removed" in res.stderr

    # hooks.d matches every container (one created from a policed cgroup needs the hook too):
    # while the hook is broken, none starts; repaired, all do again
    unannotated = _run(hook, podman_image, annotated=False)
    assert unannotated.returncode != 0 and "safedeploy: cannot import the hook" in unannotated.stderr
    install.write_hook_wrapper(hook.path)
    assert install.verify_chain(hook.dir) == []
    for annotated in (False, True):
        res = _run(hook, podman_image, annotated=annotated)
        assert res.returncode == 0 and MARK in res.stdout, res.stderr
