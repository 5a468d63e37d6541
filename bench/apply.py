"""Benchmark: what it costs to put a cgroup under a policy.

One run measures, all against a throwaway pin root ``/sys/fs/bpf/sdbench_<pid>`` (removed at
the end; the real ``/sys/fs/bpf/safedeploy`` is never touched):

  cold     first compile + pin of the programs, in a fresh interpreter per sample (so the
           bcc import is counted), pins removed before every sample
  warm     session.apply / session.release in this process, pins present, a fresh cgroup
           per sample, policies of 1, 100 and 10 000 CIDR rules (map entries only, no traffic)
  fresh    what an OCI prestart hook pays: a fresh interpreter that imports only the warm path,
           reloads a cached policy and applies it (wall time, interpreter start included);
           it must not import bcc
  shared   1-rule apply/release while another cgroup holds the 10 000-rule policy (the maps
           are shared by every policed cgroup)
  baseline a bare ``python -c pass`` (and ``python -S -c pass``) with the same interpreter,
           interleaved with "fresh"

Children get an up-to-date bytecode cache (PYTHONPYCACHEPREFIX in the throwaway state dir,
primed once) like an installed hook, whatever PYTHONDONTWRITEBYTECODE says.

Usage: .venv/bin/python bench/apply.py     (root; cgroup v2, bpffs, bcc)
Progress goes to stderr, the table to stdout, everything to bench/results/apply.json.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import now_ns, print_table, progress, summary_ms, timed, write_results  # noqa: E402

from ocihook import cgroup, loader, maps, session  # noqa: E402
from ocihook.policy import load_policy_text  # noqa: E402

COLD_SAMPLES = 3
WARM_SAMPLES = 20  # per policy size, after one discarded warm-up
PARSE_SAMPLES = 3  # load_policy_text per policy size
FRESH_SAMPLES = 20  # fresh-interpreter applies, each paired with a baseline interpreter start
RULE_COUNTS = (1, 100, 10_000)
TARGET_FRESH_MS = 60  # warm prestart, wall time including interpreter start

BPFFS = Path("/sys/fs/bpf")
PY = sys.executable

# A cold sample: import bcc and compile + pin into the (empty) pin root.
COLD_CHILD = r"""
import time
t0 = time.perf_counter_ns()
import json, sys
from ocihook import loader
t1 = time.perf_counter_ns()
if loader.is_pinned(loader.pin_dir()):
    sys.exit("cold sample: programs are already pinned")
import bcc
t2 = time.perf_counter_ns()
loader.ensure_programs()
t3 = time.perf_counter_ns()
print(json.dumps({"t0": t0, "import_ocihook": t1 - t0, "import_bcc": t2 - t1, "compile_pin": t3 - t2}))
"""

# A warm prestart: only what the hook needs, a cached (normalised) policy, one apply.
WARM_CHILD = r"""
import time
t0 = time.perf_counter_ns()
import json, sys
from pathlib import Path
from ocihook import session
from ocihook.policy import load_policy_trusted
t1 = time.perf_counter_ns()
att = session.apply(Path(sys.argv[1]), load_policy_trusted(sys.argv[2], "bench"))
t2 = time.perf_counter_ns()
bcc = sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc."))
if bcc:
    sys.exit(f"FAIL: the warm path imported bcc: {bcc}")
heavy = [m for m in ("jsonschema", "yaml", "typer", "pyroute2", "dnslib") if m in sys.modules]
print(json.dumps({"t0": t0, "imports": t1 - t0, "apply": t2 - t1, "heavy": heavy,
                  "modules": len(sys.modules)}), flush=True)
