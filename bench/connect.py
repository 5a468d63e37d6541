"""Benchmark: what a policy costs connect(): safedeploy vs an unpoliced cgroup vs iptables.

Per variant, a long-lived client process (a Worker) moves itself into the variant's cgroup.
A *turn* is TURN_S seconds of: open a TCP socket, connect to a listener on 127.0.0.1, close
(SO_LINGER 0: the close sends a RST, so no TIME_WAIT piles up and the ephemeral port range
never fills). A process in the parent's, unpoliced, cgroup accepts and closes. The
variants, all in cgroups ``<cgroup2>/safedeploy/sdbench-<pid>-*``:

  unpoliced   a cgroup with nothing attached (the baseline)
  safedeploy  a cgroup under a policy of 1, 100 and 10 000 CIDR rules: default allow,
              deny 127.0.0.2/32 and then distinct /24s in 10.0.0.0/8 (so 127.0.0.1 is
              allowed by the default); all programs attached (session.apply)
  iptables    the peer: an unpoliced cgroup, and in OUTPUT ``-m cgroup --path <cgroup>
              -j SDB<pid>_<n>``, a chain of the same CIDRs as ``-d <cidr> -j REJECT``
              rules. The jump is inserted only around that variant's turns.

A round is one turn of every variant, in a shuffled order (_workers.run_rounds): ROUNDS
rounds in EPOCHS epochs, each with fresh client processes and WARMUP_ROUNDS uncounted
rounds first (so no variant keeps one process's luck, e.g. its CPU placement). Ratios are
per round (variant / unpoliced of the same round), summarised by their median and a
bootstrap 95% interval.
Besides the rate, each turn reports the client's CPU time per connect (its syscalls and
the loopback packet processing they run inline), which a busy neighbour disturbs less.

Before measuring, each variant proves it is what it claims: 127.0.0.1 connects, 127.0.0.2
(a listener is there) gets EPERM under safedeploy, ECONNREFUSED (REJECT) under iptables and
connects when unpoliced. After measuring, the connect events the programs recorded must
add up to the connects made. A last pass with BPF run-time statistics on (BPF_ENABLE_STATS,
only while this script holds the fd) attributes the cost: runs and ns per connect, per program.

Everything BPF runs against a throwaway pin root ``/sys/fs/bpf/sdbench_<pid>`` and state dir,
removed at the end (also on error or SIGTERM), with the cgroups, processes and iptables chains.

Usage: .venv/bin/python bench/connect.py     (root; cgroup v2, bpffs, bcc, iptables)
Progress goes to stderr, the table to stdout, everything to bench/results/connect.json.
"""
from __future__ import annotations

import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import begin, bootstrap_ci, median, paired, print_table, progress, write_results  # noqa: E402
from _workers import Worker, close_all, listener, run_rounds, start_server, stop_server, with_stats  # noqa: E402
from _network import (DENIED_HOST, HOST, Iptables, Variants, describe_netfilter, netfilter_state,  # noqa: E402
                      network_variants, rules)

from ocihook.events import C  # noqa: E402

RULE_COUNTS = (1, 100, 10_000)
ROUNDS = 100  # measured rounds; every variant takes one turn per round
TURN_S = 0.05  # seconds of connect+close per turn (ROUNDS * TURN_S = 5 s per variant)
EPOCHS = 5  # fresh client processes every ROUNDS / EPOCHS rounds
WARMUP_ROUNDS = 1  # per epoch, not counted
STATS_TURNS = 10  # per policed variant, BPF run-time statistics on
TARGET_RATIO = 1 / 1.05  # connect rate under a policy vs unpoliced: a connect costs at most 1.05x

LINGER0 = struct.pack("ii", 1, 0)
BATCH = 32  # connects between two clock reads


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


# -- the benchmark ---------------------------------------------------------------------------


