"""Benchmark: what the OCI hook costs a container.

One run measures, with throwaway SAFEDEPLOY_STATE_DIR, SAFEDEPLOY_LOG_DIR and
SAFEDEPLOY_POLICY_DIR, a hooks.d and the launcher in a temp dir (``ocihook.install.install``,
so the environment is baked in as in a real install), and the normal pinned programs
(``$SAFEDEPLOY_BPFFS``, default ``/sys/fs/bpf/safedeploy``; compiled once if absent, never removed):

  hook     the installed launcher run as a runtime runs it (hook env only, OCI state on stdin):
           prestart on a real process (``sleep 60`` in a fresh cgroup ``<cgroup2>/safedeploy/
           sdbench-*``) and poststop after that cgroup is gone (runc runs poststop hooks after
           destroying the cgroup), warm: programs pinned, policy cached. 1 discarded warm-up
           + 30 pairs. Cold cache: prestart with ``$SAFEDEPLOY_STATE_DIR/policy-cache`` deleted
           first (the policy is validated, with site-packages, jsonschema and yaml), 5 samples.
  baseline ``python -S -E -c pass`` with the same interpreter, and the same behind a ``/bin/sh``
           launcher like the hook's, interleaved with the warm samples
  imports  ``-X importtime`` of one warm prestart and its poststop (the launcher's exact
           command line): top 10 modules by cumulative time
  runc     ``runc run`` of a busybox container running ``sh -c :``, bundle with the hook and the
           annotation ("hooked") vs a bundle without hooks ("plain"), fresh container id every
           time; 1 unmeasured warm-up of each, then 20 interleaved rounds (shuffled order)
  podman   ``podman --runtime runc --hooks-dir DIR run --rm --network host [--annotation
           safedeploy.policy=bench]``, same image, same script; 1 warm-up each, 20 rounds
  dummies  two more variants in both rounds: the same hooks (same stages, same annotation
           condition) pointing at ``/bin/true``, and at a launcher that only runs ``python -S -E
           -c pass``, to split the overhead into "the runtime runs two hooks", "they are Python"
           and "what safedeploy's hooks do"

Before measuring, one run of each runtime with the hook must print "Operation not permitted"
for ``nc 127.0.0.2 80`` (and one without must not); every measured hooked run must leave its
report (so poststop ran) and no state file.

Usage: .venv/bin/python bench/container.py   (root; cgroup v2, bpffs, runc, podman, busybox-static)
Progress goes to stderr, the table to stdout, everything to bench/results/container.json.
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import MsTable, begin, median, now_ns, print_table, progress, run_timed, write_results  # noqa: E402

from ocihook import cgroup, demo, install, loader, settings  # noqa: E402
from ocihook.hook import ANNOTATION  # noqa: E402
from ocihook.pinned import PinnedMaps  # noqa: E402

HOOK_SAMPLES = 30  # warm prestart/poststop pairs, after one discarded warm-up
COLD_SAMPLES = 5  # prestart with the policy cache deleted
PAIRS = 20  # interleaved hooked/plain container starts per runtime, after one warm-up of each
TOP_IMPORTS = 10
POSTSTOP_SAMPLES = 10  # poststop run in the foreground (the work a detaching launcher defers)
POSTSTOP_WAIT_S = 10.0  # how long a (detached) poststop may take to write its report
TARGET_PRESTART_MS = 60  # warm prestart, wall time including interpreter start
TARGET_PODMAN_RATIO = 1.15  # podman run with the annotation vs without (medians)

POLICY_NAME = "bench"
POLICY = "version: 1\nname: bench\ndefault: allow\ndeny: ['127.0.0.2']\n"
IMAGE = "localhost/safedeploy-bench-busybox:latest"
PROBE = "echo x | nc 127.0.0.2 80; echo a=$?"  # the honesty check: EPERM only under the policy
EPERM = "Operation not permitted"
PY = sys.executable
TRUE = Path(shutil.which("true") or "/bin/true")
TAG = f"sdbench-{os.getpid()}"


class Run:
    """Everything this run creates, so ``cleanup`` can take it all away again."""

    def __init__(self, work: Path):
        self.work = work
        self.hooks_dir = work / "hooks.d"
        self.hook_path = work / "bin" / "safedeploy-hook"
        self.noop_path = work / "bin" / "noop-hook"  # the launcher minus the hook: python -S -E -c pass
        self.noop_hooks_dir = work / "hooks-noop.d"  # the same hooks.d files, pointing at noop_path
        self.true_hooks_dir = work / "hooks-true.d"  # ... and pointing at /bin/true
        self.conf = work / "containers.conf"
        self.sleepers: list[subprocess.Popen] = []
        self.cgroups: list[Path] = []
        self.runc_ids: list[str] = []
        self.podman_names: list[str] = []
        self.image = False
        self.runc_leftovers = 0  # `runc run` containers still there after they exited
        self.counter = 0

    def name(self, kind: str) -> str:
        self.counter += 1
        return f"{TAG}-{kind}-{self.counter}"

    def podman_env(self) -> dict:
        return dict(os.environ, CONTAINERS_CONF=str(self.conf))


def run(args: list[str], *, env: dict | None = None, stdin: bytes | None = None,
        timeout: float = 60) -> tuple[subprocess.CompletedProcess, int]:
    """(completed process, wall ns); fails loudly on a non-zero exit."""
    proc, _, wall = run_timed(args, env=env, stdin=stdin, timeout=timeout)
    return proc, wall


def hook_env() -> dict:
    """Exactly the environment hooks.d gives the hook (runc passes nothing else)."""
    return dict(e.split("=", 1) for e in install.hook_env())


def hook_bundle(work: Path) -> Path:
    """A bundle for the bare hook cycles: only the config.json the prestart judges (the
    capabilities of `runc spec`, a cgroup namespace of its own), as runc would pass it."""
    bundle = work / "bundle-state"
    if not (bundle / "config.json").exists():
        bundle.mkdir(parents=True, exist_ok=True)
        caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
        cfg = {"ociVersion": "1.0.2",
               "process": {"capabilities": {k: caps for k in ("bounding", "effective", "permitted")}},
               "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]},
               "mounts": [], "annotations": {ANNOTATION: POLICY_NAME}}
        (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


def oci_state(cid: str, pid: int, status: str, bundle: Path) -> bytes:
    return json.dumps({"ociVersion": "1.0.2", "id": cid, "status": status, "pid": pid, "bundle": str(bundle),
                       "annotations": {ANNOTATION: POLICY_NAME}}).encode()


def reports() -> int:
    return len(list(Path(settings.log_dir()).glob("*.jsonl")))


def state_files() -> list[Path]:
    return sorted(Path(settings.state_dir()).glob("*.json"))


def wait_for_reports(want: int, timeout: float = POSTSTOP_WAIT_S) -> int:
    """Wait until `want` reports exist and no state file is left: a launcher may run the
    poststop work detached, after it returned to the runtime. The ns waited; fails loudly
    on timeout (poststop did not run)."""
    start = now_ns()
    while reports() < want or state_files():
        if now_ns() - start > timeout * 1e9:
            raise SystemExit(f"bench/container.py: {reports()} reports (want {want}) and state files "
                             f"{[p.name for p in state_files()]} {timeout} s after a poststop")
        time.sleep(0.002)
    return now_ns() - start


# -- 1. hook latency ---------------------------------------------------------------------------


def policed_process(r: Run, name: str) -> tuple[subprocess.Popen, Path]:
    """``sleep 60`` moved into a fresh cgroup <cgroup2>/safedeploy/<name>."""
    cg = Path(cgroup.create(name))
    r.cgroups.append(cg)
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    r.sleepers.append(proc)
    (cg / "cgroup.procs").write_text(str(proc.pid))
    return proc, cg


def end_process(r: Run, proc: subprocess.Popen, cg: Path) -> None:
    proc.kill()
    proc.wait()
    r.sleepers.remove(proc)
    cgroup.remove(cg)
    r.cgroups.remove(cg)


def hook_cycle(r: Run, cold: bool, check: bool, pre_argv: list[str] | None = None,
               post_argv: list[str] | None = None) -> dict:
    """One prestart on a live process, then (process killed, cgroup removed) one poststop;
    each runs as <argv> + [stage] when given, else through the launcher. Then (outside the
    timings) wait until the report is written and the state file is gone: a launcher may
    detach the poststop work and return to the runtime first."""
    env = hook_env()
    cid = r.name("hook")
    proc, cg = policed_process(r, cid)
    try:
        if cold:
            shutil.rmtree(Path(settings.state_dir(), "policy-cache"), ignore_errors=True)
        pre, t_pre = run((pre_argv or [str(r.hook_path)]) + ["prestart"], env=env,
                         stdin=oci_state(cid, proc.pid, "created", hook_bundle(r.work)))
        cgid = cgroup.cgroup_id(cg)
        if check:  # outside the timings: the hook really attached and cached
            with loader.Programs(loader.pin_dir()) as progs:
                if progs.attached_to(cg) != len(loader.PROGRAMS):
                    raise SystemExit(f"bench/container.py: prestart did not attach the programs to {cg}")
            if not list(Path(settings.state_dir(), "policy-cache").glob("*.json")):
                raise SystemExit("bench/container.py: prestart left no policy cache")
    finally:
        end_process(r, proc, cg)
    before = reports()
    post, t_post = run((post_argv or [str(r.hook_path)]) + ["poststop"], env=env,
                       stdin=oci_state(cid, 0, "stopped", hook_bundle(r.work)))
    detached = reports() == before
    t_done = t_post + wait_for_reports(before + 1)  # launch -> report written, state file gone
    if check:
        with PinnedMaps.open(loader.pin_dir()) as m:
            if m.entries_of(cgid):
                raise SystemExit(f"bench/container.py: poststop left map entries of {cid}")
    return {"prestart": t_pre, "poststop": t_post, "poststop_done": t_done, "detached": detached,
            "pre_stderr": pre.stderr.decode(errors="replace"), "post_stderr": post.stderr.decode(errors="replace")}


def launcher_argv(hook_path: Path) -> list[str]:
    """The interpreter command line the installed launcher execs in the foreground: its
    top-level ``exec <python> ... "$@"`` line, without the "$@"."""
    text = hook_path.read_text()
    vars_: dict[str, str] = {}  # the launcher's py=, root=, code= (a value may span lines)
    for m in re.finditer(r"^([a-z_]+)=", text, re.M):
        lex = shlex.shlex(text[m.end():], posix=True)
        lex.whitespace_split = True
        vars_[m.group(1)] = lex.get_token() or ""
    for line in text.splitlines():
        if line.startswith("exec ") and line.rstrip().endswith('"$@"'):
            words = shlex.split(line)[1:-1]
            return [vars_.get(w[1:], w) if w.startswith("$") else w for w in words]
    raise SystemExit(f"bench/container.py: no 'exec ... \"$@\"' line in {hook_path}")


def parse_importtime(stderr: str) -> list[dict]:
    """-X importtime lines -> [{module, depth, self_us, cumulative_us}] in import order."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        out.append({"module": name.strip(), "depth": (len(name) - len(name.lstrip()) - 1) // 2,
                    "self_us": int(self_us), "cumulative_us": int(cum_us)})
    return out


