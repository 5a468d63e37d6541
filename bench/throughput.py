"""Benchmark: bulk TCP throughput of a policed sender: safedeploy vs unpoliced vs iptables.

A forked sender moves itself into a cgroup, connects to a receiver on 127.0.0.1 (a process
in the parent's, unpoliced, cgroup), sends SAMPLE_BYTES from a 1 MiB buffer with a 4 MiB
SO_SNDBUF (the receiver: 4 MiB SO_RCVBUF), shuts down its side and waits for the receiver
to confirm the byte count; the sample is the wall time from the first send to that answer.
Every data segment leaves through the sender's cgroup egress hook and every ACK comes back
through its ingress hook, which is where safedeploy's DNS programs sit. The variants, all in
cgroups ``<cgroup2>/safedeploy/sdbench-<pid>-*``:

  unpoliced   nothing attached (the baseline)
  safedeploy  a policy of 1 and of 100 CIDR rules (connect.policy_text: default allow, deny
              127.0.0.2/32 and /24s in 10.0.0.0/8); all 6 programs attached
  iptables    the peer: an unpoliced cgroup, ``-m cgroup --path`` in OUTPUT jumping to a
              chain of the same ``-d <cidr> -j REJECT`` rules (connect.Iptables), the jump
              inserted only around that variant's samples

1 warm-up round (not counted), then ROUNDS rounds, every variant once per round, the order
rotating; ratios are per round against the unpoliced sample of the same round. Before
measuring, each variant proves what it is (127.0.0.2: EPERM / ECONNREFUSED / connects). A
last pass with BPF run-time statistics on counts the program runs per GB and their cost.

Everything BPF runs against a throwaway pin root and state dir (connect.Sandbox), removed at
the end with the cgroups and the iptables chains.

Usage: .venv/bin/python bench/throughput.py     (root; cgroup v2, bpffs, bcc, iptables)
Progress goes to stderr, the table to stdout, everything to bench/results/throughput.json.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, print_table, progress, write_results  # noqa: E402
from connect import (DENIED_HOST, HOST, Iptables, Sandbox, bpf_stats, checks, git_state, paired,  # noqa: E402
                     policy_text, prog_stats, rotated, rules, run_in, start_server, stats_delta, stop_server)

from ocihook import loader  # noqa: E402

RULE_COUNTS = (1, 100)
ROUNDS = 8
SAMPLE_BYTES = 1 << 30  # 1 GiB per sample
WARMUP_BYTES = 256 << 20
STATS_BYTES = 512 << 20
CHUNK = 1 << 20  # bytes per send()/recv_into()
SOCKBUF = 4 << 20  # SO_SNDBUF / SO_RCVBUF (net.core.{w,r}mem_max is 4 MiB here)
TARGET_RATIO = 0.97  # throughput under a policy vs unpoliced ("within 3%")
MB = 1e6


def receiver(lsock: socket.socket) -> None:
    """One connection at a time: read to EOF, answer the byte count (8 bytes), close."""
    mv = memoryview(bytearray(CHUNK))
    while True:
        conn, _ = lsock.accept()
        total = 0
        while True:
            k = conn.recv_into(mv)
            if not k:
                break
            total += k
        conn.sendall(struct.pack("!Q", total))
        conn.close()


def send_bulk(port: int, nbytes: int) -> tuple[int, int]:
    """In the child: send nbytes to the receiver; (wall ns until it confirmed, CPU ns)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKBUF)
    s.connect((HOST, port))
    mv = memoryview(bytes(CHUNK))
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    left = nbytes
    while left >= CHUNK:
        s.sendall(mv)
        left -= CHUNK
    if left:
        s.sendall(mv[:left])
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while len(answer) < 8:
        part = s.recv(8 - len(answer))
        if not part:
            break
        answer += part
    wall = time.perf_counter_ns() - t0
    cpu = time.thread_time_ns() - c0
    s.close()
    if len(answer) != 8 or struct.unpack("!Q", answer)[0] != nbytes:
        raise RuntimeError(f"receiver confirmed {answer!r}, expected {nbytes} bytes")
    return wall, cpu


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("bench/throughput.py: needs root (cgroups, bpf, iptables)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (cleanup)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKBUF)  # inherited by accepted sockets
    lsock.bind((HOST, 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    dsock = socket.socket()  # the check listener on the denied address, never accepted
    dsock.bind((DENIED_HOST, 0))
    dsock.listen(16)
    dport = dsock.getsockname()[1]
    server = start_server(receiver, lsock)
    sandbox = ipt = None
    variants: dict[str, dict] = {}
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

        def in_variant(name: str, fn, *args):
            v = variants[name]
            if v["kind"] == "iptables":
                with ipt.active(v["chain"], v["path"]):
                    return run_in(v["path"], fn, *args)
            return run_in(v["path"], fn, *args)

        expect = {"unpoliced": "ok", "safedeploy": "EPERM", "iptables": "ECONNREFUSED"}
        for name, v in variants.items():
            got = in_variant(name, checks, port, dport)
            attached = sandbox.attached(v["path"])
            want_attached = len(loader.PROGRAMS) if v["kind"] == "safedeploy" else 0
            if got["denied"] != expect[v["kind"]] or attached != want_attached:
                raise SystemExit(f"bench/throughput.py: variant {name!r} is not what it claims: {got}, "
                                 f"{attached} programs attached")
            v["check"] = f"{DENIED_HOST}: {got['denied']}"
            progress(f"check {name}: {DENIED_HOST} {got['denied']}, {attached} programs attached")

        names = list(variants)
        progress(f"warm-up round ({WARMUP_BYTES >> 20} MiB per variant, not counted)")
        for name in names:
            in_variant(name, send_bulk, port, WARMUP_BYTES)
        mbps: dict[str, list[float]] = {name: [] for name in names}
        cpu_s_per_gb: dict[str, list[float]] = {name: [] for name in names}
        for r in range(ROUNDS):
            order = rotated(names, r)
            progress(f"round {r + 1}/{ROUNDS}: {SAMPLE_BYTES >> 20} MiB per variant, order from {order[0]!r}")
            for name in order:
                wall, cpu = in_variant(name, send_bulk, port, SAMPLE_BYTES)
                mbps[name].append(SAMPLE_BYTES / MB / (wall / 1e9))
                cpu_s_per_gb[name].append(cpu / 1e9 / (SAMPLE_BYTES / 1e9))

        progress(f"BPF run-time statistics pass: {STATS_BYTES >> 20} MiB per safedeploy variant (stats on)")
        stats = {}
        with bpf_stats():
            for name in names:
                if variants[name]["kind"] != "safedeploy":
                    continue
                before = prog_stats(sandbox.pins)
                wall, _ = in_variant(name, send_bulk, port, STATS_BYTES)
                stats[name] = {"bytes": STATS_BYTES, "wall_ns": wall,
                               "programs": stats_delta(before, prog_stats(sandbox.pins))}
                if not stats[name]["programs"]["sd_dns_egress"]["runs"]:
                    raise SystemExit(f"bench/throughput.py: {name}: the egress program never ran")
    finally:
        stop_server(server)
        lsock.close()
        dsock.close()
        try:
            if ipt is not None:
                ipt.close()
        finally:
            if sandbox is not None:
                sandbox.close()

    results = report(variants, mbps, cpu_s_per_gb, stats, ipt)
    path = write_results("throughput", {
        "pin_version": sandbox.pin_version, "source": git_state(), "iptables": ipt.version,
        "iptables_error": ipt.error, "rounds": ROUNDS, "sample_bytes": SAMPLE_BYTES, "chunk": CHUNK,
        "sockbuf": SOCKBUF,
        "variants": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()}
                     for k, v in variants.items()},
        "samples": {"mb_per_s": mbps, "sender_cpu_s_per_gb": cpu_s_per_gb}, "bpf_stats": stats, **results})
    progress(f"results in {path}")
    return 0


def report(variants: dict, mbps: dict, cpu: dict, stats: dict, ipt: Iptables) -> dict:
    summ = paired(mbps, "unpoliced")
    csum = paired(cpu, "unpoliced")
    rows = []
    for name, s in summ.items():
        c = csum[name]
        rows.append([name, s["n"], f"{s['median']:,.0f}", f"{s['min']:,.0f}", f"{s['max']:,.0f}",
                     f"{s['ratio_median']:.3f}", f"{min(s['ratios']):.2f}-{max(s['ratios']):.2f}",
                     f"{c['median']:.3f}", f"{c['ratio_median']:.3f}", variants[name].get("check", "")])
    if ipt.error:
        for n in RULE_COUNTS:
            rows.append([f"iptables, {rules(n)}", 0, "-", "-", "-", "-", "-", "-", "-", "unavailable"])
    print_table([f"variant ({SAMPLE_BYTES >> 20} MiB to 127.0.0.1)", "rounds", "median MB/s", "min MB/s",
                 "max MB/s", "ratio", "ratio min-max", "cpu s/GB", "cpu ratio", "check"], rows)
    print("ratio: median of per-round ratios to the unpoliced sample of the same round; "
          "cpu: the sender's CPU time per GB")
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
        r = summ[sd]["ratio_median"]
        v = {"ratio_vs_unpoliced": r, "within_3pct": r >= TARGET_RATIO, "cpu_ratio": csum[sd]["ratio_median"]}
        line = (f"{sd}: {r:.3f}x the unpoliced throughput ({(r - 1) * 100:+.1f}%): "
                f"{'meets' if r >= TARGET_RATIO else 'MISSES'} the within-3% target")
        if ip in mbps:
            v["ratio_vs_iptables"] = median([a / b for a, b in zip(mbps[sd], mbps[ip])])
            line += f"; {v['ratio_vs_iptables']:.3f}x the iptables peer's"
        verdicts[sd] = v
        print(line)
    return {"summary": summ, "summary_cpu": csum, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(main())
