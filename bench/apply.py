"""Benchmark: what it costs to put a cgroup under a policy.

One run measures, all against a throwaway pin root ``/sys/fs/bpf/sdbench_<pid>`` and state
dir (_sandbox.Sandbox; removed at the end, the real ``/sys/fs/bpf/safedeploy`` is never touched):

  cold     first compile + pin of the programs, in a fresh interpreter per sample (so the
           bcc import is counted), pins removed before every sample
  policy   load_policy_text (parse + jsonschema + normalisation) and compiler.compile_policy
           (the kernel form the hook caches) for 1, 100 and 10 000 CIDR rules: the cold
           path of a new policy document, not the warm path
  warm     session.apply / session.release of the compiled dict in this process, pins
           present, a fresh cgroup per sample, the same three policy sizes (map entries
           only, no traffic)
  shared   1-rule apply/release while another cgroup holds the 10 000-rule policy (the maps
           are shared by every policed cgroup)
  fresh    what the OCI hook's warm prestart does, as the hook does it: an interpreter
           started like the launcher (``python -S -E``, the repository put on sys.path),
           ``ocihook.hook.resolve_policy`` of a named policy (sha256 of the document, the
           compiled dict read from ``$SAFEDEPLOY_STATE_DIR/policy-cache/<sha256>.json``),
           then ``session.apply`` on the cgroup's path as a string; wall time from the parent,
           interpreter start included. The child fails loudly if bcc was imported, or if the
           policy module was (a cache miss: the cold path ran); the note column lists the
           heavier stdlib modules that were imported after all (pathlib, json, re, hashlib)
  baseline ``python -S -E -c pass`` (the launcher's flags) and ``python -E -c pass``
           (with site), same interpreter, interleaved with "fresh"

Policies are _network.policy_text: default allow, deny 127.0.0.2/32 and /24s in 10.0.0.0/8.

Usage: .venv/bin/python bench/apply.py     (root; cgroup v2, bpffs, bcc)
Progress goes to stderr, the table to stdout, everything to bench/results/apply.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import MsTable, REPO, begin, progress, run_timed, timed, write_results  # noqa: E402
from _sandbox import Sandbox, remove_pin_root, temp_cgroup  # noqa: E402
from _network import policy_text, rules  # noqa: E402

from ocihook import cgroup, compiler, hook, loader, pinned, session  # noqa: E402
from ocihook.policy import load_policy_text  # noqa: E402

COLD_SAMPLES = 3
WARM_SAMPLES = 20  # per policy size, after one discarded warm-up
PARSE_SAMPLES = 3  # load_policy_text / compile_policy per policy size
FRESH_SAMPLES = 20  # fresh-interpreter applies, each with the baseline interpreter starts
RULE_COUNTS = (1, 100, 10_000)
TARGET_FRESH_MS = 60  # warm prestart, wall time including interpreter start
FRESH_POLICY = "bench-apply"  # the annotation value: a policy file in $SAFEDEPLOY_POLICY_DIR

PY = sys.executable
HOOK_FLAGS = ["-S", "-E"]  # what ocihook.install.write_hook_wrapper's launcher runs

# A cold sample: import bcc and compile + pin into the (empty) pin root. Needs site (bcc).
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

# A warm prestart as the hook does it (argv: repo, cgroup, annotation value): string paths,
# nothing imported that the hook does not import (its output is formatted by hand: no json).
WARM_CHILD = r"""
import time
t0 = time.perf_counter_ns()
import sys
sys.path.insert(0, sys.argv[1])
from ocihook import hook, session
t1 = time.perf_counter_ns()
compiled = hook.resolve_policy(sys.argv[3])
t2 = time.perf_counter_ns()
session.apply(sys.argv[2], compiled)
t3 = time.perf_counter_ns()
import os
bcc = sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc."))
if bcc:
    sys.stderr.write(f"FAIL: the warm path imported bcc: {bcc}\n")
    os._exit(3)
cold = [m for m in ("ocihook.policy", "site", "jsonschema", "yaml") if m in sys.modules]
if cold:
    sys.stderr.write(f"FAIL: the warm path took the cold path (policy cache missed?): {cold}\n")
    os._exit(4)
