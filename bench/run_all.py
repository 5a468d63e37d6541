"""Run every benchmark script in bench/ in sequence; exit non-zero if one fails.

A benchmark is any bench/*.py except this file and the shared helpers (names starting with "_").
Usage: .venv/bin/python bench/run_all.py [name ...]     (e.g. `run_all.py apply`; `make bench`)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"run_all.py"}


def benchmarks() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and not p.name.startswith("_"))


def main(argv: list[str]) -> int:
    scripts = benchmarks()
    if argv:
        scripts = [p for p in scripts if p.stem in argv]
        missing = set(argv) - {p.stem for p in scripts}
        if missing:
            print(f"run_all: no such benchmark: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    results = []
    t_all = time.perf_counter()
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(script)]).returncode
        results.append((script.name, rc, time.perf_counter() - t0))
    print("\n=== summary ===")
    for name, rc, secs in results:
        print(f"{name:<24} {'ok' if rc == 0 else f'FAILED (exit {rc})':<18} {secs:6.1f} s")
    print(f"{'total':<24} {'':<18} {time.perf_counter() - t_all:6.1f} s")
    return 1 if any(rc for _, rc, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