def measure(variants: Variants, workers: dict[str, Worker], port: int) -> dict:
    """The rounds, the BPF statistics passes and the event counts; workers are left in
    `workers` for the caller to close."""
    names = list(variants)
    made = {name: 0 for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu_us: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, list[int]] = {name: [] for name in names}

    def record(name: str, out, counted: bool) -> None:
        n, ns, cpu = out
        made[name] += n
        if counted:
            rates[name].append(n / (ns / 1e9))
            cpu_us[name].append(cpu / 1e3 / n)
            counts[name].append(n)

    run_rounds(names, workers, lambda name: Worker(variants[name]["path"], connect_turns, port, TURN_S),
               variants.turn, record, rounds=ROUNDS, epochs=EPOCHS, warmup=WARMUP_ROUNDS,
               what=f"one {TURN_S} s turn per variant")

    stats, recorded = {}, {}

    def stats_pass(name: str, label: str) -> None:
        progress(f"BPF run-time statistics pass: {label}, {STATS_TURNS} turns (stats on, not in the rates)")
        out, delta = with_stats(variants.pins, STATS_TURNS, workers[name].turn)
        n, ns = sum(x[0] for x in out), sum(x[1] for x in out)
        made[name] += n
        stats[label] = {"connects": n, "rate": n / (ns / 1e9), "programs": delta}

    def release_and_count(name: str) -> None:
        """Every connect made went through the connect4 program: its allowed events add up."""
        workers.pop(name).close()
        events = variants.sandbox.release(variants[name]["path"])
        allowed = sum(val.count for key, val in events
                      if key.kind == C["SD_KIND_CONNECT"] and key.verdict == C["SD_EV_ALLOWED"]
                      and bytes(key.addr) == bytes(10) + b"\xff\xff" + socket.inet_aton(HOST))
        want = made[name] + 1  # + the check's allowed connect
        recorded[name] = allowed
        if allowed != want:
            raise SystemExit(f"bench/connect.py: {name}: {allowed} allowed connect events, {want} connects made")
        progress(f"{name}: {allowed:,} connects made, {allowed:,} judged and recorded by the programs")

    sd_names = variants.of_kind("safedeploy")
    for name in sd_names:
        stats_pass(name, name)
    for name in sd_names[1:]:
        release_and_count(name)
    # each cgroup has its own rule maps; once more with the 1-rule policy's cgroup the only
    # policed one, as a baseline against the figures above.
    stats_pass(sd_names[0], f"{sd_names[0]} (alone in the maps)")
    release_and_count(sd_names[0])
    return {"rates": rates, "cpu_us": cpu_us, "counts": counts, "stats": stats, "recorded": recorded}


def main() -> int:
    begin("connect.py", "cgroups, bpf, iptables")
    lsock, port = listener(HOST, 4096)
    dsock, dport = listener(DENIED_HOST, 64)  # the check listener on the denied address, never accepted
    server = start_server(acceptor, lsock)
    workers: dict[str, Worker] = {}
    nf_before = netfilter_state()
    try:
        # the checks also leave the filter table's OUTPUT hook in place, for every variant alike
        with network_variants("connect", RULE_COUNTS, port, dport, "connect.py") as variants:
            try:
                m = measure(variants, workers, port)
            finally:
                close_all(*workers.values())
        nf_after = netfilter_state()
    finally:
        stop_server(server)
        close_all(lsock, dsock)

    ipt = variants.ipt
    results = report(variants, m["rates"], m["cpu_us"], m["counts"], m["stats"], m["recorded"], ipt)
    print(describe_netfilter(nf_before, nf_after))
    path = write_results("connect", {
        "pin_version": variants.sandbox.pin_version, "iptables": ipt.version,
        "netfilter": {"start": nf_before, "end": nf_after},
        "iptables_error": ipt.error, "rounds": ROUNDS, "epochs": EPOCHS, "turn_s": TURN_S,
        "variants": variants.to_json(),
        "samples": {"rates_per_s": m["rates"], "client_cpu_us_per_connect": m["cpu_us"], "connects": m["counts"]},
        "bpf_stats": m["stats"], "recorded_connect_events": m["recorded"], **results})
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
        v = {"ratio_vs_unpoliced": r, "ratio_ci95": [lo, hi], "cost_ratio": 1 / r, "within_5pct": r >= TARGET_RATIO,
             "cpu_ratio_vs_unpoliced": cpu[sd]["ratio_median"],
             "bpf_share_of_unpoliced_connect": stats.get(sd, {}).get("share_of_unpoliced_connect")}
        line = (f"{sd}: {r:.3f}x the unpoliced rate ({(r - 1) * 100:+.1f}%, 95% CI {lo:.3f}-{hi:.3f}), a connect costs "
                f"{1 / r:.3f}x: {'meets' if r >= TARGET_RATIO else 'MISSES'} the <= 1.05x target")
        if ip in rates:
            per_round = [a / b for a, b in zip(rates[sd], rates[ip])]
            cpu_round = [a / b for a, b in zip(cpu_us[sd], cpu_us[ip])]
            v["ratio_vs_iptables"] = median(per_round)
            v["ratio_vs_iptables_ci95"] = list(bootstrap_ci(per_round))
            v["cpu_ratio_vs_iptables"] = median(cpu_round)
            v["cpu_ratio_vs_iptables_ci95"] = list(bootstrap_ci(cpu_round))
            v["no_worse_than_iptables"] = v["ratio_vs_iptables"] >= 1.0
            line += (f"; {v['ratio_vs_iptables']:.3f}x the iptables rate (95% CI "
                     "{:.3f}-{:.3f}".format(*v["ratio_vs_iptables_ci95"]) +
                     f", CPU per connect {v['cpu_ratio_vs_iptables']:.3f}x iptables'): "
                     f"{'no worse' if v['no_worse_than_iptables'] else 'WORSE'}")
        else:
            line += "; iptables peer unavailable"
        verdicts[sd] = v
        print(line)
    return {"summary": summ, "summary_cpu": cpu, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(main())