heavy = [m for m in ("typer", "pyroute2", "dnslib", "pathlib", "json", "re", "hashlib") if m in sys.modules]
sys.stdout.write('{"t0": %d, "imports": %d, "cache": %d, "apply": %d, "modules": %d, "heavy": [%s]}\n'
                 % (t0, t1 - t0, t2 - t1, t3 - t2, len(sys.modules), ", ".join('"%s"' % m for m in heavy)))
sys.stdout.flush()
os._exit(0)  # as hook.main does: skip interpreter teardown
"""

# Compiles (into PYTHONPYCACHEPREFIX) what the cold children import.
PRIME_CHILD = "import json, bcc; from ocihook import loader"


def run_child(args: list[str]) -> tuple[dict | None, int, int]:
    """Run a child interpreter; (its last stdout line as JSON or None, start ns, wall ns)."""
    proc, start, wall = run_timed(args)
    out = proc.stdout.decode().strip()
    return (json.loads(out.splitlines()[-1]) if out else None), start, wall


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


def bench_policies() -> tuple[dict, dict]:
    """Parse + validate, then compile, each policy size: {n: compiled}, {step: samples}."""
    compiled, times = {}, {"parse": {}, "compile": {}}
    _, first = timed(load_policy_text, policy_text(1), "bench-first")
    progress(f"policy parse: first use {first / 1e6:.1f} ms (imports jsonschema, yaml); "
             f"then {PARSE_SAMPLES} samples per size of load_policy_text and compile_policy")
    times["parse_first_use"] = [first]
    for n in RULE_COUNTS:
        times["parse"][str(n)], times["compile"][str(n)] = [], []
        for _ in range(PARSE_SAMPLES):
            policy, t = timed(load_policy_text, policy_text(n), f"bench-{n}")
            times["parse"][str(n)].append(t)
            compiled[n], t = timed(compiler.compile_policy, policy)
            times["compile"][str(n)].append(t)
    return compiled, times


def apply_release_once(name: str, compiled: dict, check: bool) -> tuple[int, int]:
    """Fresh cgroup, apply, release, remove; (apply ns, release ns)."""
    with temp_cgroup(name) as cg:
        att, t_apply = timed(session.apply, cg, compiled)
        try:
            if check:  # prove the apply did something (outside the timings)
                with loader.Programs(att.pin_dir) as progs:
                    if progs.attached_to(cg) != len(loader.PROGRAMS):
                        raise SystemExit(f"bench/apply.py: programs not attached to {cg}")
        finally:
            drained, t_release = timed(session.release, att, compiled)
        if check:
            if not isinstance(drained, session.Drained):
                raise SystemExit(f"bench/apply.py: session.release returned {type(drained).__name__}")
            with pinned.PinnedMaps.open(att.pin_dir) as m:
                if m.entries_of(att.cgid):
                    raise SystemExit(f"bench/apply.py: release left map entries of {cg}")
        return t_apply, t_release


def apply_release_series(label: str, tag: str, compiled: dict) -> tuple[list[int], list[int]]:
    progress(f"{label}: 1 warm-up + {WARM_SAMPLES} samples")
    applies, releases = [], []
    for i in range(WARM_SAMPLES + 1):
        t_apply, t_release = apply_release_once(f"sdbench-{os.getpid()}-{tag}-{i}", compiled, check=(i == 0))
        if i:
            applies.append(t_apply)
            releases.append(t_release)
    return applies, releases


def bench_warm(compiled: dict) -> dict:
    out = {}
    for n, c in compiled.items():
        entries = len(c["cidrs"])
        applies, releases = apply_release_series(f"warm apply/release, {rules(n)} ({entries} map entries)",
                                                 str(n), c)
        out[str(n)] = {"rules": n, "map_entries": entries, "apply": applies, "release": releases}
    return out


def bench_shared(compiled: dict) -> dict:
    """1-rule apply/release while another cgroup holds the biggest policy: the maps are shared
    by every policed cgroup, so this is what a small container pays next to a big one."""
    big_n = max(compiled)
    with temp_cgroup(f"sdbench-{os.getpid()}-big") as big:
        att = session.apply(big, compiled[big_n])
        try:
            applies, releases = apply_release_series(
                f"shared maps: 1-rule apply/release next to a cgroup with {rules(big_n)}", "shared", compiled[1])
        finally:
            session.release(att, compiled[big_n])
    return {"neighbour_rules": big_n, "apply": applies, "release": releases}


def bench_fresh(sandbox: Sandbox) -> dict:
    """The hook's warm prestart in a fresh interpreter, with baselines interleaved."""
    policy_dir = Path(os.environ["SAFEDEPLOY_POLICY_DIR"])
    policy_dir.mkdir(parents=True, exist_ok=True)
    (policy_dir / f"{FRESH_POLICY}.json").write_text(policy_text(1))
    compiled = hook.resolve_policy(FRESH_POLICY)  # validates and writes the cache, as a first hook run does
    cache = list((sandbox.state / "policy-cache").glob("*.json"))
    if len(cache) != 1:
        raise SystemExit(f"bench/apply.py: expected one cached compiled policy, found {cache}")
    progress(f"policy cache: {cache[0].name} ({cache[0].stat().st_size} bytes)")
    pins = loader.pin_dir()
    samples = {k: [] for k in ("baseline", "baseline_site", "wall", "interpreter_start", "imports", "cache",
                               "apply", "exit")}
    heavy, modules = [], 0
    for i in range(FRESH_SAMPLES + 1):  # sample 0: warm-up (writes the bytecode the launcher would)
        progress(f"fresh interpreter: {'warm-up' if i == 0 else f'sample {i}/{FRESH_SAMPLES}'} (baselines "
                 f"'python -E -c pass', 'python -S -E -c pass', then the hook's warm prestart)")
        _, _, base_site = run_child([PY, "-E", "-c", "pass"])
        _, _, base = run_child([PY, *HOOK_FLAGS, "-c", "pass"])
        with temp_cgroup(f"sdbench-{os.getpid()}-fresh-{i}") as cg:
            try:
                out, start, wall = run_child([PY, *HOOK_FLAGS, "-c", WARM_CHILD, str(REPO), str(cg), FRESH_POLICY])
            finally:  # release whatever the child attached
                session.release(session.Attachment(cg, cgroup.cgroup_id(cg), pins), compiled)
        if i == 0:
            continue
        samples["baseline"].append(base)
        samples["baseline_site"].append(base_site)
        samples["wall"].append(wall)
        samples["interpreter_start"].append(out["t0"] - start)
        for k in ("imports", "cache", "apply"):
            samples[k].append(out[k])
        samples["exit"].append(wall - (out["t0"] - start) - out["imports"] - out["cache"] - out["apply"])
        heavy, modules = out["heavy"], out["modules"]
    return {**samples, "heavy_modules": heavy, "modules": modules, "cache_file": cache[0].name}


