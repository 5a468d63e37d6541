#!/usr/bin/env python3
"""Build safedeploy_<version>_all.deb with dpkg-deb from the wheel (`make deb`).

The package holds the wheel's files under /usr/lib/python3/dist-packages (Debian's python3
finds them; bcc, jsonschema, yaml, typer and dnslib come from Debian packages), the
`safedeploy` command, the hook launcher in /usr/libexec/safedeploy, the fail-closed hooks.d
entries, /etc/safedeploy/policies (conffiles), tmpfiles.d, logrotate and a systemd unit.

Usage: packaging/deb/build.py [--wheel FILE] [--out DIR] [--revision N]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PYROOT = "usr/lib/python3/dist-packages"
HOOK = "usr/libexec/safedeploy/safedeploy-hook"
HOOKS_D = "usr/share/containers/oci/hooks.d"
CLI = """#!/usr/bin/python3
import sys

from ocihook.cli import main

sys.exit(main())
"""


def build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)], check=True)
    return next(out.glob("safedeploy-*.whl"))


def put(root: Path, rel: str, text: str | bytes, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    path.chmod(mode)


def stage(root: Path, wheel: Path) -> str:
    """Lay the package out under root; returns the upstream version."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/RECORD"):
                continue
            put(root, f"{PYROOT}/{name}", zf.read(name))
    pkg = root / PYROOT
    # the launcher and the hooks.d files come from the package being shipped, rendered for
    # the installed paths, with the default environment
    code = f"""
import json, os, sys
for var in ("SAFEDEPLOY_POLICY_DIR", "SAFEDEPLOY_LOG_DIR", "SAFEDEPLOY_STATE_DIR", "SAFEDEPLOY_BPFFS"):
    os.environ.pop(var, None)
sys.path.insert(0, {str(pkg)!r})
from ocihook import __version__, install
print(json.dumps({{"version": __version__,
                  "launcher": install.launcher_text("/usr/bin/python3", "/{PYROOT}"),
                  "hooks": install.render_hooks("/{HOOK}")}}))
"""
    out = json.loads(subprocess.run([sys.executable, "-S", "-c", code], check=True, capture_output=True,
                                    text=True).stdout)
    put(root, HOOK, out["launcher"], 0o755)
    for name, doc in out["hooks"].items():
        put(root, f"{HOOKS_D}/{name}", json.dumps(doc, indent=2) + "\n")
    put(root, "usr/bin/safedeploy", CLI, 0o755)
    for policy in sorted((pkg / "ocihook/data/policies").glob("*.yaml")):
        put(root, f"etc/safedeploy/policies/{policy.name}" if policy.name == "example.yaml"
            else f"usr/share/doc/safedeploy/examples/{policy.name}", policy.read_bytes())
    put(root, "lib/systemd/system/safedeploy.service", (HERE / "safedeploy.service").read_text())
    put(root, "usr/lib/tmpfiles.d/safedeploy.conf", (HERE / "tmpfiles.conf").read_text())
    put(root, "etc/logrotate.d/safedeploy", (HERE / "logrotate").read_text())
    put(root, "usr/share/doc/safedeploy/README.md", (REPO / "README.md").read_bytes())
    put(root, "usr/share/doc/safedeploy/copyright",
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: safedeploy\n\nFiles: *\nCopyright: safedeploy developers\nLicense: see upstream\n")
    return out["version"]


def control(root: Path, version: str) -> None:
    deb = root / "DEBIAN"
    deb.mkdir()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and deb not in p.parents) // 1024 + 1
    text = (HERE / "control.in").read_text().replace("@VERSION@", version).replace("@SIZE@", str(size))
    put(root, "DEBIAN/control", text)
    conffiles = sorted("/" + str(p.relative_to(root)) for p in (root / "etc").rglob("*") if p.is_file())
    put(root, "DEBIAN/conffiles", "".join(f"{c}\n" for c in conffiles))
    for script in ("postinst", "prerm", "postrm"):
        put(root, f"DEBIAN/{script}", (HERE / script).read_text(), 0o755)
    sums = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and deb not in p.parents and not str(p.relative_to(root)).startswith("etc/"):
            sums.append(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.relative_to(root)}\n")
    put(root, "DEBIAN/md5sums", "".join(sums))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", type=Path, help="the wheel to package (default: build one)")
    ap.add_argument("--out", type=Path, default=REPO / "dist")
    ap.add_argument("--revision", default="1", help="Debian revision")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or build_wheel(Path(tmp))
        root = Path(tmp) / "root"
        version = f"{stage(root, wheel)}-{args.revision}"
        control(root, version)
        for d in root.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)
        deb = args.out / f"safedeploy_{version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)], check=True,
                       stdout=subprocess.DEVNULL)
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
