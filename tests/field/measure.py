"""Measure how each real client fails (docs/policy.md, "How clients fail"): wall time, exit
status and last message line for

- ``today-lookup`` / ``today-connect``: a denied lookup / connect under ``safedeploy run``
  with the kernel programs as they are;
- ``dns-<ERRNO>``: every DNS send fails with ERRNO (seccomp injection, errinject.py);
- ``vc-<ERRNO>``: the same over DNS-over-TCP (``options use-vc``; glibc clients only);
- ``connect-<ERRNO>``: the TCP connect to the (IP literal) destination fails with ERRNO;
- ``answer-REFUSED`` / ``answer-NXDOMAIN``: the resolver answers so.

    .venv/bin/python tests/field/measure.py [--cap SECONDS] [CONDITION...] > table.md
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "kernel")]
import clients  # noqa: E402
import field  # noqa: E402
import resolvers  # noqa: E402

ERRNOS = ("EPERM", "EACCES", "ECONNREFUSED")
CONDITIONS = ["today-lookup", "today-connect", *(f"dns-{e}" for e in ERRNOS), *(f"connect-{e}" for e in ERRNOS),
              "answer-REFUSED", "answer-NXDOMAIN"]
NOT_GLIBC = {"busybox-wget", "busybox-nslookup", "dig", "host", "nslookup"}   # their own DNS code
INJECT = ["/usr/bin/python3", str(field.HERE / "errinject.py")]


class _Rcode(resolvers.Zone):
    """Answers every query with one RCODE."""

    def __init__(self, rcode: int):
        super().__init__({})
        self.rcode = rcode

    def resolve(self, request, handler):
        reply = request.reply()
        reply.header.rcode = self.rcode
        return reply


def _jobs(cond: str, port: int, cap: float, only: list[str] | None = None) -> list[field.Job]:
    jobs = []
    for c, (kind, _) in clients.CLIENTS.items():
        if only and c not in only:
            continue
        connect = cond.startswith(("connect-", "today-connect"))
        if connect and kind != "http":
            continue
        if cond.startswith("vc-") and c in NOT_GLIBC:
            continue
        host = "127.0.0.2" if connect else ("auth.field.test" if cond.startswith("today") else "mirror.field.test")
        argv = clients.argv(c, host, port, f"{c}-{cond}")
        if cond.startswith(("dns-", "connect-", "vc-")):
            mode, err = cond.split("-")
            argv = [*INJECT, mode, err, "--", *argv]
        jobs.append(field.Job(f"{c}|{cond}", argv, timeout=cap))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=float, default=40.0)
    ap.add_argument("--clients", help="comma-separated subset of clients.CLIENTS")
    ap.add_argument("conditions", nargs="*", default=CONDITIONS)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sd-measure-"))
    lst = field.Listener()
    dnsmasq = resolvers.start("dnsmasq", work)
    extra = []
    try:
        for cond in args.conditions:
            jobs = _jobs(cond, lst.port, args.cap, args.clients.split(",") if args.clients else None)
            if cond.startswith("today"):
                res = field.run_batch(jobs, dnsmasq.ip, work).results
            elif cond.startswith("answer-"):
                ip = resolvers.free_loopback(1)[0]
                srv = resolvers.Server(_Rcode({"REFUSED": 5, "NXDOMAIN": 3}[cond.split("-")[1]]), address=ip, port=53)
                extra.append(srv)
                res = field.run_unpoliced_batch(jobs, ip, work)
            else:
                res = field.run_unpoliced_batch(jobs, dnsmasq.ip, work, "use-vc" if cond.startswith("vc-") else "plain")
            for job in jobs:
                r = res[job.id]
                text = (r["err"].strip() or r["out"].strip()).splitlines()
                msg = "(killed at cap)" if r["timeout"] else (text[-1][:90] if text else "")
                print(f"| {job.id.split('|')[0]} | {cond} | {r['wall']:.2f} s | {r['rc']} | {msg.replace('|', '/')} |",
                      flush=True)
    finally:
        lst.close()
        dnsmasq.stop()
        for s in extra:
            s.stop()


if __name__ == "__main__":
    main()
