"""Benchmark: DNS query round trip from a policed process: safedeploy vs unpoliced.

A client sends UDP queries for NAME (type A) with sendto() and waits for each answer; one
sample is one query's round trip. Two servers, each a process in the parent's (unpoliced)
cgroup:

  dnslib   a real dnslib DNSServer on 127.0.0.153:53 (parses every query, builds the
           answer; socketserver starts a thread per request)
  static   a bare UDP loop on 127.0.0.154:53 that returns one answer prebuilt with dnslib,
           with the query's id: the smallest round trip, so the kernel's share is largest

and two client cgroups (``<cgroup2>/safedeploy/sdbench-<pid>-*``):

  unpoliced   nothing attached (the baseline)
  safedeploy  default deny; allow 127.0.0.153:53 and 127.0.0.154:53 and the name NAME.
              Every query is parsed by the egress program (name hashed suffix by suffix,
              looked up, remembered), every answer by the ingress program (its A record
              learned for its TTL), and sendto() goes through the sendmsg4 program.

One long-lived client process (a Worker) per (cgroup, server). A round is one turn of
QUERIES_PER_TURN queries of every client, in a shuffled order: ROUNDS rounds (ROUNDS x
QUERIES_PER_TURN queries per client) in EPOCHS epochs, each with fresh client processes
and WARMUP_ROUNDS uncounted rounds first. Ratios are per
round (median round trip of the policed turn / of the unpoliced turn to the same server),
summarised by their median and a bootstrap 95% interval.

Checks: before measuring, NAME resolves from both cgroups and another name fails at once
with EPERM from the policed one (the kernel denies it) but resolves unpoliced. After
measuring, the programs' DNS events must add up to the queries made, and the answer's
address must be in the learned map for the policed cgroup. A last pass with BPF run-time
statistics on gives runs and ns per query, per program.

Everything BPF runs against a throwaway pin root and state dir (_sandbox.Sandbox), removed at
the end with the cgroups and processes.

Usage: .venv/bin/python bench/dns.py     (root; cgroup v2, bpffs, bcc, dnslib)
Progress goes to stderr, the table to stdout, everything to bench/results/dns.json.
"""
from __future__ import annotations

import errno
import os
import json
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import begin, median, paired, percentile, print_table, progress, write_results  # noqa: E402
from _sandbox import Sandbox, run_in  # noqa: E402
from _workers import Worker, close_all, run_rounds, start_server, stop_server, with_stats  # noqa: E402
from _network import describe_netfilter, netfilter_state  # noqa: E402

from dnslib import QTYPE, RR, A, DNSRecord  # noqa: E402
from dnslib.server import BaseResolver, DNSLogger, DNSServer  # noqa: E402

from ocihook import bpfsys, loader  # noqa: E402
from ocihook.abi import Addr, Learned  # noqa: E402
from ocihook.events import C  # noqa: E402
from ocihook.pinned import PinnedMaps  # noqa: E402

NAME = "pkgs.bench.internal"
ANSWER = "127.0.0.80"
TTL = 300
OTHER = "other.bench.internal"  # not in the policy: denied by default
SERVERS = {"dnslib": "127.0.0.153", "static": "127.0.0.154"}
ROUNDS = 80
QUERIES_PER_TURN = 100  # ROUNDS * QUERIES_PER_TURN = 8 000 queries per client
EPOCHS = 4  # fresh client processes every ROUNDS / EPOCHS rounds
WARMUP_ROUNDS = 1  # per epoch, not counted
STATS_TURNS = 10
TIMEOUT_S = 2.0

POLICY = json.dumps({"version": 1, "name": "bench-dns", "mode": "enforce", "default": "deny",
                     "allow": [f"{SERVERS['dnslib']}:53", f"{SERVERS['static']}:53", NAME]})


class Zone(BaseResolver):
    """NAME and OTHER -> ANSWER (A, TTL)."""

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        if qname in (NAME, OTHER) and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(qname, QTYPE.A, rdata=A(ANSWER), ttl=TTL))
        return reply


def dnslib_server(address: str) -> None:
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    DNSServer(Zone(), address=address, port=53, logger=quiet).start()  # serve_forever


def static_server(address: str) -> None:
    """Answers every query with NAME's prebuilt answer, carrying the query's id."""
    canned = DNSRecord.question(NAME, "A").reply()
    canned.add_answer(RR(NAME, QTYPE.A, rdata=A(ANSWER), ttl=TTL))
    body = canned.pack()[2:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 53))
        recvfrom, sendto = s.recvfrom, s.sendto
        while True:
            data, peer = recvfrom(4096)
            sendto(data[:2] + body, peer)