def install_dummies(r: Run) -> None:
    """A launcher like the hook's that only starts and stops the interpreter, and hooks.d
    files (same stages, same annotation condition) for it and for /bin/true."""
    r.noop_path.write_text(f"#!/bin/sh\nexec {shlex.quote(PY)} -S -E -c pass \"$@\"\n")
    r.noop_path.chmod(0o755)
    for hooks_dir, path in ((r.noop_hooks_dir, r.noop_path), (r.true_hooks_dir, TRUE)):
        hooks_dir.mkdir()
        for name, doc in install.render_hooks(path).items():
            (hooks_dir / name).write_text(json.dumps(doc, indent=2) + "\n")


def bench_hook(r: Run) -> dict:
    env = hook_env()
    progress("hook: warm-up (validates and caches the policy; not measured)")
    hook_cycle(r, cold=False, check=True)
    argv = launcher_argv(r.hook_path)
    out = {k: [] for k in ("prestart", "poststop", "poststop_done", "baseline", "baseline_sh", "poststop_fg",
                           "cold_prestart")}
    detached = []
    for i in range(HOOK_SAMPLES):
        progress(f"hook: warm sample {i + 1}/{HOOK_SAMPLES} (baselines 'python -S -E -c pass' and the same "
                 f"behind /bin/sh, then prestart + poststop through the launcher)")
        out["baseline"].append(run([PY, "-S", "-E", "-c", "pass"], env=env)[1])
        out["baseline_sh"].append(run([str(r.noop_path), "prestart"], env=env)[1])
        c = hook_cycle(r, cold=False, check=(i == 0))
        for k in ("prestart", "poststop", "poststop_done"):
            out[k].append(c[k])
        detached.append(c["detached"])
    for i in range(POSTSTOP_SAMPLES):
        progress(f"hook: poststop in the foreground {i + 1}/{POSTSTOP_SAMPLES} (the launcher's python command)")
        out["poststop_fg"].append(hook_cycle(r, cold=False, check=(i == 0), post_argv=argv)["poststop"])
    for i in range(COLD_SAMPLES):
        progress(f"hook: cold-cache prestart {i + 1}/{COLD_SAMPLES} (policy-cache deleted first)")
        out["cold_prestart"].append(hook_cycle(r, cold=True, check=(i == 0))["prestart"])
    progress("hook: -X importtime of one warm prestart + poststop (the launcher's command line + -X importtime)")
    timed_argv = [argv[0], "-X", "importtime", *argv[1:]]
    c = hook_cycle(r, cold=False, check=False, pre_argv=timed_argv, post_argv=timed_argv)
    imports = {"prestart": parse_importtime(c["pre_stderr"]), "poststop": parse_importtime(c["post_stderr"])}
    if not all(imports.values()):
        raise SystemExit("bench/container.py: -X importtime printed nothing")
    if len(set(detached)) != 1:
        progress(f"WARNING: the launcher detached {sum(detached)} of {len(detached)} poststops")
    return {**out, "poststop_detached": sum(detached), "importtime": imports,
            "importtime_wall": {"prestart": c["prestart"], "poststop": c["poststop"]}, "launcher": argv}


