"""Benchmark: bulk TCP throughput of a policed sender: safedeploy vs unpoliced vs iptables.

Per variant, a sender process moves itself into the variant's cgroup and opens one TCP
connection (4 MiB SO_SNDBUF) to its own receiver on 127.0.0.1 (a process in the parent's,
unpoliced, cgroup; 4 MiB SO_RCVBUF). Both live for the whole run. A *turn* is: send
TURN_BYTES (64 MiB, 1 MiB per send()), then wait for the receiver's 1-byte acknowledgement
that it has read them all; its wall time gives MB/s. Every data segment leaves through the
sender's cgroup egress hook and every ACK comes back through its ingress hook, which is
where safedeploy's DNS programs sit. The variants, all in cgroups
``<cgroup2>/safedeploy/sdbench-<pid>-*``:

  unpoliced   nothing attached (the baseline)
  safedeploy  a policy of 1 and of 100 CIDR rules (connect.policy_text: default allow, deny
              127.0.0.2/32 and /24s in 10.0.0.0/8); all 6 programs attached
  iptables    the peer: an unpoliced cgroup, ``-m cgroup --path`` in OUTPUT jumping to a
              chain of the same ``-d <cidr> -j REJECT`` rules (connect.Iptables), the jump
              inserted only around that variant's turns

A round is one turn of every variant, the order rotating; WARMUP_ROUNDS rounds are not
counted, then ROUNDS rounds (ROUNDS x 64 MiB, ~16-20 GB per variant). Short, interleaved
turns on long-lived connections: on this VM a fresh connection per 1 GB sample varied by
2x from one sample to the next, a turn on a warm connection by ~+-20%, and pairing turns
of the same round cancels the slower drift. Ratios are per round (variant / unpoliced of
the same round), summarised by their median and a bootstrap 95% interval; "ratio totals"
divides the total times instead. Before measuring, each variant proves what it is
(127.0.0.2: EPERM / ECONNREFUSED / connects). A last pass with BPF run-time statistics on
counts the program runs per GB and what they cost.

Everything BPF runs against a throwaway pin root and state dir (connect.Sandbox), removed at
the end with the cgroups, the processes and the iptables chains.

Usage: .venv/bin/python bench/throughput.py     (root; cgroup v2, bpffs, bcc, iptables)
Progress goes to stderr, the table to stdout, everything to bench/results/throughput.json.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, print_table, progress, write_results  # noqa: E402
from connect import (DENIED_HOST, HOST, Iptables, Sandbox, Worker, bpf_stats, checks, describe_netfilter,  # noqa: E402
                     git_state, netfilter_state, paired, policy_text, prog_stats, rotated, rules, run_in,
                     start_server, stats_delta, stop_server)

from ocihook import loader  # noqa: E402

RULE_COUNTS = (1, 100)
ROUNDS = 300  # measured rounds: every variant sends one turn per round
WARMUP_ROUNDS = 4
STATS_TURNS = 16  # per safedeploy variant, BPF run-time statistics on
TURN_BYTES = 64 << 20  # one turn: 64 MiB, then the receiver's 1-byte acknowledgement
CHUNK = 1 << 20  # bytes per send()/recv_into()
SOCKBUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF (net.core.{w,r}mem_max is 4 MiB here)
TARGET_RATIO = 0.97  # throughput under a policy vs unpoliced ("within 3%")
MB = 1e6


def receiver(lsock: socket.socket) -> None:
    """One connection: acknowledge every TURN_BYTES with one byte, until EOF."""
    conn, _ = lsock.accept()
    lsock.close()
    mv = memoryview(bytearray(CHUNK))
    while True:
        got = 0
        while got < TURN_BYTES:
            k = conn.recv_into(mv, min(CHUNK, TURN_BYTES - got))
            if not k:
                return
            got += k
        conn.sendall(b"k")


def sender(port: int):
    """Worker setup, in the variant's cgroup: connect to the receiver; returns one turn
    (TURN_BYTES, then wait for the acknowledgement) -> (wall ns, CPU ns of the sender)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
    s.connect((HOST, port))
    mv = memoryview(bytes(CHUNK))
    chunks = TURN_BYTES // CHUNK
    clock, cpu_clock, sendall = time.perf_counter_ns, time.thread_time_ns, s.sendall

    def turn() -> tuple[int, int]:
        c0 = cpu_clock()
        t0 = clock()
        for _ in range(chunks):
            sendall(mv)
        if s.recv(1) != b"k":
            raise RuntimeError("the receiver closed the connection")
        return clock() - t0, cpu_clock() - c0
    return turn


