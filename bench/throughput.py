"""Benchmark: bulk TCP throughput of a policed sender: safedeploy vs unpoliced vs iptables.

Per variant, a sender process moves itself into the variant's cgroup and opens one TCP
connection (4 MiB SO_SNDBUF) to its own receiver on 127.0.0.1 (a process in the parent's,
unpoliced, cgroup; 4 MiB SO_RCVBUF). Both live for the whole run. A *turn* is: send
TURN_BYTES (64 MiB, 1 MiB per send()), then wait for the receiver's 1-byte acknowledgement
that it has read them all; its wall time gives MB/s. Every data segment leaves through the
sender's cgroup egress hook, where safedeploy judges every packet (the socket-storage fast
path for a connection judged at connect), and every ACK comes back through its ingress hook. The variants, all in cgroups
``<cgroup2>/safedeploy/sdbench-<pid>-*``:

  unpoliced   nothing attached (the baseline)
  safedeploy  a policy of 1 and of 100 CIDR rules (_network.policy_text: default allow, deny
              127.0.0.2/32 and /24s in 10.0.0.0/8); all programs attached
  iptables    the peer: an unpoliced cgroup, ``-m cgroup --path`` in OUTPUT jumping to a
              chain of the same ``-d <cidr> -j REJECT`` rules (_network.Iptables), the jump
              inserted only around that variant's turns

A round is one turn of every variant, in a shuffled order: ROUNDS rounds (ROUNDS x 64 MiB,
~20 GB per variant) in EPOCHS epochs, each with fresh streams (processes, connections) and
WARMUP_ROUNDS uncounted rounds first. Short, interleaved turns on warm connections: on
this VM a fresh connection per 1 GB sample varied by 2x from one sample to the next, a
turn on a warm connection by ~+-20%; pairing turns of the same round cancels the slower
drift, and the epochs keep one connection's luck (a +-2% bias between otherwise equal
connections was seen) from sticking to one variant. Ratios are per round (variant / unpoliced of
the same round), summarised by their median and a bootstrap 95% interval; "ratio totals"
divides the total times instead. Before measuring, each variant proves what it is
(127.0.0.2: EPERM / ECONNREFUSED / connects). A last pass with BPF run-time statistics on
counts the program runs per GB and what they cost.

Everything BPF runs against a throwaway pin root and state dir (_sandbox.Sandbox), removed at
the end with the cgroups, the processes and the iptables chains.

Usage: .venv/bin/python bench/throughput.py     (root; cgroup v2, bpffs, bcc, iptables)
Progress goes to stderr, the table to stdout, everything to bench/results/throughput.json.
"""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import begin, median, paired, print_table, progress, write_results  # noqa: E402
from _workers import Worker, close_all, listener, run_rounds, start_server, stop_server, with_stats  # noqa: E402
from _network import (DENIED_HOST, HOST, Iptables, Variants, describe_netfilter, netfilter_state,  # noqa: E402
                      network_variants, rules)

RULE_COUNTS = (1, 100)
ROUNDS = 300  # measured rounds: every variant sends one turn per round
EPOCHS = 6  # fresh streams (processes, connections) every ROUNDS / EPOCHS rounds
WARMUP_ROUNDS = 1  # per epoch, not counted
STATS_TURNS = 16  # per safedeploy variant, BPF run-time statistics on
TURN_BYTES = 64 << 20  # one turn: 64 MiB, then the receiver's 1-byte acknowledgement
CHUNK = 1 << 20  # bytes per send()/recv_into()
SOCKBUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF (net.core.{w,r}mem_max is 4 MiB here)
TARGET_RATIO = 0.99  # throughput under a policy vs unpoliced, every packet judged at egress ("within 1%")
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


