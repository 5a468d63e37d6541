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

from . import cgroup, loader, resources, settings
from .errors import SafedeployError

HOOKS_TEMPLATES = Path(resources.path("hooks_d"))
EXAMPLE_POLICY = Path(resources.path("policies")) / "example.yaml"
DEFAULT_HOOKS_DIR = Path("/usr/share/containers/oci/hooks.d")
HOOK_FILES = ("safedeploy-prestart.json", "safedeploy-poststop.json")
DEB_PYTHON_ROOT = "/usr/lib/python3/dist-packages"
DEB_HOOK_PATH = Path("/usr/libexec/safedeploy/safedeploy-hook")
# the .deb's own launcher; any other install (wheel, checkout) puts it under /usr/local
DEFAULT_HOOK_PATH = (DEB_HOOK_PATH if resources.PKG_ROOT == DEB_PYTHON_ROOT
                     else Path("/usr/local/libexec/safedeploy/safedeploy-hook"))

# The hooks.d entry runs /bin/sh, which always exists: podman skips an entry whose `path` is
# missing, and a container that needed the policy would run unpoliced. If the launcher ($0)
# is gone the entry fails, and the runtime refuses the container with this line.
GUARD_SHELL = "/bin/sh"
GUARD = ('[ -x "$0" ] && exec "$0" "$@"; echo "safedeploy: hook launcher $0 is missing: refusing the '
         'container (reinstall safedeploy, or remove its hooks.d files)" >&2; exit 1')


class InstallError(SafedeployError):
    """The installed hook would not run; str() is one line."""


def hook_env() -> list[str]:
    """The environment baked into hooks.d (podman runs poststop with an empty one)."""
    return ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            f"SAFEDEPLOY_POLICY_DIR={settings.policy_dir()}",
            f"SAFEDEPLOY_LOG_DIR={settings.log_dir()}",
            f"SAFEDEPLOY_STATE_DIR={settings.state_dir()}",
            f"SAFEDEPLOY_BPFFS={settings.bpffs_root()}",
            f"SAFEDEPLOY_FILE_DIRS={':'.join(settings.file_dirs())}"]


def hook_args(hook_path, stage: str) -> list[str]:
    """argv of the hooks.d entry: the guard, then the launcher and the stage as $0 and $1."""
    return ["sh", "-c", GUARD, str(hook_path), stage]


def render_hooks(hook_path: Path) -> dict[str, dict]:
    """The packaged hooks.d files with the real hook path and this environment."""
    out = {}
    for name in HOOK_FILES:
        doc = json.loads((HOOKS_TEMPLATES / name).read_text())
        stage = doc["hook"]["args"][-1]
        doc["hook"]["path"] = GUARD_SHELL
        doc["hook"]["args"] = hook_args(hook_path, stage)
        doc["hook"]["env"] = hook_env()
        out[name] = doc
    return out


LAUNCHER = """#!/bin/sh
# safedeploy OCI hook launcher, written by `safedeploy install` (or shipped by the .deb).
# Python without site-packages (the warm path needs only the standard library; the hook
# turns site-packages on when it must validate a policy or compile programs).
py={python}
root={root}
code={code}
if [ ! -x "$py" ] || [ ! -f "$root/ocihook/hook.py" ]; then
    echo "safedeploy: hook launcher $0: $py or $root/ocihook is missing: refusing the container (reinstall safedeploy)" >&2
    exit 1
fi
if [ "$1" = poststop ]; then
    # Drain in the background, a moment later and at low priority: the runtime waits for
    # this process, not for the report, and its own teardown keeps the CPU meanwhile.
    # stdin (the OCI state) goes along through fd 3 (dash points a background job's stdin
    # at /dev/null otherwise); nothing keeps the runtime's stdout/stderr open.
    exec 3<&0
    (sleep 0.3; SAFEDEPLOY_DETACHED=1 exec setsid nice -n 19 "$py" -S -E -c "$code" "$@") \\
        <&3 3<&- >/dev/null 2>&1 &
    exit 0
fi
exec "$py" -S -E -c "$code" "$@"
"""