class Stream:
    """A long-lived sender (a Worker in the variant's cgroup) and its receiver (a process
    in this process's cgroup), one TCP connection between them."""

    def __init__(self, path: Path):
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)  # inherited by the accepted socket
        lsock.bind((HOST, 0))
        lsock.listen(1)
        self.receiver = start_server(receiver, lsock)
        port = lsock.getsockname()[1]
        lsock.close()
        self.worker = None
        try:
            self.worker = Worker(path, sender, port)
        except BaseException:
            stop_server(self.receiver)
            raise

    def turn(self) -> tuple[int, int]:
        return self.worker.turn()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        stop_server(self.receiver)


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("bench/throughput.py: needs root (cgroups, bpf, iptables)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (cleanup)
    dsock = socket.socket()  # the check listener on the denied address, never accepted
    dsock.bind((DENIED_HOST, 0))
    dsock.listen(16)
    dport = dsock.getsockname()[1]
    csock = socket.socket()  # the check listener on 127.0.0.1
    csock.bind((HOST, 0))
    csock.listen(16)
    cport = csock.getsockname()[1]
    sandbox = ipt = None
    variants: dict[str, dict] = {}
    streams: dict[str, Stream] = {}
    nf_before = netfilter_state()
    try:
        sandbox = Sandbox("tput")
        ipt = Iptables()
        variants["unpoliced"] = {"path": sandbox.cgroup("plain")[0], "kind": "unpoliced"}
        for n in RULE_COUNTS:
            variants[f"safedeploy, {rules(n)}"] = {"path": sandbox.cgroup(f"sd{n}", policy_text(n))[0],
                                                   "kind": "safedeploy", "rules": n}
        if not ipt.error:
            try:
                for n in RULE_COUNTS:
                    chain = ipt.add_chain(n)
                    variants[f"iptables, {rules(n)}"] = {"path": sandbox.cgroup(f"ipt{n}")[0], "kind": "iptables",
                                                         "rules": n, "chain": chain}
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

        expect = {"unpoliced": "ok", "safedeploy": "EPERM", "iptables": "ECONNREFUSED"}
        for name, v in variants.items():
            with entered(name):
                got = run_in(v["path"], checks, cport, dport)
            attached = sandbox.attached(v["path"])
            want_attached = len(loader.PROGRAMS) if v["kind"] == "safedeploy" else 0
            if got != {"allowed": "ok", "denied": expect[v["kind"]]} or attached != want_attached:
                raise SystemExit(f"bench/throughput.py: variant {name!r} is not what it claims: {got}, "
                                 f"{attached} programs attached")
            v["check"] = f"{DENIED_HOST}: {got['denied']}"
            progress(f"check {name}: {DENIED_HOST} {got['denied']}, {attached} programs attached")

        names = list(variants)
        for name in names:
            streams[name] = Stream(variants[name]["path"])
        progress(f"{WARMUP_ROUNDS} warm-up rounds, then {ROUNDS} rounds of one {TURN_BYTES >> 20} MiB turn per "
                 f"variant ({ROUNDS * TURN_BYTES / 1e9:.1f} GB per variant)")
        mbps: dict[str, list[float]] = {name: [] for name in names}
        cpu_s_per_gb: dict[str, list[float]] = {name: [] for name in names}
        for r in range(-WARMUP_ROUNDS, ROUNDS):
            if r >= 0 and r % 40 == 0:
                progress(f"round {r + 1}/{ROUNDS}")
            for name in rotated(names, r):
                with entered(name):
                    wall, cpu = streams[name].turn()
                if r >= 0:
                    mbps[name].append(TURN_BYTES / MB / (wall / 1e9))
                    cpu_s_per_gb[name].append(cpu / 1e9 / (TURN_BYTES / 1e9))

        progress(f"BPF run-time statistics pass: {STATS_TURNS} turns per safedeploy variant (stats on)")
        stats = {}
        with bpf_stats():
            for name in names:
                if variants[name]["kind"] != "safedeploy":
                    continue
                before = prog_stats(sandbox.pins)
                wall = sum(streams[name].turn()[0] for _ in range(STATS_TURNS))
                stats[name] = {"bytes": STATS_TURNS * TURN_BYTES, "wall_ns": wall,
                               "programs": stats_delta(before, prog_stats(sandbox.pins))}
                if not stats[name]["programs"]["sd_dns_egress"]["runs"]:
                    raise SystemExit(f"bench/throughput.py: {name}: the egress program never ran")
        nf_after = netfilter_state()
    finally:
        for stream in streams.values():
            stream.close()
        dsock.close()
        csock.close()
        try:
            if ipt is not None:
                ipt.close()
        finally:
            if sandbox is not None:
                sandbox.close()

    results = report(variants, mbps, cpu_s_per_gb, stats, ipt)
    print(describe_netfilter(nf_before, nf_after))
    path = write_results("throughput", {
        "pin_version": sandbox.pin_version, "source": git_state(), "iptables": ipt.version,
        "netfilter": {"start": nf_before, "end": nf_after},
        "iptables_error": ipt.error, "rounds": ROUNDS, "turn_bytes": TURN_BYTES, "chunk": CHUNK,
        "sockbuf": SOCKBUF,
        "variants": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                     for k, v in variants.items()},
        "samples": {"mb_per_s": mbps, "sender_cpu_s_per_gb": cpu_s_per_gb}, "bpf_stats": stats, **results})
    progress(f"results in {path}")
    return 0