def resolve_once(name: str, server: str) -> str:
    """'ok <addresses>', or the errno name / 'timeout' of one real query."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT_S)
        try:
            s.sendto(DNSRecord.question(name, "A").pack(), (server, 53))
            data, _ = s.recvfrom(4096)
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    return "ok " + ",".join(str(rr.rdata) for rr in DNSRecord.parse(data).rr)


def checks() -> dict:
    return {"allowed": resolve_once(NAME, SERVERS["dnslib"]), "other": resolve_once(OTHER, SERVERS["dnslib"])}


def query_turns(server: str, n: int):
    """Worker setup: one UDP socket; a turn sends n queries for NAME one after the other with
    sendto() and returns ([round trip ns], CPU ns). Ids differ per query; every answer is
    checked to be the answer to that query."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT_S)
    query = bytearray(DNSRecord.question(NAME, "A").pack())
    dest = (server, 53)
    clock, cpu_clock, sendto, recvfrom = time.perf_counter_ns, time.thread_time_ns, s.sendto, s.recvfrom
    state = {"id": 0}

    def turn() -> tuple[list[int], int]:
        out = []
        c0 = cpu_clock()
        qid = state["id"]
        for _ in range(n):
            qid = (qid + 1) & 0xFFFF
            query[0], query[1] = qid >> 8, qid & 0xFF
            t0 = clock()
            sendto(query, dest)
            data, _ = recvfrom(4096)
            out.append(clock() - t0)
            if data[:2] != query[:2] or len(data) <= len(query):
                raise RuntimeError(f"unexpected answer {data!r}")
        state["id"] = qid
        return out, cpu_clock() - c0
    return turn


def learned_entry(pins: Path, cgid: int) -> dict | None:
    """What the kernel learned for ANSWER in cgroup cgid: the name and seconds left."""
    key = Addr()
    key.addr[:] = list(memoryview(bytes(10) + b"\xff\xff" + socket.inet_aton(ANSWER)).cast("I"))
    val = Learned()
    with PinnedMaps.open(pins) as m:
        fd = m.inner(cgid, "learned")
        if fd is None:
            return None
        try:
            if not bpfsys.map_lookup(fd, key, val):
                return None
        finally:
            os.close(fd)
        name = m.names_of(cgid, [val.name_id]).get(val.name_id)
    left = (val.expires_ns - time.clock_gettime_ns(time.CLOCK_BOOTTIME)) / 1e9
    return {"name": name, "ttl_left_s": round(left, 1), "verdict": int(val.verdict)}


def main() -> int:
    begin("dns.py", "cgroups, bpf, port 53")
    servers = {}
    sandbox = None
    workers: dict[tuple[str, str], Worker] = {}
    nf_before = netfilter_state()
    try:
        servers["dnslib"] = start_server(dnslib_server, SERVERS["dnslib"])
        servers["static"] = start_server(static_server, SERVERS["static"])
        sandbox = Sandbox("dns")
        plain = sandbox.cgroup("plain")[0]
        policed, att, compiled = sandbox.cgroup("sd", POLICY)
        cgroups = {"unpoliced": plain, "safedeploy": policed}
        for _ in range(50):  # the servers are up when the unpoliced check resolves
            if run_in(plain, resolve_once, NAME, SERVERS["dnslib"]) == f"ok {ANSWER}":
                break
            time.sleep(0.1)

        want = {"unpoliced": {"allowed": f"ok {ANSWER}", "other": f"ok {ANSWER}"},
                "safedeploy": {"allowed": f"ok {ANSWER}", "other": "EPERM"}}
        for variant, path in cgroups.items():
            got = run_in(path, checks)
            attached = sandbox.attached(path)
            if got != want[variant] or attached != (len(loader.PROGRAMS) if variant == "safedeploy" else 0):
                raise SystemExit(f"bench/dns.py: {variant} is not what it claims: {got}, {attached} programs attached")
            progress(f"check {variant}: {NAME} -> {got['allowed']}, {OTHER} -> {got['other']}")
        learned = learned_entry(sandbox.pins, att.cgid)
        if not learned or learned["name"] != NAME:
            raise SystemExit(f"bench/dns.py: the policed cgroup did not learn {ANSWER} from {NAME}: {learned}")
        progress(f"check: the kernel learned {ANSWER} for {NAME} (TTL left {learned['ttl_left_s']} s)")

        clients = [(v, srv) for srv in SERVERS for v in cgroups]
        made = {v: 2 for v in cgroups}  # the check queries
        rtt: dict[tuple[str, str], list[int]] = {c: [] for c in clients}
        turn_median: dict[tuple[str, str], list[float]] = {c: [] for c in clients}
        cpu: dict[tuple[str, str], list[float]] = {c: [] for c in clients}

        def record(c: tuple[str, str], out, counted: bool) -> None:
            samples, cpu_ns = out
            made[c[0]] += len(samples)
            if counted:
                rtt[c] += samples
                turn_median[c].append(median(samples) / 1e3)
                cpu[c].append(cpu_ns / 1e3 / len(samples))

        run_rounds(clients, workers, lambda c: Worker(cgroups[c[0]], query_turns, SERVERS[c[1]], QUERIES_PER_TURN),
                   lambda c, worker: worker.turn(), record, rounds=ROUNDS, epochs=EPOCHS, warmup=WARMUP_ROUNDS,
                   what=f"{QUERIES_PER_TURN} queries per client")

        progress(f"BPF run-time statistics pass: {STATS_TURNS} turns per server from the policed cgroup (stats on)")
        stats = {}
        for srv in SERVERS:
            out, delta = with_stats(sandbox.pins, STATS_TURNS, workers[("safedeploy", srv)].turn)
            n = sum(len(x[0]) for x in out)
            made["safedeploy"] += n
            stats[srv] = {"queries": n, "programs": delta}
        learned = learned_entry(sandbox.pins, att.cgid)
        close_all(*workers.values())
        workers.clear()
        events = sandbox.release(policed)
        dns_allowed = sum(val.count for key, val in events
                          if key.kind == C["SD_KIND_DNS"] and key.verdict == C["SD_EV_ALLOWED"])
        if dns_allowed != made["safedeploy"] - 1:  # all but the denied check query
            raise SystemExit(f"bench/dns.py: {dns_allowed} allowed DNS events for "
                             f"{made['safedeploy'] - 1} allowed queries")
        progress(f"safedeploy: {dns_allowed:,} queries made and judged in the kernel; learned {learned}")
        nf_after = netfilter_state()
    finally:
        close_all(*workers.values())
        for pid in servers.values():
            stop_server(pid)
        close_all(sandbox)

    results = report(rtt, turn_median, cpu, stats)
    print(describe_netfilter(nf_before, nf_after))
    path = write_results("dns", {
        "pin_version": sandbox.pin_version, "netfilter": {"start": nf_before, "end": nf_after},
        "name": NAME, "servers": SERVERS, "policy": json.loads(POLICY), "rounds": ROUNDS, "epochs": EPOCHS,
        "queries_per_turn": QUERIES_PER_TURN, "dns_events_allowed": dns_allowed, "learned": learned,
        "samples": {"rtt_ns": {f"{v}/{s}": x for (v, s), x in rtt.items()},
                    "turn_median_us": {f"{v}/{s}": x for (v, s), x in turn_median.items()},
                    "cpu_us_per_query": {f"{v}/{s}": x for (v, s), x in cpu.items()}},
        "bpf_stats": stats, **results})
    progress(f"results in {path}")
    return 0


