"""Benchmark: what a policy costs connect(): safedeploy vs an unpoliced cgroup vs iptables.

Per variant, a long-lived client process (a Worker) moves itself into the variant's cgroup.
A *turn* is TURN_S seconds of: open a TCP socket, connect to a listener on 127.0.0.1, close
(SO_LINGER 0: the close sends a RST, so no TIME_WAIT piles up and the ephemeral port range
never fills). A process in the parent's, unpoliced, cgroup accepts and closes. The
variants, all in cgroups ``<cgroup2>/safedeploy/sdbench-<pid>-*``:

  unpoliced   a cgroup with nothing attached (the baseline)
  safedeploy  a cgroup under a policy of 1, 100 and 10 000 CIDR rules: default allow,
              deny 127.0.0.2/32 and then distinct /24s in 10.0.0.0/8 (so 127.0.0.1 is
              allowed by the default); all 6 programs attached (session.apply)
  iptables    the peer: an unpoliced cgroup, and in OUTPUT ``-m cgroup --path <cgroup>
              -j SDB<pid>_<n>``, a chain of the same CIDRs as ``-d <cidr> -j REJECT``
              rules. The jump is inserted only around that variant's turns.

A round is one turn of every variant, the order rotating from round to round;
WARMUP_ROUNDS rounds are not counted, then ROUNDS rounds. Ratios are per round (variant /
unpoliced of the same round), summarised by their median and a bootstrap 95% interval.
Besides the rate, each turn reports the client's CPU time per connect (its syscalls and
the loopback packet processing they run inline), which a busy neighbour disturbs less.

Before measuring, each variant proves it is what it claims: 127.0.0.1 connects, 127.0.0.2
(a listener is there) gets EPERM under safedeploy, ECONNREFUSED (REJECT) under iptables and
connects when unpoliced. After measuring, the connect events the programs recorded must
add up to the connects made. A last pass with BPF run-time statistics on (BPF_ENABLE_STATS,
only while this script holds the fd) attributes the cost: runs and ns per connect, per program.

Everything BPF runs against a throwaway pin root ``/sys/fs/bpf/sdbench_<pid>`` and state dir,
removed at the end (also on error or SIGTERM), with the cgroups, processes and iptables chains.

This file also holds the helpers throughput.py and dns.py import (Sandbox, Worker, run_in,
Iptables, bpf_stats, paired statistics).

Usage: .venv/bin/python bench/connect.py     (root; cgroup v2, bpffs, bcc, iptables)
Progress goes to stderr, the table to stdout, everything to bench/results/connect.json.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, percentile, print_table, progress, write_results  # noqa: E402

from ocihook import bpfsys, cgroup, loader, maps, session  # noqa: E402
from ocihook.policy import load_policy_text  # noqa: E402

RULE_COUNTS = (1, 100, 10_000)
ROUNDS = 100  # measured rounds; every variant takes one turn per round
TURN_S = 0.05  # seconds of connect+close per turn (ROUNDS * TURN_S = 5 s per variant)
WARMUP_ROUNDS = 3
STATS_TURNS = 10  # per policed variant, BPF run-time statistics on
TARGET_RATIO = 0.95  # connect rate under a policy vs unpoliced ("within 5%")

BPFFS = Path("/sys/fs/bpf")
HOST, DENIED_HOST = "127.0.0.1", "127.0.0.2"
LINGER0 = struct.pack("ii", 1, 0)
BATCH = 32  # connects between two clock reads


# -- helpers shared with throughput.py and dns.py ------------------------------------------


class Sandbox:
    """A throwaway pin root and state dir (the real /sys/fs/bpf/safedeploy is never touched),
    the programs compiled into it, and every cgroup made through it; close() removes all."""

    def __init__(self, tag: str):
        self.tag = f"sdbench-{os.getpid()}-{tag}"
        self.root = BPFFS / f"sdbench_{os.getpid()}"
        self.state = Path(tempfile.mkdtemp(prefix="sdbench_state_"))
        os.environ["SAFEDEPLOY_BPFFS"] = str(self.root)  # read at call time
        os.environ["SAFEDEPLOY_STATE_DIR"] = str(self.state)
        self.cgroups: list[tuple[Path, object, dict | None]] = []
        progress(f"pin root {self.root}, state dir {self.state}; compiling the programs (bcc, ~1 s)")
        try:
            self.pins = loader.ensure_programs()
        except BaseException:
            self.close()
            raise
        self.pin_version = self.pins.name

    def cgroup(self, name: str, policy_text: str | None = None) -> tuple[Path, object, dict | None]:
        """A fresh cgroup <cgroup2>/safedeploy/<tag>-<name>, under policy_text if given."""
        path = cgroup.create(f"{self.tag}-{name}")
        att = compiled = None
        try:
            if policy_text is not None:
                compiled = maps.compile_policy(load_policy_text(policy_text, f"bench-{name}"))
                att = session.apply(path, compiled)
        except BaseException:
            cgroup.remove(path)
            raise
        self.cgroups.append((path, att, compiled))
        return path, att, compiled

    def attached(self, path: Path) -> int:
        with loader.Programs(self.pins) as progs:
            return progs.attached_to(path)

    def release(self, path: Path) -> list:
        """Kill what runs in the cgroup, release its policy, remove it; the drained events."""
        for i, (p, att, compiled) in enumerate(self.cgroups):
            if p == path:
                del self.cgroups[i]
                try:
                    cgroup.remove(p)
                finally:
                    out = session.release(att, compiled) if att is not None else None
                return drained_events(out)
        return []

    def close(self) -> None:
        errors = []
        for path, _, _ in list(self.cgroups):
            try:
                self.release(path)
            except Exception as e:  # noqa: BLE001 — clean up the rest, then report
                errors.append(f"{path}: {e}")
        remove_pin_root(self.root)
        shutil.rmtree(self.state, ignore_errors=True)
        progress(f"removed {self.root}, {self.state} and the cgroups")
        if errors:
            raise SystemExit(f"bench: cleanup failed: {'; '.join(errors)}")


def drained_events(out) -> list:
    """(EventKey, EventVal) pairs of session.release's result, whichever shape it has
    (a Drained object, or the older (events, names) tuple)."""
    if out is None:
        return []
    return list(out.events) if hasattr(out, "events") else list(out[0])


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


def run_in(path: Path, fn, *args):
    """fork; the child joins cgroup `path`, runs fn(*args) and sends the result back
    (pickled). Anything the child raises fails the benchmark loudly."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                cgroup.move_self(path)
                out = ("ok", fn(*args))
            except BaseException:  # noqa: BLE001 — report anything to the parent
                out = ("error", traceback.format_exc())
            with os.fdopen(w, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise SystemExit(f"bench: child in {path} died without a result")
    status, value = pickle.loads(data)
    if status != "ok":
        raise SystemExit(f"bench: child in {path} failed:\n{value}")
    return value


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


def try_connect(host: str, port: int, timeout: float = 2.0) -> str:
    """'ok' or the errno name of one TCP connect()."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def deny_cidrs(n: int) -> list[str]:
    """127.0.0.2/32, then distinct /24s in 10.0.0.0/8: none of them holds 127.0.0.1."""
    return ["127.0.0.2/32"] + [f"10.{i >> 8}.{i & 255}.0/24" for i in range(n - 1)]


def policy_text(n: int) -> str:
    """Default allow, n CIDR deny rules (deny_cidrs)."""
    return json.dumps({"version": 1, "name": f"bench-{n}", "mode": "enforce", "default": "allow",
                       "deny": deny_cidrs(n)})


def rules(n) -> str:
    return f"{int(n):,} rule" + ("" if int(n) == 1 else "s")


class Iptables:
    """The iptables peer: chains SDB<pid>_<n> of ``-d <cidr> -j REJECT``, entered from OUTPUT
    through ``-m cgroup --path <cgroup relative to the cgroup2 mount>`` only inside
    ``active()``. close() deletes the chains (and the filter table when this run created
    it and left it empty)."""

    def __init__(self):
        self.chains: list[str] = []
        self.jumps: list[list[str]] = []
        self.version = ""
        self.error = ""
        self.table_existed = False
        try:
            self.version = self._run(["iptables", "--version"]).strip()
            self.table_existed = subprocess.run(["nft", "list", "table", "ip", "filter"],
                                                capture_output=True).returncode == 0
        except (OSError, RuntimeError) as e:
            self.error = f"iptables unusable: {e}"

    @staticmethod
    def _run(args: list[str], stdin: str | None = None) -> str:
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:6])}: {proc.stderr.strip()[-300:]}")
        return proc.stdout

    def add_chain(self, n: int) -> str:
        chain = f"SDB{os.getpid()}_{n}"
        lines = ["*filter", f":{chain} - [0:0]"]
        lines += [f"-A {chain} -d {cidr} -j REJECT" for cidr in deny_cidrs(n)]
        lines.append("COMMIT")
        self.chains.append(chain)
        self._run(["iptables-restore", "--noflush"], "\n".join(lines) + "\n")
        return chain

    @staticmethod
    def cgroup_match(path: Path) -> str:
        return str(path.relative_to(cgroup.cgroup2_mount()))

    @contextlib.contextmanager
    def active(self, chain: str, path: Path):
        rule = ["OUTPUT", "-m", "cgroup", "--path", self.cgroup_match(path), "-j", chain]
        self._run(["iptables", "-I", rule[0], "1", *rule[1:]])
        self.jumps.append(rule)
        try:
            yield
        finally:
            self.jumps.remove(rule)
            self._run(["iptables", "-D", *rule])

    def close(self) -> None:
        for rule in list(self.jumps):
            with contextlib.suppress(RuntimeError):
                self._run(["iptables", "-D", *rule])
        for chain in self.chains:
            with contextlib.suppress(RuntimeError):
                self._run(["iptables", "-F", chain])
                self._run(["iptables", "-X", chain])
        if self.chains and not self.table_existed:
            with contextlib.suppress(RuntimeError, OSError):
                left = [ln for ln in self._run(["iptables", "-S"]).splitlines() if not ln.startswith("-P ")]
                if not left:
                    self._run(["nft", "delete", "table", "ip", "filter"])
        progress(f"removed the iptables chains {', '.join(self.chains) or '(none)'}")
        self.chains = []


BPF_ENABLE_STATS = 32  # bpf(2) command; BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def bpf_stats():
    """Kernel-wide BPF run-time statistics (run_cnt, run_time_ns per program) while the
    block runs: BPF_ENABLE_STATS returns an fd, and closing it (or dying) turns them off."""
    attr = bpfsys._attr()
    fd = bpfsys._bpf(BPF_ENABLE_STATS, attr, "enable BPF run-time stats")
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


def rotated(names: list[str], r: int) -> list[str]:
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


def git_state() -> str:
    """HEAD and whether the tree had uncommitted changes (the programs measured are the
    working tree's)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def netfilter_state() -> dict:
    """The nftables tables present and the conntrack entry count: a nat table (podman's
    netavark makes one) puts conntrack on every loopback packet, for every variant alike."""
    try:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        tables = [ln.removeprefix("table ").strip() for ln in out.splitlines() if ln.startswith("table ")]
    except OSError:
        tables = []
    try:
        conntrack = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
    except (OSError, ValueError):
        conntrack = None
    return {"tables": tables, "conntrack_entries": conntrack}


def describe_netfilter(before: dict, after: dict) -> str:
    def one(st: dict) -> str:
        ct = "conntrack not loaded" if st["conntrack_entries"] is None else \
            f"conntrack loaded ({st['conntrack_entries']} entries)"
        return f"tables: {', '.join(st['tables']) or 'none'}; {ct}"
    return f"netfilter at start: {one(before)}" + ("" if before == after else f" | at end: {one(after)}")


# -- the client and the server -----------------------------------------------------------


def connect_turns(port: int, seconds: float):
    """Worker setup: a function doing connect+close to 127.0.0.1:port for `seconds`, which
    returns (connects, wall ns, CPU ns of this process: its syscalls and the loopback packet
    processing they run)."""
    addr = (HOST, port)
    new, sol, linger, lv = socket.socket, socket.SOL_SOCKET, socket.SO_LINGER, LINGER0
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    span = int(seconds * 1e9)

    def turn() -> tuple[int, int, int]:
        n = 0
        c0 = cpu_clock()
        t0 = clock()
        end = t0 + span
        while True:
            for _ in range(BATCH):
                s = new()
                s.setsockopt(sol, linger, lv)
                s.connect(addr)
                s.close()
            n += BATCH
            t = clock()
            if t >= end:
                return n, t - t0, cpu_clock() - c0
    return turn


def acceptor(lsock: socket.socket) -> None:
    while True:
        conn, _ = lsock.accept()
        conn.close()


def checks(port: int, denied_port: int) -> dict:
    return {"allowed": try_connect(HOST, port), "denied": try_connect(DENIED_HOST, denied_port)}


# -- the benchmark ---------------------------------------------------------------------------


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("bench/connect.py: needs root (cgroups, bpf, iptables)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (cleanup)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, 0))
    lsock.listen(4096)
    port = lsock.getsockname()[1]
    dsock = socket.socket()  # the check listener on the denied address, never accepted
    dsock.bind((DENIED_HOST, 0))
    dsock.listen(64)
    dport = dsock.getsockname()[1]
    server = start_server(acceptor, lsock)
    sandbox = ipt = None
    variants: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    nf_before = netfilter_state()
    try:
        sandbox = Sandbox("connect")
        ipt = Iptables()
        path, _, _ = sandbox.cgroup("plain")
        variants["unpoliced"] = {"path": path, "kind": "unpoliced", "rules": 0}
        for n in RULE_COUNTS:
            progress(f"safedeploy, {rules(n)}: parse, compile, apply")
            path, _, compiled = sandbox.cgroup(f"sd{n}", policy_text(n))
            variants[f"safedeploy, {rules(n)}"] = {"path": path, "kind": "safedeploy", "rules": n,
                                                   "map_entries": len(compiled["cidrs"])}
        if not ipt.error:
            try:
                for n in RULE_COUNTS:
                    chain = ipt.add_chain(n)
                    path, _, _ = sandbox.cgroup(f"ipt{n}")
                    variants[f"iptables, {rules(n)}"] = {"path": path, "kind": "iptables", "rules": n,
                                                         "chain": chain}
            except RuntimeError as e:
                ipt.error = f"iptables peer not set up: {e}"
        if ipt.error:
            progress(f"{ipt.error}: the iptables rows are reported as unavailable")
            variants = {k: v for k, v in variants.items() if v["kind"] != "iptables"}

        @contextlib.contextmanager
        def entered(name: str):
            v = variants[name]
            if v["kind"] == "iptables":
                with ipt.active(v["chain"], v["path"]):
                    yield
            else:
                yield

        # honesty checks (also leaves the filter table's OUTPUT hook in place for every variant)
        expect = {"unpoliced": "ok", "safedeploy": "EPERM", "iptables": "ECONNREFUSED"}
        for name, v in variants.items():
            with entered(name):
                got = run_in(v["path"], checks, port, dport)
            attached = sandbox.attached(v["path"])
            want_attached = len(loader.PROGRAMS) if v["kind"] == "safedeploy" else 0
            if got != {"allowed": "ok", "denied": expect[v["kind"]]} or attached != want_attached:
                raise SystemExit(f"bench/connect.py: variant {name!r} is not what it claims: {got}, "
                                 f"{attached} programs attached")
            v["check"] = f"{DENIED_HOST}: {got['denied']}"
            progress(f"check {name}: {HOST} ok, {DENIED_HOST} {got['denied']}, {attached} programs attached")

        names = list(variants)
        for name in names:
            workers[name] = Worker(variants[name]["path"], connect_turns, port, TURN_S)
        progress(f"{WARMUP_ROUNDS} warm-up rounds, then {ROUNDS} rounds of one {TURN_S} s turn per variant")
        made = {name: 0 for name in names}
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpu_us: dict[str, list[float]] = {name: [] for name in names}
        counts: dict[str, list[int]] = {name: [] for name in names}
        for r in range(-WARMUP_ROUNDS, ROUNDS):
            if r >= 0 and r % 20 == 0:
                progress(f"round {r + 1}/{ROUNDS}")
            for name in rotated(names, r):
                with entered(name):
                    n, ns, cpu = workers[name].turn()
                made[name] += n
                if r >= 0:
                    rates[name].append(n / (ns / 1e9))
                    cpu_us[name].append(cpu / 1e3 / n)
                    counts[name].append(n)

        progress(f"BPF run-time statistics pass: {STATS_TURNS} turns per safedeploy variant (stats on, "
                 "not in the rates)")
        stats = {}
        with bpf_stats():
            for name in names:
                if variants[name]["kind"] != "safedeploy":
                    continue
                before = prog_stats(sandbox.pins)
                n = ns = 0
                for _ in range(STATS_TURNS):
                    dn, dns, _ = workers[name].turn()
                    n, ns = n + dn, ns + dns
                made[name] += n
                delta = stats_delta(before, prog_stats(sandbox.pins))
                stats[name] = {"connects": n, "rate": n / (ns / 1e9), "programs": delta}
        # every connect of the measured loops went through the connect4 program
        recorded = {}

        def release_and_count(name: str) -> None:
            workers.pop(name).close()
            events = sandbox.release(variants[name]["path"])
            allowed = sum(val.count for key, val in events
                          if key.kind == maps.C["SD_KIND_CONNECT"] and key.verdict == maps.C["SD_EV_ALLOWED"]
                          and bytes(key.addr) == bytes(10) + b"\xff\xff" + socket.inet_aton(HOST))
            want = made[name] + 1  # + the check's allowed connect
            recorded[name] = allowed
            if allowed != want:
                raise SystemExit(f"bench/connect.py: {name}: {allowed} allowed connect events, {want} connects made")
            progress(f"{name}: {allowed:,} connects made, {allowed:,} judged and recorded by the programs")

        sd_names = [name for name in names if variants[name]["kind"] == "safedeploy"]
        for name in sd_names[1:]:
            release_and_count(name)
        # the maps are shared: the 1-rule policy's lookups above walked a trie holding every
        # policy's entries. Once more with the 1-rule policy alone in the maps.
        alone = f"{sd_names[0]} (alone in the maps)"
        progress(f"BPF run-time statistics pass: {alone}, {STATS_TURNS} turns")
        with bpf_stats():
            before = prog_stats(sandbox.pins)
            n = ns = 0
            for _ in range(STATS_TURNS):
                dn, dns, _ = workers[sd_names[0]].turn()
                n, ns = n + dn, ns + dns
            made[sd_names[0]] += n
            stats[alone] = {"connects": n, "rate": n / (ns / 1e9),
                            "programs": stats_delta(before, prog_stats(sandbox.pins))}
        release_and_count(sd_names[0])
        for worker in workers.values():
            worker.close()
        workers.clear()
        nf_after = netfilter_state()
    finally:
        for worker in workers.values():
            worker.close()
        stop_server(server)
        lsock.close()
        dsock.close()
        try:
            if ipt is not None:
                ipt.close()
        finally:
            if sandbox is not None:
                sandbox.close()

    results = report(variants, rates, cpu_us, counts, stats, recorded, ipt)
    print(describe_netfilter(nf_before, nf_after))
    path = write_results("connect", {
        "pin_version": sandbox.pin_version, "source": git_state(), "iptables": ipt.version,
        "netfilter": {"start": nf_before, "end": nf_after},
        "iptables_error": ipt.error, "rounds": ROUNDS, "turn_s": TURN_S,
        "variants": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                     for k, v in variants.items()},
        "samples": {"rates_per_s": rates, "client_cpu_us_per_connect": cpu_us, "connects": counts}, "bpf_stats": stats,
        "recorded_connect_events": recorded, **results})
    progress(f"results in {path}")
    return 0


def report(variants: dict, rates: dict, cpu_us: dict, counts: dict, stats: dict, recorded: dict,
           ipt: Iptables) -> dict:
    summ = paired(rates, "unpoliced")
    cpu = paired(cpu_us, "unpoliced")
    rows = []
    for name, s in summ.items():
        base_us = [1e6 / x for x in rates["unpoliced"]]
        s["extra_us_median"] = median([1e6 / x - b for x, b in zip(rates[name], base_us)])
        c = cpu[name]
        rows.append([name, s["n"], f"{sum(counts[name]):,}", f"{s['median']:,.0f}",
                     f"{s['ratio_median']:.3f}", "{:.3f}-{:.3f}".format(*s["ratio_ci95"]),
                     f"{s['extra_us_median']:+.2f}", f"{c['median']:.2f}", f"{c['ratio_median']:.3f}",
                     "{:.3f}-{:.3f}".format(*c["ratio_ci95"]), variants[name].get("check", "")])
    if ipt.error:
        for n in RULE_COUNTS:
            rows.append([f"iptables, {rules(n)}", 0, "-", "-", "-", "-", "-", "-", "-", "-", "unavailable"])
    print_table(["variant (connect+close to 127.0.0.1)", "turns", "connects", "median/s", "ratio",
                 "ratio 95% CI", "+us/conn", "cpu us/conn", "cpu ratio", "cpu 95% CI", "check"], rows)
    print("ratio: median of per-round ratios to the unpoliced turn of the same round (bootstrap CI); "
          "+us/conn: wall time added per connect; cpu: the client's CPU time per connect")
    if ipt.error:
        print(f"iptables peer: {ipt.error}")

    print()
    srows = []
    base_us = 1e6 / summ["unpoliced"]["median"]
    for name, st in stats.items():
        for prog, d in st["programs"].items():
            if d["runs"]:
                srows.append([name, prog, f"{d['runs'] / st['connects']:.2f}", f"{d['ns'] / d['runs']:,.0f}",
                              f"{d['ns'] / st['connects']:,.0f}", ""])
        total = sum(d["ns"] for d in st["programs"].values())
        st["ns_per_connect"] = total / st["connects"]
        st["share_of_unpoliced_connect"] = st["ns_per_connect"] / 1e3 / base_us
        srows.append([name, "all programs", "", "", f"{st['ns_per_connect']:,.0f}",
                      f"{st['share_of_unpoliced_connect'] * 100:.1f}%"])
    print_table(["BPF run-time stats (separate pass)", "program", "runs/conn", "ns/run", "ns/conn",
                 "of unpoliced connect"], srows)

    print()
    verdicts = {}
    for n in RULE_COUNTS:
        sd = f"safedeploy, {rules(n)}"
        ip = f"iptables, {rules(n)}"
        r, (lo, hi) = summ[sd]["ratio_median"], summ[sd]["ratio_ci95"]
        v = {"ratio_vs_unpoliced": r, "ratio_ci95": [lo, hi], "within_5pct": r >= TARGET_RATIO,
             "cpu_ratio_vs_unpoliced": cpu[sd]["ratio_median"],
             "bpf_share_of_unpoliced_connect": stats.get(sd, {}).get("share_of_unpoliced_connect")}
        line = (f"{sd}: {r:.3f}x the unpoliced rate ({(r - 1) * 100:+.1f}%, 95% CI {lo:.3f}-{hi:.3f}): "
                f"{'meets' if r >= TARGET_RATIO else 'MISSES'} the within-5% target")
        if ip in rates:
            per_round = [a / b for a, b in zip(rates[sd], rates[ip])]
            v["ratio_vs_iptables"] = median(per_round)
            v["no_worse_than_iptables"] = v["ratio_vs_iptables"] >= 1.0
            line += (f"; {v['ratio_vs_iptables']:.3f}x the iptables rate "
                     f"({'no worse' if v['no_worse_than_iptables'] else 'WORSE'})")
        else:
            line += "; iptables peer unavailable"
        verdicts[sd] = v
        print(line)
    return {"summary": summ, "summary_cpu": cpu, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(main())