# -- 2. container start ------------------------------------------------------------------------


def runc_once(r: Run, bundle: Path) -> tuple[subprocess.CompletedProcess, int]:
    cid = r.name("runc")
    r.runc_ids.append(cid)
    proc, wall = run(["runc", "run", "--bundle", str(bundle), cid])
    # `runc run` (not detached) should destroy the container when its process exits: check
    # (outside the timing) and delete it if not
    if subprocess.run(["runc", "state", cid], capture_output=True).returncode == 0:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
        r.runc_leftovers += 1
    r.runc_ids.remove(cid)
    return proc, wall


def podman_once(r: Run, hooked: bool, script: str = ":", hooks_dir: Path | None = None
                ) -> tuple[subprocess.CompletedProcess, int]:
    name = r.name("podman")
    r.podman_names.append(name)
    ann = ["--annotation", f"{ANNOTATION}={POLICY_NAME}"] if hooked else []
    hooks_dir = hooks_dir or r.hooks_dir
    proc, wall = run(["podman", "--runtime", "runc", "--hooks-dir", str(hooks_dir), "run", "--rm",
                      "--network", "host", "--name", name, *ann, IMAGE, "sh", "-c", script],
                     env=r.podman_env(), timeout=120)
    if subprocess.run(["podman", "container", "exists", name], env=r.podman_env()).returncode == 0:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, env=r.podman_env())
    else:
        r.podman_names.remove(name)
    return proc, wall


