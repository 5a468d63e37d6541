"""``safedeploy install | uninstall | gc``: put the hook where runtimes find it, take it
away again, and clean up after containers whose poststop never ran."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from . import cgroup, loader, settings
from .loader import BPF_DIR

PACKAGING = Path(BPF_DIR).parent / "packaging" / "hooks.d"
EXAMPLE_POLICY = Path(BPF_DIR).parent / "examples" / "policies" / "example.yaml"
DEFAULT_HOOKS_DIR = Path("/usr/share/containers/oci/hooks.d")
DEFAULT_HOOK_PATH = Path("/usr/local/libexec/safedeploy/safedeploy-hook")
HOOK_FILES = ("safedeploy-prestart.json", "safedeploy-poststop.json")


def hook_env() -> list[str]:
    """The environment baked into hooks.d (podman runs poststop with an empty one)."""
    return ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f"SAFEDEPLOY_POLICY_DIR={settings.policy_dir()}",
            f"SAFEDEPLOY_LOG_DIR={settings.log_dir()}",
            f"SAFEDEPLOY_STATE_DIR={settings.state_dir()}",
            f"SAFEDEPLOY_BPFFS={settings.bpffs_root()}",
            f"SAFEDEPLOY_FILE_DIRS={':'.join(settings.file_dirs())}"]


def render_hooks(hook_path: Path) -> dict[str, dict]:
    """The packaged hooks.d files with the real hook path and this environment."""
    out = {}
    for name in HOOK_FILES:
        doc = json.loads((PACKAGING / name).read_text())
        doc["hook"]["path"] = str(hook_path)
        doc["hook"]["env"] = hook_env()
        out[name] = doc
    return out


LAUNCHER = """#!/bin/sh
# safedeploy OCI hook launcher, written by `safedeploy install`.
# Python without site-packages (the warm path needs only the standard library; the hook
# turns site-packages on when it must validate a policy or compile programs).
if [ "$1" = poststop ]; then
    # Drain in the background, a moment later and at low priority: the runtime waits for
    # this process, not for the report, and its own teardown keeps the CPU meanwhile.
    # stdin (the OCI state) goes along through fd 3 (dash points a background job's stdin
    # at /dev/null otherwise); nothing keeps the runtime's stdout/stderr open.
    exec 3<&0
    (sleep 0.3; SAFEDEPLOY_DETACHED=1 exec setsid nice -n 19 {python} -S -E -c {code} "$@") \
        <&3 3<&- >/dev/null 2>&1 &
    exit 0