def report(variants: dict, mbps: dict, cpu: dict, stats: dict, ipt: Iptables) -> dict:
    summ = paired(mbps, "unpoliced")
    csum = paired(cpu, "unpoliced")
    base_total_s = sum(TURN_BYTES / MB / x for x in mbps["unpoliced"])
    rows = []
    for name, s in summ.items():
        total_s = sum(TURN_BYTES / MB / x for x in mbps[name])
        s["aggregate_mb_per_s"] = len(mbps[name]) * TURN_BYTES / MB / total_s
        s["ratio_of_totals"] = base_total_s / total_s
        c = csum[name]
        lo, hi = s["ratio_ci95"]
        rows.append([name, s["n"], f"{len(mbps[name]) * TURN_BYTES / 1e9:.1f}", f"{s['aggregate_mb_per_s']:,.0f}",
                     f"{s['median']:,.0f}", f"{s['ratio_median']:.3f}", f"{lo:.3f}-{hi:.3f}",
                     f"{s['ratio_of_totals']:.3f}", f"{c['median']:.3f}", f"{c['ratio_median']:.3f}",
                     variants[name].get("check", "")])
    if ipt.error:
        for n in RULE_COUNTS:
            rows.append([f"iptables, {rules(n)}", 0, "-", "-", "-", "-", "-", "-", "-", "-", "unavailable"])
    print_table([f"variant ({TURN_BYTES >> 20} MiB turns to 127.0.0.1)", "turns", "GB", "MB/s", "median MB/s",
                 "ratio", "ratio 95% CI", "ratio totals", "cpu s/GB", "cpu ratio", "check"], rows)
    print("MB/s: all bytes / all turn time; ratio: median of per-round ratios to the unpoliced turn of the same "
          "round (bootstrap CI); ratio totals: unpoliced time / variant time; cpu: the sender's CPU time per GB")
    if ipt.error:
        print(f"iptables peer: {ipt.error}")

    print()
    srows = []
    for name, st in stats.items():
        gb = st["bytes"] / 1e9
        total_ns = 0
        for prog, d in st["programs"].items():
            if d["runs"]:
                total_ns += d["ns"]
                srows.append([name, prog, f"{d['runs'] / gb:,.0f}", f"{d['ns'] / d['runs']:,.0f}",
                              f"{d['ns'] / 1e6 / gb:.2f}", ""])
        st["ms_per_gb"] = total_ns / 1e6 / gb
        st["share_of_wall"] = total_ns / st["wall_ns"]
        srows.append([name, "all programs", "", "", f"{st['ms_per_gb']:.2f}", f"{st['share_of_wall'] * 100:.2f}%"])
    print_table(["BPF run-time stats (separate pass)", "program", "runs/GB", "ns/run", "ms/GB", "of wall"], srows)

    print()
    verdicts = {}
    for n in RULE_COUNTS:
        sd, ip = f"safedeploy, {rules(n)}", f"iptables, {rules(n)}"
        r, (lo, hi) = summ[sd]["ratio_median"], summ[sd]["ratio_ci95"]
        v = {"ratio_vs_unpoliced": r, "ratio_ci95": [lo, hi], "ratio_of_totals": summ[sd]["ratio_of_totals"],
             "within_3pct": r >= TARGET_RATIO, "cpu_ratio": csum[sd]["ratio_median"]}
        line = (f"{sd}: {r:.3f}x the unpoliced throughput ({(r - 1) * 100:+.1f}%, 95% CI {lo:.3f}-{hi:.3f}): "
                f"{'meets' if r >= TARGET_RATIO else 'MISSES'} the within-3% target")
        if ip in mbps:
            v["ratio_vs_iptables"] = median([a / b for a, b in zip(mbps[sd], mbps[ip])])
            line += f"; {v['ratio_vs_iptables']:.3f}x the iptables peer's"
        verdicts[sd] = v
        print(line)
    return {"summary": summ, "summary_cpu": csum, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(main())