def verify_policed(label: str, hooked_run, plain_run) -> dict:
    """The hooked container gets EPERM for 127.0.0.2, the plain one does not; a report says so."""
    before = reports()
    res = hooked_run()
    err = res.stderr.decode(errors="replace")
    if EPERM not in err or "a=1" not in res.stdout.decode():
        raise SystemExit(f"bench/container.py: {label} with the hook was not policed: "
                         f"stdout {res.stdout.decode()!r} stderr {err[-300:]!r}")
    wait_for_reports(before + 1)  # else: no report, poststop did not run
    plain = plain_run()
    plain_err = plain.stderr.decode(errors="replace")
    if EPERM in plain_err:
        raise SystemExit(f"bench/container.py: {label} without the hook got EPERM too: {plain_err[-300:]!r}")
    progress(f"{label}: verified: hooked nc -> {err.strip().splitlines()[-1]!r}; "
             f"plain nc -> {plain_err.strip().splitlines()[-1] if plain_err.strip() else '(no error)'!r}")
    return {"hooked_stderr": err.strip(), "plain_stderr": plain_err.strip()}


def rounds(label: str, variants: dict) -> dict:
    """1 unmeasured warm-up of each variant, then PAIRS rounds of one run each, in a
    shuffled order (seeded), so that no variant always runs right after the same other one.
    Every "hooked" run must add one report; the next run starts only once it is written
    (outside the timings), so a detached poststop's work never lands in another run's time.
    "report_after" is how long after the command returned that took."""
    progress(f"{label}: warm-up of each variant (not measured)")
    for n, fn in variants.items():
        before = reports()
        fn()
        wait_for_reports(before + (n == "hooked"))
    names = list(variants)
    rng = random.Random(f"{label} {PAIRS}")
    out = {n: [] for n in ["report_after", *names]}
    for i in range(PAIRS):
        order = rng.sample(names, len(names))
        progress(f"{label}: round {i + 1}/{PAIRS} ({', '.join(order)})")
        for n in order:
            before = reports()
            out[n].append(variants[n]()[1])
            waited = wait_for_reports(before + (n == "hooked"))
            if n == "hooked":
                out["report_after"].append(waited)
    return out


