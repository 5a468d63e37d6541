"""Small helpers shared by the benchmark scripts: timing, statistics, a table, results JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def now_ns() -> int:
    """time.perf_counter_ns: CLOCK_MONOTONIC on Linux, so comparable across processes."""
    return time.perf_counter_ns()


def timed(fn, *args, **kwargs):
    """(result, elapsed ns) of one call."""
    t0 = time.perf_counter_ns()
    result = fn(*args, **kwargs)
    return result, time.perf_counter_ns() - t0


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------------------


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


# -- output ----------------------------------------------------------------------------------


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
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, results: dict) -> Path:
    """bench/results/<name>.json with the machine info; returns the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {"benchmark": name, "machine": machine_info(), "command": " ".join([sys.executable, *sys.argv]),
           **results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
