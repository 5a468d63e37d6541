"""Benchmark: the warm prestart of this checkout against an earlier commit, in pairs.

The prestart of one run varies by ±2 ms on a small VM, more than the differences worth
knowing, so it is measured in alternating pairs: the baseline's hook, then this checkout's,
PAIRS times, each SAMPLES warm prestart+poststop cycles through its own installed launcher
(``bench/container.py``'s ``hook_cycle`` of that tree, in a fresh interpreter, with its own
throwaway state, log and policy directories). Reported per pair: the median wall time and the
median CPU time of the hook (``RUSAGE_CHILDREN`` around each prestart); then the mean of the
per-pair differences.

The baseline is a ``git worktree`` of BASELINE (default: the round's first commit,
``e38d346``) in a temp dir, removed at the end; its programs are compiled on first use (their
pins, like this tree's, stay under ``$SAFEDEPLOY_BPFFS``).

Usage: .venv/bin/python bench/prestart_pairs.py [--baseline REV] [--pairs N] [--samples N]
                                                 [--names]     (also deny a name: the refuser runs)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import REPO, begin, print_table, progress, write_results  # noqa: E402

BASELINE = "e38d346"
POLICY = "version: 1\nname: bench\ndefault: allow\ndeny: ['127.0.0.2']\n"          # bench/container.py's
POLICY_NAMES = "version: 1\nname: bench\ndefault: allow\ndeny: ['127.0.0.2', 'auth.example.test']\n"


def measure(root: str, samples: int, policy: str) -> dict:
    """In this (fresh) interpreter: `samples` warm prestart+poststop cycles of root's hook."""
    sys.path[:0] = [root, os.path.join(root, "bench")]
    os.chdir(root)
    import container as c  # noqa: PLC0415 — root's own bench/container.py
    from ocihook import install, settings  # noqa: PLC0415 — root's own package
    c.POLICY = policy
    work = Path(tempfile.mkdtemp(prefix="sdbench_pairs_"))
    for var, sub in (("SAFEDEPLOY_STATE_DIR", "state"), ("SAFEDEPLOY_LOG_DIR", "log"),
                     ("SAFEDEPLOY_POLICY_DIR", "policies")):
        os.environ[var] = str(work / sub)
    r = c.Run(work)
    walls, cpus = [], []
    run = c.run

    def timed_run(args, **kw):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = run(args, **kw)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if args[-1] == "prestart":
            cpus.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e3)
        return out
    try:
        install.install(r.hooks_dir, r.hook_path, preload=True, log=lambda m: None)
        Path(settings.policy_dir(), f"{c.POLICY_NAME}.yaml").write_text(policy)
        c.hook_cycle(r, cold=False, check=True)  # warm-up: validates and caches the policy
        c.run = timed_run
        for _ in range(samples):
            walls.append(c.hook_cycle(r, cold=False, check=False)["prestart"] / 1e6)
    finally:
        c.run = run
        c.cleanup(r)
    return {"wall_ms": walls, "cpu_ms": cpus}


def measure_in_child(root: str, samples: int, policy: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", root, str(samples)], input=policy.encode(),
                         capture_output=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"prestart_pairs: measuring {root} failed:\n{out.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--names", action="store_true", help="a policy that also denies a name (the refuser runs)")
    ap.add_argument("--measure", nargs=2, metavar=("ROOT", "SAMPLES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), sys.stdin.read())))
        return 0
    begin("prestart_pairs.py", "cgroups, bpf")
    if not shutil.which("git") or not (REPO / ".git").exists():
        raise SystemExit("prestart_pairs: needs git and a checkout (the baseline is a git worktree)")
    policy = POLICY_NAMES if args.names else POLICY
    base = Path(tempfile.mkdtemp(prefix="sdbench_baseline_")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", "--detach", str(base), args.baseline],
                   check=True, capture_output=True)
    t0 = time.monotonic()
    pairs = []
    try:
        for i in range(args.pairs):
            progress(f"pair {i + 1}/{args.pairs}: baseline {args.baseline}, then this checkout "
                     f"({args.samples} warm prestarts each)")
            old = measure_in_child(str(base), args.samples, policy)
            new = measure_in_child(str(REPO), args.samples, policy)
            pairs.append({"baseline": old, "this": new})
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
        shutil.rmtree(base.parent, ignore_errors=True)
    rows, dwall, dcpu = [], [], []
    for i, p in enumerate(pairs):
        ow, nw = statistics.median(p["baseline"]["wall_ms"]), statistics.median(p["this"]["wall_ms"])
        oc, nc = statistics.median(p["baseline"]["cpu_ms"]), statistics.median(p["this"]["cpu_ms"])
        dwall.append(nw - ow)
        dcpu.append(nc - oc)
        rows.append([i + 1, f"{ow:.2f}", f"{nw:.2f}", f"{nw - ow:+.2f}", f"{oc:.2f}", f"{nc:.2f}", f"{nc - oc:+.2f}"])
    print_table(["pair", f"wall {args.baseline}", "wall this", "diff", f"cpu {args.baseline}", "cpu this", "diff"],
                rows)
    print(f"mean difference (this - {args.baseline}): wall {statistics.mean(dwall):+.2f} ms, "
          f"cpu {statistics.mean(dcpu):+.2f} ms  ({'names denied: refuser runs' if args.names else 'bench policy'})")
    write_results("prestart_pairs", {"baseline": args.baseline, "policy": policy, "pairs": pairs,
                                     "mean_diff_wall_ms": statistics.mean(dwall),
                                     "mean_diff_cpu_ms": statistics.mean(dcpu), "elapsed_s": time.monotonic() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
