"""Build the wheel and the .deb once per test session (the same commands as `make dist` / `make deb`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def clean_env(**extra: str) -> dict:
    """The environment without anything that points back at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(extra)
    return env


def build_wheel(out: Path) -> Path:
    return build_wheel_from(REPO, out)


def build_deb(out: Path, wheel: Path, src: Path = REPO) -> Path:
    """`make deb` (packaging/deb/build.py of the tree ``src``) for an already built wheel."""
    res = subprocess.run([sys.executable, str(src / "packaging" / "deb" / "build.py"), "--wheel", str(wheel),
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    deb, = out.glob("safedeploy_*.deb")
    return deb


def hidden_checkout(cmd: list[str]) -> list[str]:
    """cmd in a private mount namespace where the checkout is an empty tmpfs: proof that
    nothing installed reaches back into it."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o size=1m safedeploy-hidden "{REPO}" && exec "$@"', "sh", *cmd]


def source_copy(dest: Path, version: str, bpf_note: str) -> Path:
    """A copy of the checkout as a newer release: another version number and changed
    kernel sources (so its programs are a new version beside the old)."""
    import re
    import shutil
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                              "__pycache__", ".pytest_cache", ".hypothesis"))
    for rel, pattern in (("pyproject.toml", r'^version = "[^"]+"'), ("ocihook/__init__.py", r'^__version__ = "[^"]+"')):
        text = (dest / rel).read_text()
        new = re.sub(pattern, pattern.split(" = ")[0].lstrip("^") + f' = "{version}"', text, count=1, flags=re.M)
        assert new != text, rel
        (dest / rel).write_text(new)
    with open(dest / "bpf" / "sock_addr.c", "a") as f:
        f.write(f"\n/* {bpf_note} */\n")
    return dest


def build_wheel_from(src: Path, out: Path) -> Path:
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=600, cwd=out)
    assert res.returncode == 0, res.stdout + res.stderr
    wheel, = out.glob("safedeploy-*.whl")
    return wheel