def bench_runc(r: Run, rootfs: Path) -> dict:
    env = install.hook_env()
    ann = {ANNOTATION: POLICY_NAME}
    hooked = demo.make_bundle(r.work / "bundle-hooked", rootfs, ":", annotations=ann, hook_path=r.hook_path,
                              hook_env=env)
    plain = demo.make_bundle(r.work / "bundle-plain", rootfs, ":")
    if "hooks" in json.loads((plain / "config.json").read_text()):
        raise SystemExit("bench/container.py: the plain bundle has hooks")
    probe_h = demo.make_bundle(r.work / "bundle-probe-hooked", rootfs, PROBE, annotations=ann,
                               hook_path=r.hook_path, hook_env=env)
    noop = demo.make_bundle(r.work / "bundle-noop", rootfs, ":", annotations=ann, hook_path=r.noop_path,
                            hook_env=env)
    true = demo.make_bundle(r.work / "bundle-true", rootfs, ":", annotations=ann, hook_path=TRUE, hook_env=env)
    probe_p = demo.make_bundle(r.work / "bundle-probe-plain", rootfs, PROBE)
    check = verify_policed("runc", lambda: runc_once(r, probe_h)[0], lambda: runc_once(r, probe_p)[0])
    out = rounds("runc run", {"hooked": lambda: runc_once(r, hooked), "plain": lambda: runc_once(r, plain),
                              "noop": lambda: runc_once(r, noop), "true": lambda: runc_once(r, true)})
    return {**out, "verify": check, "left_after_exit": r.runc_leftovers}


def bench_podman(r: Run, rootfs: Path) -> dict:
    r.conf.write_text(demo.CONTAINERS_CONF)  # podman's defaults without CAP_NET_RAW (the hook refuses it)
    progress(f"podman: importing {IMAGE}")
    demo.import_image(rootfs, IMAGE, r.podman_env())
    r.image = True
    check = verify_policed("podman", lambda: podman_once(r, True, PROBE)[0],
                           lambda: podman_once(r, False, PROBE)[0])
    out = rounds("podman run", {"hooked": lambda: podman_once(r, True), "plain": lambda: podman_once(r, False),
                                "noop": lambda: podman_once(r, True, hooks_dir=r.noop_hooks_dir),
                                "true": lambda: podman_once(r, True, hooks_dir=r.true_hooks_dir)})
    return {**out, "verify": check}


# -- cleanup, report -----------------------------------------------------------------------------


