"""Interleaved run-time measurements in cgroups (connect, throughput, dns): long-lived
workers taking turns (Worker, run_rounds), loopback servers, and the kernel's BPF run-time
statistics around a batch of turns (with_stats).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import socket
import struct
import subprocess
import traceback
from pathlib import Path

from ocihook import bpfsys, cgroup, loader
from _measure import progress, rotated


FRAME = struct.Struct("I")


class Worker:
    """A long-lived child in a cgroup: setup(*args) runs once in there (after the move) and
    returns a function; every turn() runs that function once and returns its result. A
    failure in the child fails the benchmark loudly, with the child's traceback."""

    def __init__(self, path: Path, setup, *args):
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        self.path = path
        self.pid = os.fork()
        if self.pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.close(self.cmd_w)
                os.close(self.res_r)
                try:
                    cgroup.move_self(path)
                    fn, failed = setup(*args), None
                except BaseException:  # noqa: BLE001 — reported at the first turn
                    fn, failed = None, traceback.format_exc()
                while os.read(cmd_r, 1) == b"g":
                    out = ("error", failed)
                    if not failed:
                        try:
                            out = ("ok", fn())
                        except BaseException:  # noqa: BLE001
                            failed = traceback.format_exc()
                            out = ("error", failed)
                    data = pickle.dumps(out)
                    with os.fdopen(os.dup(res_w), "wb") as f:
                        f.write(FRAME.pack(len(data)) + data)
            finally:
                os._exit(0)
        os.close(cmd_r)
        os.close(res_w)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = os.read(self.res_r, n - len(data))
            if not part:
                raise SystemExit(f"bench: the worker in {self.path} died")
            data += part
        return data

    def turn(self):
        os.write(self.cmd_w, b"g")
        status, value = pickle.loads(self._read(FRAME.unpack(self._read(FRAME.size))[0]))
        if status != "ok":
            raise SystemExit(f"bench: the worker in {self.path} failed:\n{value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.cmd_w, b"q")
        for fd in (self.cmd_w, self.res_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        stop_server(self.pid)


def run_rounds(names: list, workers: dict, new_worker, turn, record, *, rounds: int, epochs: int,
               warmup: int, what: str) -> None:
    """ROUNDS rounds in EPOCHS epochs. Each epoch closes every worker, then starts new ones
    (workers[name] = new_worker(name); the caller closes the last ones) in an order that
    rotates from epoch to epoch (the first process or connection made must not always be
    the same variant's), and runs `warmup` uncounted rounds first. A round gives every
    name one turn, turn(name, worker), in a shuffled order (seeded): a fixed rotation
    would always put the same variant right after the same other one, e.g. the unpoliced
    turn after the removal of an iptables jump. record(name, result, counted) sees each."""
    rng = random.Random(f"run_rounds {len(names)} {rounds}")
    per_epoch = rounds // epochs
    for epoch in range(epochs):
        progress(f"epoch {epoch + 1}/{epochs}: fresh workers, {warmup} warm-up round(s), then "
                 f"{per_epoch} rounds of {what}")
        close_all(*(workers.pop(name) for name in list(workers)))
        for name in rotated(names, epoch):
            workers[name] = new_worker(name)
        for r in range(-warmup, per_epoch):
            for name in rng.sample(names, len(names)):
                record(name, turn(name, workers[name]), r >= 0)


def close_all(*things) -> None:
    """close() each of things that is not None, in order; every one is tried even if an
    earlier one raises (the first error is raised at the end)."""
    error = None
    for thing in things:
        if thing is None:
            continue
        try:
            thing.close()
        except BaseException as e:  # noqa: BLE001 — close the rest first
            error = error or e
    if error is not None:
        raise error


def listener(host: str, backlog: int) -> tuple[socket.socket, int]:
    """A TCP socket listening on host and a free port: (socket, port)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock, sock.getsockname()[1]


def start_server(fn, *args) -> int:
    """fork a server process (stays in the parent's cgroup) running fn(*args) forever; its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            fn(*args)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(1)
    return pid


def stop_server(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@contextlib.contextmanager
def bpf_stats():
    """Kernel-wide BPF run-time statistics (run_cnt, run_time_ns per program) while the
    block runs: BPF_ENABLE_STATS returns an fd, and closing it (or dying) turns them off."""
    fd = bpfsys.enable_stats()
    try:
        yield
    finally:
        os.close(fd)


def prog_stats(pins: Path) -> dict[str, dict]:
    """bpftool's view of each pinned program: run_cnt, run_time_ns, sizes, verified_insns."""
    out = {}
    for name, _, _ in loader.PROGRAMS:
        proc = subprocess.run(["bpftool", "prog", "show", "pinned", str(pins / f"prog_{name}"), "--json"],
                              capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout)
    return out


def stats_delta(before: dict, after: dict) -> dict[str, dict]:
    return {name: {"runs": after[name].get("run_cnt", 0) - before[name].get("run_cnt", 0),
                   "ns": after[name].get("run_time_ns", 0) - before[name].get("run_time_ns", 0)}
            for name in after}


def with_stats(pins: Path, turns: int, turn) -> tuple[list, dict[str, dict]]:
    """`turns` calls of turn() with BPF run-time statistics on: (their results, the runs and
    ns each pinned program added meanwhile)."""
    with bpf_stats():
        before = prog_stats(pins)
        out = [turn() for _ in range(turns)]
        return out, stats_delta(before, prog_stats(pins))