fi
exec {python} -S -E -c {code} "$@"
"""


def write_hook_wrapper(hook_path: Path) -> None:
    """The launcher the hooks.d files point at (see LAUNCHER)."""
    hook_path = Path(hook_path)
    pkg_root = Path(__file__).resolve().parent.parent
    code = f"import sys; sys.path.insert(0, {str(pkg_root)!r}); from ocihook.hook import main; main()"
    hook_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hook_path.with_name(f".{hook_path.name}.tmp")
    tmp.write_text(LAUNCHER.format(python=shlex.quote(sys.executable), code=shlex.quote(code)))
    tmp.chmod(0o755)
    os.replace(tmp, hook_path)


def install(hooks_dir: Path = DEFAULT_HOOKS_DIR, hook_path: Path = DEFAULT_HOOK_PATH,
            preload: bool = True, log=print) -> None:
    write_hook_wrapper(hook_path)
    log(f"hook: {hook_path}")
    hooks_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in render_hooks(hook_path).items():
        (hooks_dir / name).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"hooks.d: {hooks_dir / name}")
    pdir = Path(settings.policy_dir())
    pdir.mkdir(parents=True, exist_ok=True)
    example = pdir / "example.yaml"
    if not example.exists() and EXAMPLE_POLICY.exists():
        shutil.copyfile(EXAMPLE_POLICY, example)
        log(f"example policy: {example} (use --annotation safedeploy.policy=example)")
    for d in (settings.state_dir(), settings.log_dir()):
        Path(d).mkdir(parents=True, exist_ok=True)
    loader.ensure_bpffs()
    if preload:
        log(f"programs: {loader.ensure_programs(log=log)}")


def uninstall(hooks_dir: Path = DEFAULT_HOOKS_DIR, hook_path: Path = DEFAULT_HOOK_PATH, log=print) -> None:
    for name in HOOK_FILES:
        with contextlib.suppress(FileNotFoundError):
            (hooks_dir / name).unlink()
            log(f"removed {hooks_dir / name}")
    with contextlib.suppress(FileNotFoundError):
        hook_path.unlink()
        log(f"removed {hook_path}")
    gc(log=log, keep_current=False)
    root = Path(settings.bpffs_root())
    left = [v for v in root.iterdir() if v.is_dir()] if root.is_dir() else []
    if left:
        log(f"kept programs {', '.join(v.name for v in left)}: containers are still policed")
    elif root.is_dir():
        root.rmdir()
        log(f"removed {root}")


def _live_cgroup_ids() -> set[int]:
    ids = set()
    for root, _dirs, _files in os.walk(cgroup.cgroup2_mount()):
        with contextlib.suppress(OSError):
            ids.add(os.stat(root).st_ino)
    return ids


def _alive(rec: dict) -> bool:
    """Is the cgroup of a state record still there? Its recorded path first; when that
    is gone (or recorded in another mount namespace), a fresh walk of every cgroup."""
    with contextlib.suppress(OSError, KeyError, ValueError, TypeError):
        if os.stat(rec["cgroup"]).st_ino == int(rec["cgid"]):
            return True
    return int(rec["cgid"]) in _live_cgroup_ids()


def _abandoned_run(rec: dict) -> bool:
    """A `safedeploy run` that was killed before its cleanup: its process is gone and
    nothing runs in its cgroup any more (cgroup.events says unpopulated)."""
    if rec.get("kind") != "run":
        return False
    try:
        with open(f"/proc/{int(rec['pid'])}/cmdline", "rb") as f:
            cmd = f.read()
        if b"ocihook" in cmd or b"safedeploy" in cmd:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        with open(os.path.join(rec["cgroup"], "cgroup.events")) as f:
            return "populated 0" in f.read()
    except (OSError, KeyError, TypeError):
        return False


def gc(log=print, keep_current: bool = True) -> int:
    """Release runs and containers whose cgroup is gone (poststop never ran, or their
    report could not be written then), drop map entries that no live cgroup and no state
    file owns, and remove program versions nobody uses. Returns objects removed.

    Safe beside starting and stopping containers: a cgroup that is alive or has a state
    file is never touched; each stale one is judged right before it is released, and map
    entries are judged under the lock prestart and `run` hold while they register."""
    from . import hook  # noqa: PLC0415
    from .pinned import PinnedMaps  # noqa: PLC0415
    removed = 0
    cache = Path(settings.state_dir()) / "policy-cache"   # revalidated on next use: cheap to drop
    for entry in cache.glob("*.json") if cache.is_dir() else ():
        entry.unlink(missing_ok=True)
    sdir = Path(settings.state_dir())
    for path in sorted(sdir.glob("*.json")) if sdir.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            cid = rec["id"]
            int(rec["cgid"])
        except FileNotFoundError:
            continue  # its poststop finished meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            log(f"gc: unreadable state file {path} left alone")
            continue
        if _alive(rec):
            if not _abandoned_run(rec):
                continue
            for sub, _dirs, _files in os.walk(rec["cgroup"], topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(sub)  # only empty cgroups go: rmdir never kills (EBUSY when populated)
            if _alive(rec):
                continue
        try:
            report = hook.stop({"id": cid})
        except hook.HookError as e:
            log(f"gc: {cid}: {e}")
            continue
        if report:
            log(f"gc: released {cid} (cgroup gone); report {report}")
            removed += 1
    links = sdir / "cgids"
    for link in list(links.iterdir()) if links.is_dir() else []:
        if not link.exists() and link.name.isdigit() and int(link.name) not in _live_cgroup_ids():
            link.unlink(missing_ok=True)  # its state file is gone and so is its cgroup
            removed += 1
    root = Path(settings.bpffs_root())
    current = Path(loader.pin_dir())
    for ver in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        busy = 0
        if loader.is_pinned(ver):
            with PinnedMaps.open(ver) as maps, cgroup.locked(hook.lock_path()):
                owned = set(hook.state_records())   # read under the lock: nobody registers meanwhile
                live = _live_cgroup_ids()
                for cgid in maps.policed_cgroups():
                    if cgid in live or cgid in owned:
                        busy += 1
                        continue
                    removed += len(maps.drain_events(cgid)) + maps.unload_policy(cgid)
                    log(f"gc: dropped map entries of vanished cgroup {cgid} ({ver.name})")
        if busy or (ver == current and keep_current):
            continue
        with cgroup.locked(root):  # the loader's lock: never a version being compiled and pinned
            if not ver.exists():
                continue
            if loader.is_pinned(ver):
                with PinnedMaps.open(ver) as maps:
                    if maps.policed_cgroups():
                        continue  # policed since we looked
            shutil.rmtree(ver, ignore_errors=True)
        log(f"gc: removed unused program version {ver.name}")
        removed += 1
    return removed