def report(rtt: dict, turn_median: dict, cpu: dict, stats: dict) -> dict:
    rows, summary, verdicts = [], {}, {}
    for srv in SERVERS:
        per = paired({v: turn_median[(v, s)] for v, s in turn_median if s == srv}, "unpoliced")
        cper = paired({v: cpu[(v, s)] for v, s in cpu if s == srv}, "unpoliced")
        for v in ("unpoliced", "safedeploy"):
            us = [x / 1e3 for x in rtt[(v, srv)]]
            p, c = per[v], cper[v]
            summary[f"{v}/{srv}"] = {"queries": len(us), "median_us": median(us), "p10_us": percentile(us, 10),
                                     "p90_us": percentile(us, 90), "p99_us": percentile(us, 99),
                                     "max_us": max(us), "ratio_median": p["ratio_median"],
                                     "ratio_ci95": p["ratio_ci95"], "cpu_us_median": c["median"],
                                     "cpu_ratio": c["ratio_median"]}
            s = summary[f"{v}/{srv}"]
            rows.append([f"{srv} server, {v}", f"{len(us):,}", s["median_us"], s["p10_us"], s["p90_us"], s["p99_us"],
                         f"{s['ratio_median']:.3f}", "{:.3f}-{:.3f}".format(*s["ratio_ci95"]),
                         f"{s['cpu_us_median']:.1f}", f"{s['cpu_ratio']:.3f}"])
        sd = summary[f"safedeploy/{srv}"]
        diffs = [a - b for a, b in zip(turn_median[("safedeploy", srv)], turn_median[("unpoliced", srv)])]
        verdicts[srv] = {"ratio": sd["ratio_median"], "ratio_ci95": sd["ratio_ci95"], "added_us": median(diffs)}
    print_table(["DNS query round trip (us)", "queries", "median", "p10", "p90", "p99", "ratio", "ratio 95% CI",
                 "cpu us/q", "cpu ratio"], rows)
    print("ratio: median of per-round ratios of the turn medians (policed / unpoliced, same server, same round); "
          "cpu: the client's CPU time per query")

    print()
    srows = []
    for srv, st in stats.items():
        total = 0
        for prog, d in st["programs"].items():
            if d["runs"]:
                total += d["ns"]
                srows.append([f"{srv} server", prog, f"{d['runs'] / st['queries']:.2f}", f"{d['ns'] / d['runs']:,.0f}",
                              f"{d['ns'] / st['queries']:,.0f}"])
        st["ns_per_query"] = total / st["queries"]
        srows.append([f"{srv} server", "all programs", "", "", f"{st['ns_per_query']:,.0f}"])
    print_table(["BPF run-time stats (separate pass)", "program", "runs/query", "ns/run", "ns/query"], srows)
    print()
    for srv, v in verdicts.items():
        lo, hi = v["ratio_ci95"]
        print(f"{srv} server: a policed query takes {v['ratio']:.3f}x the unpoliced round trip "
              f"(95% CI {lo:.3f}-{hi:.3f}), {v['added_us']:+.1f} us (median of per-round differences)")
    return {"summary": summary, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(main())
