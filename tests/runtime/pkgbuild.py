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
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                         capture_output=True, text=True, timeout=600, cwd=out)
    assert res.returncode == 0, res.stdout + res.stderr
    wheel, = out.glob("safedeploy-*.whl")
    return wheel


def build_deb(out: Path, wheel: Path) -> Path:
    res = subprocess.run([sys.executable, str(REPO / "packaging" / "deb" / "build.py"), "--wheel", str(wheel),
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    deb, = out.glob("safedeploy_*.deb")
    return deb


def hidden_checkout(cmd: list[str]) -> list[str]:
    """cmd in a private mount namespace where the checkout is an empty tmpfs: proof that
    nothing installed reaches back into it."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o size=1m safedeploy-hidden "{REPO}" && exec "$@"', "sh", *cmd]