def cleanup(r: Run) -> None:
    """Take away everything the run made. Each step runs even if an earlier one failed (the
    first failure is reported), and the work dir always goes."""
    def processes():
        for proc in list(r.sleepers):
            proc.kill()
            proc.wait()

    def containers():
        for cid in r.runc_ids:
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
        for name in r.podman_names:
            subprocess.run(["podman", "rm", "-f", name], capture_output=True, env=r.podman_env())

    def poststops():
        deadline = time.monotonic() + POSTSTOP_WAIT_S
        while state_files() and time.monotonic() < deadline:  # detached poststops still at work
            time.sleep(0.05)
        for path in state_files():  # a hook that never got its poststop: release it like a runtime would
            if r.hook_path.exists():  # in the foreground, so that it is done before the files go
                subprocess.run([*launcher_argv(r.hook_path), "poststop"],
                               input=json.dumps({"id": path.stem}).encode(), capture_output=True, env=hook_env())

    def cgroups():
        for cg in list(r.cgroups):
            try:
                cgroup.remove(cg)
                r.cgroups.remove(cg)
            except cgroup.CgroupError as e:
                progress(f"cleanup: {e}")

    def image():
        if r.image:
            subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True, env=r.podman_env())

    failed = []
    for step in (processes, containers, poststops, cgroups, image):
        try:
            step()
        except Exception as e:  # noqa: BLE001 — clean up the rest, then report
            failed.append(f"{step.__name__}: {e.__class__.__name__}: {e}")
    shutil.rmtree(r.work, ignore_errors=True)
    progress(f"cleaned up: removed {r.work}; cgroups left {r.cgroups or 'none'}; runc ids deleted "
             f"{r.runc_ids or 'none'}; podman names removed {r.podman_names or 'none'}"
             + (f"; FAILED steps: {'; '.join(failed)}" if failed else ""))