def measure(variants: Variants, streams: dict[str, Stream]) -> dict:
    """The rounds and the BPF statistics pass; streams are left in `streams` for the caller
    to close."""
    names = list(variants)
    mbps: dict[str, list[float]] = {name: [] for name in names}
    cpu_s_per_gb: dict[str, list[float]] = {name: [] for name in names}

    def record(name: str, out, counted: bool) -> None:
        wall, cpu = out
        if counted:
            mbps[name].append(TURN_BYTES / MB / (wall / 1e9))
            cpu_s_per_gb[name].append(cpu / 1e9 / (TURN_BYTES / 1e9))

    run_rounds(names, streams, lambda name: Stream(variants[name]["path"]), variants.turn, record, rounds=ROUNDS,
               epochs=EPOCHS, warmup=WARMUP_ROUNDS, what=f"one {TURN_BYTES >> 20} MiB turn per variant")

    progress(f"BPF run-time statistics pass: {STATS_TURNS} turns per safedeploy variant (stats on)")
    stats = {}
    for name in variants.of_kind("safedeploy"):
        out, delta = with_stats(variants.pins, STATS_TURNS, streams[name].turn)
        stats[name] = {"bytes": STATS_TURNS * TURN_BYTES, "wall_ns": sum(x[0] for x in out), "programs": delta}
        if not delta["sd_egress"]["runs"]:
            raise SystemExit(f"bench/throughput.py: {name}: the egress program never ran")
    return {"mbps": mbps, "cpu_s_per_gb": cpu_s_per_gb, "stats": stats}


def main() -> int:
    begin("throughput.py", "cgroups, bpf, iptables")
    dsock, dport = listener(DENIED_HOST, 16)  # the check listener on the denied address, never accepted
    csock, cport = listener(HOST, 16)  # the check listener on 127.0.0.1
    streams: dict[str, Stream] = {}
    nf_before = netfilter_state()
    try:
        with network_variants("tput", RULE_COUNTS, cport, dport, "throughput.py") as variants:
            try:
                m = measure(variants, streams)
            finally:
                close_all(*streams.values())
        nf_after = netfilter_state()
    finally:
        close_all(dsock, csock)

    ipt = variants.ipt
    results = report(variants, m["mbps"], m["cpu_s_per_gb"], m["stats"], ipt)
    print(describe_netfilter(nf_before, nf_after))
    path = write_results("throughput", {
        "pin_version": variants.sandbox.pin_version, "iptables": ipt.version,
        "netfilter": {"start": nf_before, "end": nf_after},
        "iptables_error": ipt.error, "rounds": ROUNDS, "epochs": EPOCHS, "turn_bytes": TURN_BYTES, "chunk": CHUNK,
        "sockbuf": SOCKBUF, "variants": variants.to_json(),
        "samples": {"mb_per_s": m["mbps"], "sender_cpu_s_per_gb": m["cpu_s_per_gb"]}, "bpf_stats": m["stats"],
        **results})
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
                     "{:.3f}-{:.3f}".format(*c["ratio_ci95"]), variants[name].get("check", "")])
    if ipt.error:
        for n in RULE_COUNTS:
            rows.append([f"iptables, {rules(n)}", 0, "-", "-", "-", "-", "-", "-", "-", "-", "-", "unavailable"])
    print_table([f"variant ({TURN_BYTES >> 20} MiB turns to 127.0.0.1)", "turns", "GB", "MB/s", "median MB/s",
                 "ratio", "ratio 95% CI", "ratio totals", "cpu s/GB", "cpu ratio", "cpu 95% CI", "check"], rows)
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
             "within_1pct": r >= TARGET_RATIO, "cpu_ratio": csum[sd]["ratio_median"],
             "cpu_ratio_ci95": csum[sd]["ratio_ci95"],
             "bpf_share_of_wall": stats.get(sd, {}).get("share_of_wall")}
        line = (f"{sd}: {r:.3f}x the unpoliced throughput ({(r - 1) * 100:+.1f}%, 95% CI {lo:.3f}-{hi:.3f}): "
                f"{'meets' if r >= TARGET_RATIO else 'MISSES'} the within-1% target")
        if ip in mbps:
            v["ratio_vs_iptables"] = median([a / b for a, b in zip(mbps[sd], mbps[ip])])
            line += f"; {v['ratio_vs_iptables']:.3f}x the iptables peer's"
        verdicts[sd] = v
        print(line)
    return {"summary": summ, "summary_cpu": csum, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(main())
