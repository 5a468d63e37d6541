"""Measuring and reporting, for every benchmark script: timing, statistics, the
results file (with the machine and the source), and begin() (root check, SIGTERM runs the
finally blocks).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


RESULTS_DIR = Path(__file__).resolve().parent / "results"


REPO = Path(__file__).resolve().parent.parent


def now_ns() -> int:
    """time.perf_counter_ns: CLOCK_MONOTONIC on Linux, so comparable across processes."""
    return time.perf_counter_ns()


def timed(fn, *args, **kwargs):
    """(result, elapsed ns) of one call."""
    t0 = time.perf_counter_ns()
    result = fn(*args, **kwargs)
    return result, time.perf_counter_ns() - t0


def run_timed(args: list[str], *, env: dict | None = None, stdin: bytes | None = None, timeout: float = 120,
              check: bool = True) -> tuple[subprocess.CompletedProcess, int, int]:
    """Run a command, output captured as bytes: (completed process, start ns, wall ns). With
    check, a non-zero exit fails the benchmark loudly with the command's stderr."""
    start = now_ns()
    proc = subprocess.run(args, input=stdin if stdin is not None else b"", capture_output=True, env=env,
                          timeout=timeout)
    wall = now_ns() - start
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        sys.stderr.write(err + "\n")
        cmd = " ".join("<code>" if "\n" in a else a for a in map(str, args))
        raise SystemExit(f"bench: {cmd[:200]} failed (exit {proc.returncode}): {err[-300:]}")
    return proc, start, wall


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(samples: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (p in 0..100)."""
    if not samples:
        raise ValueError("no samples")
    s = sorted(samples)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(samples: list[float]) -> float:
    return percentile(samples, 50)


def summary_ms(samples_ns: list[int]) -> dict:
    """n, min, median, p90, max of nanosecond samples, in milliseconds."""
    ms = [x / 1e6 for x in samples_ns]
    return {"n": len(ms), "min": min(ms), "median": median(ms), "p90": percentile(ms, 90), "max": max(ms)}


def rotated(names: list, r: int) -> list:
    k = r % len(names)
    return names[k:] + names[:k]


def bootstrap_ci(xs: list[float], stat=median, n: int = 2000, seed: int = 1) -> tuple[float, float]:
    """95% bootstrap interval of stat(xs), resampling the rounds."""
    rng = random.Random(seed)
    est = sorted(stat(rng.choices(xs, k=len(xs))) for _ in range(n))
    return est[int(0.025 * n)], est[int(0.975 * n) - 1]


def paired(samples: dict[str, list[float]], base: str) -> dict[str, dict]:
    """Per variant: median/min/max of its samples, and per-round ratios against base
    (samples[v][r] / samples[base][r]), summarised by their median, spread and a 95%
    bootstrap interval of that median."""
    out = {}
    for v, xs in samples.items():
        ratios = [x / b for x, b in zip(xs, samples[base])]
        out[v] = {"n": len(xs), "median": median(xs), "min": min(xs), "max": max(xs),
                  "p10": percentile(xs, 10), "p90": percentile(xs, 90),
                  "ratios": ratios, "ratio_median": median(ratios),
                  "ratio_p10": percentile(ratios, 10), "ratio_p90": percentile(ratios, 90),
                  "ratio_ci95": bootstrap_ci(ratios), "ratio_of_medians": median(xs) / median(samples[base])}
    return out


class MsTable:
    """Rows of millisecond summaries (n, min, median, p90, max, note) of nanosecond samples."""

    HEADERS = ["benchmark (ms)", "n", "min", "median", "p90", "max", "note"]

    def __init__(self):
        self.rows: list[list] = []
        self.summaries: dict[str, dict] = {}

    def row(self, key: str, label: str, samples: list[int], note: str = "") -> dict:
        s = summary_ms(samples)
        self.summaries[key] = s
        self.rows.append([label, s["n"], s["min"], s["median"], s["p90"], s["max"], note])
        return s

    def print(self) -> None:
        print_table(self.HEADERS, self.rows)


def print_table(headers: list[str], rows: list[list], file=sys.stdout) -> None:
    """A plain fixed-width table; floats get 2 decimals, the first column is left-aligned."""
    def cell(v):
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in text:
        print(line(r), file=file)


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "loadavg_at_end": os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_STARTED,
    }


def git_state() -> str:
    """HEAD and whether the tree had uncommitted changes (what is measured is the working tree)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def write_results(name: str, results: dict) -> Path:
    """bench/results/<name>.json with the machine, the source and the command; returns the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {"benchmark": name, "machine": machine_info(), "source": git_state(),
           "command": " ".join([sys.executable, *sys.argv]), **results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


_STARTED: dict = {}


def begin(script: str, needs: str) -> None:
    """Every benchmark's start: root, SIGTERM runs the finally blocks (the cleanup), and the
    load average at the start goes into the results (a sign of neighbours at work)."""
    if os.geteuid() != 0:
        raise SystemExit(f"bench/{script}: needs root ({needs})")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _STARTED.update(loadavg_at_start=os.getloadavg(),
                    started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