def report(hook: dict, runc: dict, podman: dict) -> dict:
    t = MsTable()
    row = t.row
    base = row("hook.baseline", "baseline: python -S -E -c pass (wall)", hook["baseline"])
    base_sh = row("hook.baseline_sh", "baseline: same behind a /bin/sh launcher", hook["baseline_sh"],
                  "= hook minus its code")
    pre = row("hook.prestart", "hook prestart, warm (wall)", hook["prestart"], "launcher, 1-rule policy")
    detached = f"{hook['poststop_detached']}/{len(hook['poststop'])} detached"
    post = row("hook.poststop", "hook poststop, warm (wall)", hook["poststop"], f"runtime waits this; {detached}")
    row("hook.poststop_done", "  launch -> report written", hook["poststop_done"], "state file gone too")
    post_fg = row("hook.poststop_fg", "hook poststop work, foreground (wall)", hook["poststop_fg"],
                  "launcher's python command")
    both = [a + b for a, b in zip(hook["prestart"], hook["poststop"])]
    both_s = row("hook.both", "hook prestart + poststop (wall)", both, "what the runtime waits for")
    cold = row("hook.cold_prestart", "hook prestart, cold policy cache (wall)", hook["cold_prestart"],
               "validates: site, yaml, jsonschema")
    rc_h = row("runc.hooked", "runc run, hook + annotation (wall)", runc["hooked"])
    rc_p = row("runc.plain", "runc run, no hooks (wall)", runc["plain"])
    rc_d = row("runc.delta", "  paired difference", [h - p for h, p in zip(runc["hooked"], runc["plain"])])
    row("runc.report_after", "  report written after return", runc["report_after"])
    rc_t = row("runc.true", "runc run, /bin/true hooks (wall)", runc["true"], "2x /bin/true")
    rc_n = row("runc.noop", "runc run, no-op hooks (wall)", runc["noop"], "2x sh + python -S -E -c pass")
    pm_h = row("podman.hooked", "podman run, --annotation (wall)", podman["hooked"])
    pm_p = row("podman.plain", "podman run, no annotation (wall)", podman["plain"])
    pm_d = row("podman.delta", "  paired difference", [h - p for h, p in zip(podman["hooked"], podman["plain"])])
    row("podman.report_after", "  report written after return", podman["report_after"])
    pm_t = row("podman.true", "podman run, --annotation, /bin/true hooks", podman["true"], "2x /bin/true")
    pm_n = row("podman.noop", "podman run, --annotation, no-op hooks", podman["noop"],
               "2x sh + python -S -E -c pass")
    t.print()
    summaries = t.summaries

    tops, totals = {}, {}
    for stage, imports in hook["importtime"].items():
        tops[stage] = sorted(imports, key=lambda m: -m["cumulative_us"])[:TOP_IMPORTS]
        totals[stage] = sum(m["cumulative_us"] for m in imports if m["depth"] == 0) / 1000
        print()
        print(f"-X importtime of one warm {stage} ({len(imports)} modules imported, top-level total "
              f"{totals[stage]:.1f} ms; that run took {hook['importtime_wall'][stage] / 1e6:.1f} ms wall "
              f"with importtime on)")
        print_table([f"{stage}: top {TOP_IMPORTS} by cumulative", "depth", "self ms", "cumulative ms"],
                    [[m["module"], m["depth"], m["self_us"] / 1000, m["cumulative_us"] / 1000]
                     for m in tops[stage]])

    derived = {
        "prestart_over_baseline": pre["median"] / base["median"],
        "prestart_minus_baseline_ms": pre["median"] - base["median"],
        "prestart_minus_baseline_sh_ms": pre["median"] - base_sh["median"],
        "poststop_minus_baseline_sh_ms": post["median"] - base_sh["median"],
        "poststop_fg_minus_baseline_sh_ms": post_fg["median"] - base_sh["median"],
        "poststop_detached": hook["poststop_detached"],
        "cold_over_warm_prestart": cold["median"] / pre["median"],
        "imports_total_ms": totals,
        "runc_ratio": rc_h["median"] / rc_p["median"],
        "runc_delta_median_ms": rc_d["median"],
        "runc_true_minus_plain_ms": rc_t["median"] - rc_p["median"],
        "runc_noop_minus_true_ms": rc_n["median"] - rc_t["median"],
        "runc_noop_minus_plain_ms": rc_n["median"] - rc_p["median"],
        "runc_hooked_minus_noop_ms": rc_h["median"] - rc_n["median"],
        "podman_ratio": pm_h["median"] / pm_p["median"],
        "podman_pair_ratio_median": median([h / p for h, p in zip(podman["hooked"], podman["plain"])]),
        "runc_pair_ratio_median": median([h / p for h, p in zip(runc["hooked"], runc["plain"])]),
        "podman_delta_median_ms": pm_d["median"],
        "podman_true_minus_plain_ms": pm_t["median"] - pm_p["median"],
        "podman_noop_minus_true_ms": pm_n["median"] - pm_t["median"],
        "podman_noop_minus_plain_ms": pm_n["median"] - pm_p["median"],
        "podman_true_ratio": pm_t["median"] / pm_p["median"],
        "podman_hooked_minus_noop_ms": pm_h["median"] - pm_n["median"],
        "podman_noop_ratio": pm_n["median"] / pm_p["median"],
        "two_hooks_ms": both_s["median"],
        "launcher_start_ms": base_sh["median"],
        "prestart_target_ms": TARGET_PRESTART_MS,
        "prestart_meets_target": pre["median"] < TARGET_PRESTART_MS,
        "podman_target_ratio": TARGET_PODMAN_RATIO,
        "podman_meets_target": median([h / p for h, p in zip(podman["hooked"], podman["plain"])])
        <= TARGET_PODMAN_RATIO,
    }
    d = derived
    print()
    print(f"warm prestart / python -S -E -c pass:       {d['prestart_over_baseline']:.2f}x "
          f"(+{d['prestart_minus_baseline_ms']:.1f} ms)")
    print(f"cold-cache prestart / warm prestart:         {d['cold_over_warm_prestart']:.2f}x")
    print(f"runc run hooked / plain (medians):           {d['runc_ratio']:.3f}x "
          f"(paired difference median {d['runc_delta_median_ms']:+.1f} ms)")
    print(f"podman run annotated / plain (medians):      {d['podman_ratio']:.3f}x "
          f"(paired difference median {d['podman_delta_median_ms']:+.1f} ms)")
    print(f"  median of the per-round ratios:            {d['podman_pair_ratio_median']:.3f}x "
          f"(runc {d['runc_pair_ratio_median']:.3f}x; {len(podman['plain'])} rounds)")
    print(f"/bin/true hooks - plain (medians):           runc {d['runc_true_minus_plain_ms']:+.1f} ms, "
          f"podman {d['podman_true_minus_plain_ms']:+.1f} ms ({d['podman_true_ratio']:.3f}x)")
    print(f"no-op Python hooks - /bin/true hooks:        runc {d['runc_noop_minus_true_ms']:+.1f} ms, "
          f"podman {d['podman_noop_minus_true_ms']:+.1f} ms")
    print(f"no-op Python hooks - plain (medians):        runc {d['runc_noop_minus_plain_ms']:+.1f} ms, "
          f"podman {d['podman_noop_minus_plain_ms']:+.1f} ms ({d['podman_noop_ratio']:.3f}x)")
    print(f"safedeploy hooks - no-op hooks (medians):    runc {d['runc_hooked_minus_noop_ms']:+.1f} ms, "
          f"podman {d['podman_hooked_minus_noop_ms']:+.1f} ms")
    print(f"prestart + poststop (warm medians):          {d['two_hooks_ms']:.1f} ms waited for by the runtime; "
          f"a bare launcher start is {base_sh['median']:.1f} ms")
    print(f"poststop: the runtime waits {post['median']:.1f} ms ({d['poststop_detached']}/{post['n']} detached); "
          f"the work itself takes {post_fg['median']:.1f} ms in the foreground")
    verdict = "meets" if d["prestart_meets_target"] else "MISSES"
    print(f"warm prestart median {pre['median']:.1f} ms {verdict} the < {TARGET_PRESTART_MS} ms target")
    verdict = "meets" if d["podman_meets_target"] else "MISSES"
    print(f"podman run with the annotation {100 * (d['podman_pair_ratio_median'] - 1):+.1f}% (median of the "
          f"per-round ratios) {verdict} the <= +{100 * (TARGET_PODMAN_RATIO - 1):.0f}% target")
    return {"summary_ms": summaries, "derived": derived, "importtime_top": tops}


