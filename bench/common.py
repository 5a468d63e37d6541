"""Helpers shared by the benchmark scripts; each bench/*.py keeps only its own measurement.

  timing       now_ns, timed, run_timed (a child process's wall time), progress
  statistics   percentile, median, summary_ms, bootstrap_ci, paired, rotated, MsTable
  results      print_table, machine_info, git_state, netfilter_state, describe_netfilter,
               write_results (bench/results/<name>.json with the machine and the source)
  set-up       begin (root check, SIGTERM runs the finally blocks), temp_cgroup,
               Sandbox (a throwaway pin root and state dir, the programs, policed cgroups)
  processes    run_in (one call in a cgroup), Worker (a long-lived child in a cgroup taking
               turns), run_rounds (rounds of interleaved turns in epochs of fresh workers),
               start_server / stop_server, listener, close_all
  BPF          bpf_stats (run-time statistics on), prog_stats, stats_delta, drained_events
  network      HOST / DENIED_HOST, try_connect, checks, deny_cidrs, policy_text, rules,
               Iptables (the iptables peer), Variants (unpoliced / safedeploy / iptables
               cgroups, each proven to be what it claims)
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pickle
import platform
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

from ocihook import bpfsys, cgroup, loader, maps, session

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
BPFFS = Path("/sys/fs/bpf")


# -- timing ----------------------------------------------------------------------------------


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


def write_results(name: str, results: dict) -> Path:
    """bench/results/<name>.json with the machine, the source and the command; returns the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {"benchmark": name, "machine": machine_info(), "source": git_state(),
           "command": " ".join([sys.executable, *sys.argv]), **results}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# -- set-up ----------------------------------------------------------------------------------


_STARTED: dict = {}