# -- report ----------------------------------------------------------------------------------


def report(cold: dict, policies: dict, warm: dict, shared: dict, fresh: dict) -> dict:
    t = MsTable()
    cold_s = t.row("cold.wall", "cold: compile+pin, fresh interpreter (wall)", cold["wall"])
    t.row("cold.interpreter_start", "  interpreter start", cold["interpreter_start"])
    t.row("cold.import_bcc", "  import bcc", cold["import_bcc"])
    t.row("cold.compile_pin", "  compile + pin", cold["compile_pin"])
    t.row("parse.first_use", "policy parse, first use", policies["parse_first_use"], "imports jsonschema, yaml")
    for n in warm:
        t.row(f"parse.{n}", f"policy parse+validate, {rules(n)}", policies["parse"][n], "load_policy_text")
        t.row(f"compile.{n}", f"policy compile, {rules(n)}", policies["compile"][n], "compile_policy")
    for n, w in warm.items():
        e = f"{w['map_entries']:,} entries"
        t.row(f"warm.{n}.apply", f"warm apply, {rules(n)}", w["apply"], e)
        t.row(f"warm.{n}.release", f"warm release, {rules(n)}", w["release"], e)
    big = rules(shared["neighbour_rules"])
    t.row("shared.apply", f"warm apply, 1 rule, next to {big}", shared["apply"])
    t.row("shared.release", f"warm release, 1 rule, next to {big}", shared["release"])
    t.row("baseline_site", "baseline: python -E -c pass (wall)", fresh["baseline_site"], "with site")
    base_s = t.row("baseline", "baseline: python -S -E -c pass (wall)", fresh["baseline"], "launcher's flags")
    fresh_s = t.row("fresh.wall", "warm prestart, fresh interpreter (wall)", fresh["wall"],
                    "no bcc; " + (", ".join(fresh["heavy_modules"]) or "no pathlib/json/re"))
    t.row("fresh.interpreter_start", "  interpreter start", fresh["interpreter_start"])
    t.row("fresh.imports", "  import ocihook.hook, ocihook.session", fresh["imports"],
          f"{fresh['modules']} modules in all")
    t.row("fresh.cache", "  resolve_policy (cached compiled dict)", fresh["cache"])
    t.row("fresh.apply", "  session.apply", fresh["apply"])
    t.row("fresh.exit", "  output + os._exit", fresh["exit"])
    t.print()

    s = t.summaries
    warm1 = s["warm.1.apply"]["median"]
    derived = {
        "cold_wall_over_fresh_wall": cold_s["median"] / fresh_s["median"],
        "compile_pin_over_warm_apply_1": s["cold.compile_pin"]["median"] / warm1,
        "fresh_over_baseline": fresh_s["median"] / base_s["median"],
        "fresh_minus_baseline_ms": fresh_s["median"] - base_s["median"],
        "shared_release_over_alone": s["shared.release"]["median"] / s["warm.1.release"]["median"],
        "fresh_target_ms": TARGET_FRESH_MS,
        "fresh_meets_target": fresh_s["median"] < TARGET_FRESH_MS,
    }
    d = derived
    print()
    print(f"cold wall / warm prestart wall (fresh interpreters): {d['cold_wall_over_fresh_wall']:,.1f}x")
    print(f"compile+pin / warm apply of 1 rule (in process):     {d['compile_pin_over_warm_apply_1']:,.0f}x")
    print(f"warm prestart wall / python -S -E -c pass:           {d['fresh_over_baseline']:.2f}x "
          f"(+{d['fresh_minus_baseline_ms']:.1f} ms)")
    print(f"1-rule release next to {big} / alone:        {d['shared_release_over_alone']:.2f}x")
    verdict = "meets" if d["fresh_meets_target"] else "MISSES"
    print(f"warm prestart median {fresh_s['median']:.1f} ms {verdict} the < {TARGET_FRESH_MS} ms target")
    return {"summary_ms": s, "derived": derived}


def main() -> int:
    begin("apply.py", "cgroups, bpf")
    sandbox = Sandbox("apply", compile=False)
    os.environ["SAFEDEPLOY_POLICY_DIR"] = str(sandbox.state / "policies")
    # The cold children (site on, so no -E) get an up-to-date bytecode cache of their own even
    # when the caller sets PYTHONDONTWRITEBYTECODE and sources are being edited. The warm
    # children run with -E like the launcher, so they use the normal __pycache__ as the hook does.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(sandbox.state / "pycache")
    try:
        progress("priming the cold children's bytecode cache (not measured)")
        run_child([PY, "-c", PRIME_CHILD])
        cold = bench_cold(sandbox.root)
        sandbox.compile()  # pinned by the last cold sample
        compiled, policies = bench_policies()
        warm = bench_warm(compiled)
        shared = bench_shared(compiled)
        fresh = bench_fresh(sandbox)
    finally:
        sandbox.close()
    results = report(cold, policies, warm, shared, fresh)
    path = write_results("apply", {"pin_version": sandbox.pin_version, "samples_ns": {
        "cold": cold, "policies": policies, "warm": warm, "shared": shared, "fresh": fresh}, **results})
    progress(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