LAUNCHER_CODE = """import sys
sys.path.insert(0, {root!r})
try:
    from ocihook.hook import main
except Exception as e:
    sys.exit("safedeploy: cannot import the hook from %s: %s: %s" % (sys.path[0], type(e).__name__, e))
main()"""


def launcher_text(python: str = sys.executable, root: str = resources.PKG_ROOT) -> str:
    """The launcher for this package (``root`` holds ``ocihook/``) run by ``python``."""
    code = LAUNCHER_CODE.format(root=root)
    return LAUNCHER.format(python=shlex.quote(python), root=shlex.quote(root), code=shlex.quote(code))


def write_hook_wrapper(hook_path: Path, python: str = sys.executable, root: str = resources.PKG_ROOT) -> None:
    """The launcher the hooks.d files point at (see LAUNCHER)."""
    hook_path = Path(hook_path)
    hook_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hook_path.with_name(f".{hook_path.name}.tmp")
    tmp.write_text(launcher_text(python, root))
    tmp.chmod(0o755)
    os.replace(tmp, hook_path)


def write_hooks_d(hooks_dir: Path, hook_path: Path, log=print) -> None:
    hooks_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in render_hooks(hook_path).items():
        (hooks_dir / name).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"hooks.d: {hooks_dir / name}")


def verify_chain(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> list[str]:
    """Problems of the whole chain hooks.d entry -> guard -> launcher -> python -> package,
    found by running the prestart entry as the runtime would, on a container without the
    annotation (the hook must exit 0 at once and touch nothing). Empty: the chain works."""
    import subprocess  # noqa: PLC0415
    problems = []
    for name in HOOK_FILES:
        try:
            hook = json.loads((hooks_dir / name).read_text())["hook"]
            path, args = hook["path"], list(hook["args"])
            env = dict(e.split("=", 1) for e in hook.get("env") or [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{hooks_dir / name}: unreadable ({e.__class__.__name__}: {e})")
            continue
        if path != GUARD_SHELL or args[:3] != ["sh", "-c", GUARD] or len(args) != 5:
            problems.append(f"{hooks_dir / name}: not the fail-closed entry (if {path} went missing, podman "
                            "would skip it and run annotated containers unpoliced): rerun `safedeploy install`")
            continue
        if name != "safedeploy-prestart.json":   # poststop runs in the background: the launcher must be there
            if not os.access(args[3], os.X_OK):
                problems.append(f"{hooks_dir / name}: hook launcher {args[3]} is missing")
            continue
        try:
            res = subprocess.run(args, executable=path, input=b'{"id": "safedeploy-doctor-probe"}',
                                 capture_output=True, env=env, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            problems.append(f"{hooks_dir / name}: the hook did not run ({e})")
            continue
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip().splitlines()
            problems.append(f"{hooks_dir / name} -> {args[3]}: exit {res.returncode}: "
                            f"{err[-1] if err else 'no message'}")
    return problems


def install(hooks_dir: Path = DEFAULT_HOOKS_DIR, hook_path: Path = DEFAULT_HOOK_PATH,
            preload: bool = True, log=print) -> None:
    write_hook_wrapper(hook_path)
    log(f"hook: {hook_path}")
    write_hooks_d(hooks_dir, hook_path, log)
    problems = verify_chain(hooks_dir)
    if problems:
        raise InstallError(f"the installed hook does not run: {problems[0]}")
    log("hook chain: hooks.d -> launcher -> python -> ocihook.hook runs")
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
    retire(log=log)


def retire(log=print) -> None:
    """gc, then unpin every program version no container uses, the current one included
    (uninstall, package removal); the bpffs directory goes when nothing is left."""
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
                strays = maps.reap_strays()  # sets of starts killed before their header
                if strays:
                    removed += strays
                    log(f"gc: removed {strays} table sets nobody owns ({ver.name})")
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