"""

# Compiles (into PYTHONPYCACHEPREFIX) every module the children import.
PRIME_CHILD = "import json, bcc; from ocihook import loader, session, policy"


def run_child(args: list[str]) -> tuple[dict | None, int, int]:
    """Run a child interpreter; (its JSON line or None, start ns, wall ns). Fails loudly."""
    start = now_ns()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = now_ns() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"bench/apply.py: child failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    out = proc.stdout.strip()
    return (json.loads(out.splitlines()[-1]) if out else None), start, wall


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


def rules(n) -> str:
    return f"{int(n):,} rule" + ("" if int(n) == 1 else "s")


def policy_text(n: int) -> str:
    """n CIDR rules: 127.0.0.0/8, then distinct /24s inside 10.0.0.0/8."""
    allow = ["127.0.0.0/8"] + [f"10.{i >> 8}.{i & 255}.0/24" for i in range(n - 1)]
    return json.dumps({"version": 1, "name": f"bench-{n}", "mode": "enforce", "default": "deny", "allow": allow})


# -- the steps -------------------------------------------------------------------------------


def bench_cold(root: Path) -> dict:
    walls, interp, imp_oci, imp_bcc, compile_pin = [], [], [], [], []
    for i in range(COLD_SAMPLES):
        progress(f"cold compile+pin: sample {i + 1}/{COLD_SAMPLES} (fresh interpreter, bcc)")
        remove_pin_root(root)
        out, start, wall = run_child([PY, "-c", COLD_CHILD])
        walls.append(wall)
        interp.append(out["t0"] - start)
        imp_oci.append(out["import_ocihook"])
        imp_bcc.append(out["import_bcc"])
        compile_pin.append(out["compile_pin"])
    if not loader.is_pinned(loader.pin_dir()):
        raise SystemExit("bench/apply.py: cold samples left no pins behind")
    return {"wall": walls, "interpreter_start": interp, "import_ocihook": imp_oci, "import_bcc": imp_bcc,
            "compile_pin": compile_pin}


def apply_release_once(name: str, policy, check: bool) -> tuple[int, int]:
    """Fresh cgroup, apply, release, remove; (apply ns, release ns)."""
    cg = cgroup.create(name)
    try:
        att, t_apply = timed(session.apply, cg, policy)
        try:
            if check:  # prove the apply did something (outside the timings)
                with loader.Programs(att.pin_dir) as progs:
                    if progs.attached_to(cg) != len(loader.PROGRAMS):
                        raise SystemExit(f"bench/apply.py: programs not attached to {cg}")
        finally:
            _, t_release = timed(session.release, att)
        if check:
            with maps.PinnedMaps.open(att.pin_dir) as m:
                if m.entries_of(att.cgid):
                    raise SystemExit(f"bench/apply.py: release left map entries of {cg}")
        return t_apply, t_release
    finally:
        cgroup.remove(cg)


def parse_policies() -> tuple[dict, dict]:
    """Parse + validate each policy size (not part of apply: the hook reloads a cached policy)."""
    policies, times = {}, {}
    _, first = timed(load_policy_text, policy_text(1), "bench-first")
    progress(f"policy parse: first use {first / 1e6:.1f} ms (imports jsonschema, yaml); "
             f"then {PARSE_SAMPLES} samples per size")
    for n in RULE_COUNTS:
        samples = []
        for _ in range(PARSE_SAMPLES):
            policies[n], t = timed(load_policy_text, policy_text(n), f"bench-{n}")
            samples.append(t)
        times[str(n)] = samples
    return policies, {"first_use": [first], **times}


def bench_warm(policies: dict) -> dict:
    out = {}
    for n, policy in policies.items():
        entries = len(maps.cidr_entries(policy, 0))
        progress(f"warm apply/release, {rules(n)} ({entries} map entries): 1 warm-up + {WARM_SAMPLES} samples")
        applies, releases = [], []
        for i in range(WARM_SAMPLES + 1):
            t_apply, t_release = apply_release_once(f"sdbench-{os.getpid()}-{n}-{i}", policy, check=(i == 0))
            if i:
                applies.append(t_apply)
                releases.append(t_release)
        out[str(n)] = {"rules": n, "map_entries": entries, "apply": applies, "release": releases}
    return out


def bench_shared(policies: dict) -> dict:
    """1-rule apply/release while another cgroup holds the biggest policy: the maps are shared
    by every policed cgroup, so this is what a small container pays next to a big one."""
    big_n = max(policies)
    progress(f"shared maps: 1-rule apply/release next to a cgroup with {rules(big_n)}: "
             f"1 warm-up + {WARM_SAMPLES} samples")
    big = cgroup.create(f"sdbench-{os.getpid()}-big")
    try:
        att = session.apply(big, policies[big_n])
        try:
            applies, releases = [], []
            for i in range(WARM_SAMPLES + 1):
                t_apply, t_release = apply_release_once(f"sdbench-{os.getpid()}-shared-{i}", policies[1],
                                                        check=(i == 0))
                if i:
                    applies.append(t_apply)
                    releases.append(t_release)
        finally:
            session.release(att)
    finally:
        cgroup.remove(big)
    return {"neighbour_rules": big_n, "apply": applies, "release": releases}


def bench_fresh(policy) -> dict:
    policy_json = policy.to_json()
    baseline, nosite, walls, interp, imports, applies, tail = [], [], [], [], [], [], []
    heavy, modules = [], 0
    pins = loader.pin_dir()
    for i in range(FRESH_SAMPLES):
        progress(f"fresh interpreter: sample {i + 1}/{FRESH_SAMPLES} (baselines 'python -c pass', "
                 f"'python -S -c pass', then warm apply)")
        _, _, wall = run_child([PY, "-c", "pass"])
        baseline.append(wall)
        _, _, wall = run_child([PY, "-S", "-c", "pass"])
        nosite.append(wall)
        cg = cgroup.create(f"sdbench-{os.getpid()}-fresh-{i}")
        try:
            out, start, wall = run_child([PY, "-c", WARM_CHILD, str(cg), policy_json])
        finally:
            try:  # release whatever the child attached (release does not need the generation)
                session.release(session.Attachment(cg, cgroup.cgroup_id(cg), pins, 0))
            finally:
                cgroup.remove(cg)
        walls.append(wall)
        interp.append(out["t0"] - start)
        imports.append(out["imports"])
        applies.append(out["apply"])
        tail.append(wall - (out["t0"] - start) - out["imports"] - out["apply"])
        heavy, modules = out["heavy"], out["modules"]
    return {"baseline": baseline, "baseline_no_site": nosite, "wall": walls, "interpreter_start": interp,
            "imports": imports, "apply": applies, "exit": tail, "heavy_modules": heavy, "modules": modules}


# -- report ----------------------------------------------------------------------------------


def report(cold: dict, parse: dict, warm: dict, shared: dict, fresh: dict) -> dict:
    rows, summaries = [], {}

    def row(key: str, label: str, samples: list[int], note: str = "") -> dict:
        s = summary_ms(samples)
        summaries[key] = s
        rows.append([label, s["n"], s["min"], s["median"], s["p90"], s["max"], note])
        return s

    cold_s = row("cold.wall", "cold: compile+pin, fresh interpreter (wall)", cold["wall"])
    row("cold.interpreter_start", "  interpreter start", cold["interpreter_start"])
    row("cold.import_bcc", "  import bcc", cold["import_bcc"])
    row("cold.compile_pin", "  compile + pin", cold["compile_pin"])
    for n, w in warm.items():
        e = f"{w['map_entries']:,} entries"
        row(f"warm.{n}.apply", f"warm apply, {rules(n)}", w["apply"], e)
        row(f"warm.{n}.release", f"warm release, {rules(n)}", w["release"], e)
    big = rules(shared["neighbour_rules"])
    row("shared.apply", f"warm apply, 1 rule, next to {big}", shared["apply"])
    row("shared.release", f"warm release, 1 rule, next to {big}", shared["release"], "scans shared map")
    row("parse.first_use", "policy parse, first use", parse["first_use"], "imports jsonschema")
    for n in warm:
        row(f"parse.{n}", f"policy parse+validate, {rules(n)}", parse[n], "load_policy_text")
    base_s = row("baseline", "baseline: python -c pass (wall)", fresh["baseline"])
    row("baseline_no_site", "baseline: python -S -c pass (wall)", fresh["baseline_no_site"], "no site/.pth")
    fresh_s = row("fresh.wall", "warm prestart, fresh interpreter (wall)", fresh["wall"], "1 rule, no bcc")
    row("fresh.interpreter_start", "  interpreter start", fresh["interpreter_start"])
    row("fresh.imports", "  imports", fresh["imports"], ", ".join(fresh["heavy_modules"]) or "no heavy deps")
    row("fresh.apply", "  policy reload + apply", fresh["apply"])
    row("fresh.exit", "  output + interpreter exit", fresh["exit"])

    print_table(["benchmark (ms)", "n", "min", "median", "p90", "max", "note"], rows)
    warm1 = summaries["warm.1.apply"]["median"]
    derived = {
        "cold_wall_over_fresh_wall": cold_s["median"] / fresh_s["median"],
        "compile_pin_over_warm_apply_1": summaries["cold.compile_pin"]["median"] / warm1,
        "fresh_over_baseline": fresh_s["median"] / base_s["median"],
        "fresh_minus_baseline_ms": fresh_s["median"] - base_s["median"],
        "fresh_target_ms": TARGET_FRESH_MS,
        "fresh_meets_target": fresh_s["median"] < TARGET_FRESH_MS,
    }
    print()
    print(f"cold wall / warm prestart wall (fresh interpreters): {derived['cold_wall_over_fresh_wall']:,.1f}x")
    print(f"compile+pin / warm apply of 1 rule (in process):     {derived['compile_pin_over_warm_apply_1']:,.0f}x")
    print(f"warm prestart wall / bare interpreter start:         {derived['fresh_over_baseline']:.2f}x "
          f"(+{derived['fresh_minus_baseline_ms']:.1f} ms)")
    verdict = "meets" if derived["fresh_meets_target"] else "MISSES"
    print(f"warm prestart median {fresh_s['median']:.1f} ms {verdict} the < {TARGET_FRESH_MS} ms target")
    return {"summary_ms": summaries, "derived": derived}


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("bench/apply.py: needs root (cgroups, bpf)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (cleanup)
    root = BPFFS / f"sdbench_{os.getpid()}"
    state = Path(tempfile.mkdtemp(prefix="sdbench_state_"))
    os.environ["SAFEDEPLOY_BPFFS"] = str(root)  # read at call time, inherited by the children
    os.environ["SAFEDEPLOY_STATE_DIR"] = str(state)
    # Children run with up-to-date bytecode, as an installed hook would, even when the caller
    # sets PYTHONDONTWRITEBYTECODE and sources are being edited (a stale .pyc means a recompile).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(state / "pycache")
    progress(f"pin root {root}, state dir {state}")
    try:
        progress("priming the children's bytecode cache (not measured)")
        run_child([PY, "-c", PRIME_CHILD])
        cold = bench_cold(root)
        policies, parse = parse_policies()
        warm = bench_warm(policies)
        shared = bench_shared(policies)
        fresh = bench_fresh(policies[1])
    finally:
        remove_pin_root(root)
        shutil.rmtree(state, ignore_errors=True)
        progress(f"removed {root} and {state}")
    results = report(cold, parse, warm, shared, fresh)
    path = write_results("apply", {"pin_version": loader.source_hash(), "samples_ns": {
        "cold": cold, "parse": parse, "warm": warm, "shared": shared, "fresh": fresh}, **results})
    progress(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
