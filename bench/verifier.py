"""Benchmark: what the verifier and the JIT make of each safedeploy program.

For every program of loader.PROGRAMS, pinned under loader.pin_dir() (compiled and pinned
first if absent, like any first use; the pins are left in place), and the programs that are
not pinned on their own (the tail calls of loader.TAIL_PROGRAMS, the sockhash programs of
loader.MAP_PROGRAMS: their rows come from the reload alone):

  from the pin   ``bpftool prog show pinned <pin_dir>/prog_<name> --json``: xlated size
                 (instructions = bytes_xlated / 8), JITed size, tag; and verified_insns
                 (the verifier's processed-instruction count, kept in bpf_prog_info) read
                 with BPF_OBJ_GET_INFO_BY_FD, because bpftool 7.1 does not print it
  from a load    the same sources compiled again with bcc (same cflags as the loader) and
                 each program loaded once more with a verifier log at BPF_LOG_STATS
                 (log level 4; level 1 if the kernel refuses it): "processed N insns (limit
                 1000000) max_states_per_insn M total_states T peak_states P mark_read R",
                 "verification time U usec" and the stack depth. The loaded copy is closed
                 at once. Its tag must equal the pinned program's tag (same instructions),
                 so the log speaks about the pinned program.

docs/verifier.md explains the figures and how the loops stay verifier-friendly.

Usage: .venv/bin/python bench/verifier.py     (root; bpffs, bcc, bpftool)
Progress goes to stderr, the table to stdout, everything to bench/results/verifier.json.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import begin, print_table, progress, write_results  # noqa: E402

from ocihook import bpfsys, loader  # noqa: E402

INSN_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: processed instructions per program
LOG_STATS = 4  # BPF_LOG_STATS
LOG_BUF = 1 << 20
LOG_BUF_LEVEL1 = 64 << 20

PROCESSED = re.compile(r"processed (\d+) insns \(limit (\d+)\) max_states_per_insn (\d+) total_states (\d+) "
                       r"peak_states (\d+) mark_read (\d+)")
VTIME = re.compile(r"verification time (\d+) usec")
STACK = re.compile(r"stack depth ([0-9+]+)")


def bpftool_show(args: list[str]) -> dict:
    proc = subprocess.run(["bpftool", "prog", "show", *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def verified_insns(pin: Path, shown: dict) -> int:
    """bpf_prog_info.verified_insns of a pinned program (bpftool 7.1 does not print it).
    The fields bpftool does print are checked against its figures."""
    fd = bpfsys.obj_get(str(pin))
    try:
        info = bpfsys.obj_info(fd, bpfsys.ProgInfo(), "program info")
    finally:
        os.close(fd)
    if (info.id, info.jited_prog_len, info.xlated_prog_len) != (shown["id"], shown["bytes_jited"],
                                                                 shown["bytes_xlated"]):
        raise SystemExit(f"bench/verifier.py: bpf_prog_info layout mismatch for {pin}")
    return info.verified_insns


def cflags() -> list[str]:
    """The loader's compile flags (including the BTF field offsets when the loader uses them)."""
    offsets = loader.btf_offsets() if hasattr(loader, "btf_offsets") else {}
    return [*loader.CFLAGS, *(f"-D{k}={v}" for k, v in offsets.items())]


def all_programs() -> list[tuple[str, int, int]]:
    """(name, program type, expected attach type) of every program the loader loads."""
    return [*loader.PROGRAMS,
            *((name, loader.PROG_CGROUP_SKB, atype) for name, _, _, atype in loader.TAIL_PROGRAMS),
            *((name, ptype, 0) for name, ptype, _, _ in loader.MAP_PROGRAMS)]