def main() -> int:
    begin("container.py", "cgroups, bpf, runc, podman")
    for tool in ("runc", "podman"):
        if not shutil.which(tool):
            raise SystemExit(f"bench/container.py: {tool} is not installed")
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="sdbench_container_"))
    for var, sub in (("SAFEDEPLOY_STATE_DIR", "state"), ("SAFEDEPLOY_LOG_DIR", "log"),
                     ("SAFEDEPLOY_POLICY_DIR", "policies")):
        os.environ[var] = str(work / sub)  # read at call time; baked into the hooks by install()
    r = Run(work)
    progress(f"work dir {work}; programs {settings.bpffs_root()} (kept)")
    try:
        try:
            install.install(r.hooks_dir, r.hook_path, preload=True, log=lambda m: progress(f"install: {m}"))
        except (loader.LoaderError, OSError) as e:  # e.g. the BPF sources do not load right now
            raise SystemExit(f"bench/container.py: cannot install the hook: {e}") from None
        Path(settings.policy_dir(), f"{POLICY_NAME}.yaml").write_text(POLICY)
        install_dummies(r)
        pin_version = loader.source_hash()
        rootfs = demo.make_rootfs(work / "rootfs")
        hook = bench_hook(r)
        runc = bench_runc(r, rootfs)
        podman = bench_podman(r, rootfs)
        left = state_files()
        if left:
            raise SystemExit(f"bench/container.py: hooks left state files: {[p.name for p in left]}")
        if loader.source_hash() != pin_version:
            progress("WARNING: the BPF sources changed during the run (a hook may have compiled)")
    finally:
        cleanup(r)
    elapsed = time.monotonic() - t_start
    results = report(hook, runc, podman)
    raw = {"hook": {k: v for k, v in hook.items() if k != "importtime"}, "runc": runc, "podman": podman}
    path = write_results("container", {
        "pin_version": pin_version, "bpffs_root": str(settings.bpffs_root()), "elapsed_s": elapsed,
        "policy": POLICY, "samples_ns": raw, "importtime": hook["importtime"], **results})
    progress(f"results in {path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
