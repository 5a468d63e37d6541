"""Policed cgroups of a benchmark's own, for the scripts that apply policies (apply, connect,
throughput, dns): a throwaway pin root and state dir (Sandbox; the real
/sys/fs/bpf/safedeploy is never touched), temp_cgroup, run_in (one call in a cgroup).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ocihook import cgroup, compiler, loader, session
from _measure import progress


BPFFS = Path("/sys/fs/bpf")


@contextlib.contextmanager
def temp_cgroup(name: str):
    """A fresh cgroup <cgroup2>/safedeploy/<name>, removed on the way out."""
    path = Path(cgroup.create(name))
    try:
        yield path
    finally:
        cgroup.remove(path)


def remove_pin_root(root: Path) -> None:
    """Unlink every pin under root and rmdir the directories (only sdbench_* roots)."""
    if root.parent != BPFFS or not root.name.startswith("sdbench_"):
        raise RuntimeError(f"refusing to remove {root}")
    if not root.exists():
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(root)


def drained_events(out) -> list:
    """(EventKey, EventVal) pairs of session.release's session.Drained (None: none)."""
    return [] if out is None else list(out.events)


class Sandbox:
    """A throwaway pin root /sys/fs/bpf/sdbench_<pid> and state dir (the real
    /sys/fs/bpf/safedeploy is never touched), set in the environment for this process and
    its children, the programs compiled into it (unless compile=False), and every cgroup
    made through it; close() removes all."""

    def __init__(self, tag: str, compile: bool = True):
        self.tag = f"sdbench-{os.getpid()}-{tag}"
        self.root = BPFFS / f"sdbench_{os.getpid()}"
        self.state = Path(tempfile.mkdtemp(prefix="sdbench_state_"))
        os.environ["SAFEDEPLOY_BPFFS"] = str(self.root)  # read at call time
        os.environ["SAFEDEPLOY_STATE_DIR"] = str(self.state)
        self.cgroups: list[tuple[Path, object, dict | None]] = []
        self.pins = self.pin_version = None
        progress(f"pin root {self.root}, state dir {self.state}")
        if compile:
            try:
                self.compile()
            except BaseException:
                self.close()
                raise

    def compile(self) -> Path:
        """Compile and pin the programs (bcc, ~1 s) unless the current version is pinned."""
        progress("compiling the programs into the pin root (bcc, ~1 s) unless pinned")
        self.pins = Path(loader.ensure_programs())
        self.pin_version = self.pins.name
        return self.pins

    def cgroup(self, name: str, policy_text: str | None = None) -> tuple[Path, object, dict | None]:
        """A fresh cgroup <cgroup2>/safedeploy/<tag>-<name>, under policy_text if given."""
        from ocihook.policy import load_policy_text  # noqa: PLC0415 — apply.py times its first use

        path = Path(cgroup.create(f"{self.tag}-{name}"))
        att = compiled = None
        try:
            if policy_text is not None:
                compiled = compiler.compile_policy(load_policy_text(policy_text, f"bench-{name}"))
                att = session.apply(path, compiled)
        except BaseException:
            cgroup.remove(path)
            raise
        self.cgroups.append((path, att, compiled))
        return path, att, compiled

    def attached(self, path: Path) -> int:
        with loader.Programs(self.pins) as progs:
            return progs.attached_to(path)

    def release(self, path: Path) -> list:
        """Kill what runs in the cgroup, release its policy, remove it; the drained events."""
        for i, (p, att, compiled) in enumerate(self.cgroups):
            if p == path:
                del self.cgroups[i]
                try:
                    cgroup.remove(p)
                finally:
                    out = session.release(att, compiled) if att is not None else None
                return drained_events(out)
        return []

    def close(self) -> None:
        errors = []
        for path, _, _ in list(self.cgroups):
            try:
                self.release(path)
            except Exception as e:  # noqa: BLE001 — clean up the rest, then report
                errors.append(f"{path}: {e}")
        remove_pin_root(self.root)
        shutil.rmtree(self.state, ignore_errors=True)
        progress(f"removed {self.root}, {self.state} and the cgroups")
        if errors:
            raise SystemExit(f"bench: cleanup failed: {'; '.join(errors)}")


def run_in(path: Path, fn, *args):
    """cgroup.run_in, failing the benchmark loudly."""
    try:
        return cgroup.run_in(path, fn, *args)
    except RuntimeError as e:
        raise SystemExit(f"bench: {e}") from None