def begin(script: str, needs: str) -> None:
    """Every benchmark's start: root, SIGTERM runs the finally blocks (the cleanup), and the
    load average at the start goes into the results (a sign of neighbours at work)."""
    if os.geteuid() != 0:
        raise SystemExit(f"bench/{script}: needs root ({needs})")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _STARTED.update(loadavg_at_start=os.getloadavg(),
                    started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


@contextlib.contextmanager
def temp_cgroup(name: str):
    """A fresh cgroup <cgroup2>/safedeploy/<name>, removed on the way out."""
    path = Path(cgroup.create(name))
    try:
        yield path
    finally:
        cgroup.remove(path)


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


def drained_events(out) -> list:
    """(EventKey, EventVal) pairs of session.release's session.Drained (None: none)."""
    return [] if out is None else list(out.events)


class Sandbox:
    """A throwaway pin root /sys/fs/bpf/sdbench_<pid> and state dir (the real
    /sys/fs/bpf/safedeploy is never touched), set in the environment for this process and
    its children, the programs compiled into it (unless compile=False), and every cgroup
    made through it; close() removes all."""

    def __init__(self, tag: str, compile: bool = True):
        self.tag = f"sdbench-{os.getpid()}-{tag}"
        self.root = BPFFS / f"sdbench_{os.getpid()}"
        self.state = Path(tempfile.mkdtemp(prefix="sdbench_state_"))
        os.environ["SAFEDEPLOY_BPFFS"] = str(self.root)  # read at call time
        os.environ["SAFEDEPLOY_STATE_DIR"] = str(self.state)
        self.cgroups: list[tuple[Path, object, dict | None]] = []
        self.pins = self.pin_version = None
        progress(f"pin root {self.root}, state dir {self.state}")
        if compile:
            try:
                self.compile()
            except BaseException:
                self.close()
                raise

    def compile(self) -> Path:
        """Compile and pin the programs (bcc, ~1 s) unless the current version is pinned."""
        progress("compiling the programs into the pin root (bcc, ~1 s) unless pinned")
        self.pins = Path(loader.ensure_programs())
        self.pin_version = self.pins.name
        return self.pins

    def cgroup(self, name: str, policy_text: str | None = None) -> tuple[Path, object, dict | None]:
        """A fresh cgroup <cgroup2>/safedeploy/<tag>-<name>, under policy_text if given."""
        from ocihook.policy import load_policy_text  # noqa: PLC0415 — apply.py times its first use

        path = Path(cgroup.create(f"{self.tag}-{name}"))
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


# -- processes -------------------------------------------------------------------------------


def run_in(path: Path, fn, *args):
    """cgroup.run_in, failing the benchmark loudly."""
    try:
        return cgroup.run_in(path, fn, *args)
    except RuntimeError as e:
        raise SystemExit(f"bench: {e}") from None


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


# -- BPF run-time statistics -------------------------------------------------------------------

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


def with_stats(pins: Path, turns: int, turn) -> tuple[list, dict[str, dict]]:
    """`turns` calls of turn() with BPF run-time statistics on: (their results, the runs and
    ns each pinned program added meanwhile)."""
    with bpf_stats():
        before = prog_stats(pins)
        out = [turn() for _ in range(turns)]
        return out, stats_delta(before, prog_stats(pins))


# -- network: the targets, the policies, the iptables peer, the variants -----------------------

HOST, DENIED_HOST = "127.0.0.1", "127.0.0.2"


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


def checks(port: int, denied_port: int) -> dict:
    return {"allowed": try_connect(HOST, port), "denied": try_connect(DENIED_HOST, denied_port)}


def deny_cidrs(n: int) -> list[str]:
    """127.0.0.2/32, then distinct /24s in 10.0.0.0/8: none of them holds 127.0.0.1."""
    return ["127.0.0.2/32"] + [f"10.{i >> 8}.{i & 255}.0/24" for i in range(n - 1)]


def policy_text(n: int) -> str:
    """Default allow, n CIDR deny rules (deny_cidrs): 2n map entries (tcp and udp)."""
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
        return str(Path(path).relative_to(cgroup.cgroup2_mount()))

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


class Variants(dict):
    """name -> {"path", "kind", "rules", ...} for the network benchmarks: "unpoliced" (an empty
    cgroup), "safedeploy, N rules" (policy_text(N) applied) and, when iptables works,
    "iptables, N rules" (an unpoliced cgroup and a chain of the same CIDRs)."""

    EXPECT = {"unpoliced": "ok", "safedeploy": "EPERM", "iptables": "ECONNREFUSED"}

    def __init__(self, sandbox: Sandbox, ipt: Iptables, rule_counts: tuple[int, ...]):
        super().__init__()
        self.sandbox, self.ipt = sandbox, ipt
        self["unpoliced"] = {"path": sandbox.cgroup("plain")[0], "kind": "unpoliced", "rules": 0}
        for n in rule_counts:
            progress(f"safedeploy, {rules(n)}: parse, compile, apply")
            path, _, compiled = sandbox.cgroup(f"sd{n}", policy_text(n))
            self[f"safedeploy, {rules(n)}"] = {"path": path, "kind": "safedeploy", "rules": n,
                                               "map_entries": len(compiled["cidrs"])}
        if not ipt.error:
            try:
                for n in rule_counts:
                    chain = ipt.add_chain(n)
                    self[f"iptables, {rules(n)}"] = {"path": sandbox.cgroup(f"ipt{n}")[0], "kind": "iptables",
                                                     "rules": n, "chain": chain}
            except RuntimeError as e:
                ipt.error = f"iptables peer not set up: {e}"
        if ipt.error:
            progress(f"{ipt.error}: the iptables rows are reported as unavailable")
            for name in [k for k, v in self.items() if v["kind"] == "iptables"]:
                del self[name]

    @property
    def pins(self) -> Path:
        return self.sandbox.pins

    def of_kind(self, kind: str) -> list[str]:
        return [name for name, v in self.items() if v["kind"] == kind]

    def turn(self, name: str, worker):
        """worker.turn() for variant `name`, with its iptables jump in place if it has one."""
        with self.entered(name):
            return worker.turn()

    @contextlib.contextmanager
    def entered(self, name: str):
        """Around a turn of `name`: its iptables jump, if it is an iptables variant."""
        v = self[name]
        if v["kind"] == "iptables":
            with self.ipt.active(v["chain"], v["path"]):
                yield
        else:
            yield

    def prove(self, port: int, denied_port: int, script: str) -> None:
        """Each variant is what it claims: HOST:port connects; DENIED_HOST:denied_port (a
        listener is there) gets EPERM under safedeploy, ECONNREFUSED under iptables and
        connects unpoliced; the programs are attached to the safedeploy cgroups only."""
        for name, v in self.items():
            with self.entered(name):
                got = run_in(v["path"], checks, port, denied_port)
            attached = self.sandbox.attached(v["path"])
            want_attached = len(loader.PROGRAMS) if v["kind"] == "safedeploy" else 0
            if got != {"allowed": "ok", "denied": self.EXPECT[v["kind"]]} or attached != want_attached:
                raise SystemExit(f"bench/{script}: variant {name!r} is not what it claims: {got}, "
                                 f"{attached} programs attached")
            v["check"] = f"{DENIED_HOST}: {got['denied']}"
            progress(f"check {name}: {HOST} ok, {DENIED_HOST} {got['denied']}, {attached} programs attached")

    def to_json(self) -> dict:
        return {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()} for k, v in self.items()}


@contextlib.contextmanager
def network_variants(tag: str, rule_counts: tuple[int, ...], port: int, denied_port: int, script: str):
    """A Sandbox, the iptables peer and their Variants, each proven (Variants.prove) before
    it is yielded; the chains, cgroups, pins and state dir are removed on the way out."""
    sandbox = ipt = None
    try:
        sandbox = Sandbox(tag)
        ipt = Iptables()
        variants = Variants(sandbox, ipt, rule_counts)
        variants.prove(port, denied_port, script)
        yield variants
    finally:
        close_all(ipt, sandbox)