def verifier_logs() -> dict[str, dict]:
    """Compile with bcc; load each program once more with a verifier log; parse it."""
    from bcc import BPF, lib  # noqa: PLC0415 — cold path: compiling needs bcc

    saved = os.dup(1)  # bcc prints header warnings on stdout: keep the table clean
    os.dup2(2, 1)
    try:
        t0 = time.perf_counter()
        b = BPF(text=loader.source_text().encode(), cflags=cflags())
        progress(f"compiled with bcc in {time.perf_counter() - t0:.2f} s")
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    out = {}
    try:
        for name, ptype, atype in all_programs():
            fn = name.encode()
            level, size = LOG_STATS, LOG_BUF
            while True:
                buf = ctypes.create_string_buffer(size)
                t0 = time.perf_counter()
                fd = lib.bcc_func_load(b.module, ptype, fn, lib.bpf_function_start(b.module, fn),
                                       lib.bpf_function_size(b.module, fn), lib.bpf_module_license(b.module),
                                       lib.bpf_module_kern_version(b.module), level, buf, size, None, atype)
                wall = time.perf_counter() - t0
                err = ctypes.get_errno()
                if fd >= 0 or level != LOG_STATS:
                    break
                progress(f"{name}: log level {LOG_STATS} refused ({os.strerror(err)}); trying level 1")
                level, size = 1, LOG_BUF_LEVEL1
            log = buf.value.decode(errors="replace")
            if fd < 0:
                raise SystemExit(f"bench/verifier.py: {name} failed to load ({os.strerror(err)}):\n{log[-2000:]}")
            try:
                reload_info = bpftool_show(["id", str(bpfsys.prog_id(fd))])
                tag = reload_info["tag"]
            finally:
                os.close(fd)
            m, vt, st = PROCESSED.search(log), VTIME.search(log), STACK.search(log)
            if not m:
                raise SystemExit(f"bench/verifier.py: no 'processed N insns' line in the {name} log:\n{log[-2000:]}")
            out[name] = {"log_level": level, "tag": tag, "processed_insns": int(m[1]), "limit": int(m[2]),
                         "max_states_per_insn": int(m[3]), "total_states": int(m[4]), "peak_states": int(m[5]),
                         "mark_read": int(m[6]), "verification_time_us": int(vt[1]) if vt else None,
                         "stack_depth": st[1] if st else None, "load_wall_ms": wall * 1e3,
                         "log_tail": log.strip().splitlines()[-4:], "reload": reload_info}
            progress(f"{name}: processed {m[1]} insns, {m[4]} states, "
                     f"{out[name]['verification_time_us']} us verifying")
    finally:
        b.cleanup()
    return out


def main() -> int:
    begin("verifier.py", "bpf")
    pins = Path(loader.ensure_programs(log=progress))
    progress(f"pinned programs: {pins}")
    shown = {name: bpftool_show(["pinned", str(pins / f"prog_{name}")]) for name, _, _ in loader.PROGRAMS}
    for name, info in shown.items():
        info.setdefault("verified_insns", verified_insns(pins / f"prog_{name}", info))
    logs = verifier_logs()

    rows, programs = [], {}
    for name, ptype, atype in all_programs():
        lg = logs[name]
        p = shown.get(name) or {**lg["reload"], "verified_insns": None}
        rec = {"type": p.get("type"), "id": p.get("id"), "tag": p.get("tag"),
               "xlated_bytes": p.get("bytes_xlated"), "xlated_insns": p.get("bytes_xlated", 0) // 8,
               "jited_bytes": p.get("bytes_jited"), "memlock_bytes": p.get("bytes_memlock"),
               "verified_insns": p.get("verified_insns"), "map_ids": p.get("map_ids"),
               "pinned": name in shown, "tag_matches_reload": p.get("tag") == lg["tag"],
               **{f"log_{k}": v for k, v in lg.items() if k != "reload"}}
        programs[name] = rec
        rows.append([name, rec["type"], f"{rec['xlated_insns']:,}", f"{rec['jited_bytes']:,}",
                     f"{rec['verified_insns']:,}" if rec["verified_insns"] is not None else "n/a",
                     f"{lg['processed_insns']:,}", f"{lg['processed_insns'] / INSN_LIMIT * 100:.2f}%",
                     f"{lg['total_states']:,}", f"{lg['peak_states']:,}", lg["max_states_per_insn"],
                     f"{lg['verification_time_us']:,}" if lg["verification_time_us"] is not None else "n/a",
                     lg["stack_depth"] or "",
                     ("yes" if rec["tag_matches_reload"] else "NO") if rec["pinned"] else "not pinned"])
    print_table(["program", "type", "xlated insns", "jited bytes", "verified_insns", "processed", "of 1M limit",
                 "states", "peak states", "max/insn", "verify us", "stack", "tag match"], rows)
    print(f"\npins: {pins}")
    print(f"from the pins: bpftool prog show pinned {pins}/prog_<name> --json "
          "(bytes_xlated / 8, bytes_jited); verified_insns from bpf_prog_info")
    print(f"from a reload: bcc, verifier log level {LOG_STATS} (BPF_LOG_STATS), 'processed N insns' line")
    mismatched = [n for n, r in programs.items() if not r["tag_matches_reload"]]
    if mismatched:
        print(f"WARNING: the reloaded {', '.join(mismatched)} differ from the pins (tag): the log figures "
              "describe the sources as they are now")
    path = write_results("verifier", {"pin_dir": str(pins), "pin_version": pins.name, "cflags": cflags(),
                                      "bpftool": subprocess.run(["bpftool", "version"], capture_output=True,
                                                                text=True).stdout.splitlines()[0],
                                      "programs": programs})
    progress(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
