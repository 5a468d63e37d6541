"""Reports: JSON Lines on disk (DESIGN.md §5), a readable table, stderr summary, syslog."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import write_atomic
from .events import FIELDS

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

_IDENTITY = ("container", "verdict", "kind", "proto", "family", "dst_ip", "dst_port", "domain", "pid", "rule")
_VERDICT_ORDER = {"blocked": 0, "would-block": 1, "allowed": 2}


class ReportError(Exception):
    """A report cannot be read; str() is one line."""


def aggregate(records: Iterable[dict]) -> list[dict]:
    """One record per distinct (process, destination, verdict, rule); counts add up,
    first/last times widen. Sorted: blocked first, then by destination."""
    merged: dict[tuple, dict] = {}
    for rec in records:
        ident = tuple(rec.get(k) for k in _IDENTITY)
        cur = merged.get(ident)
        if cur is None:
            merged[ident] = dict(rec)
            continue
        cur["count"] += rec["count"]
        cur["first_seen"] = min(cur["first_seen"], rec["first_seen"])
        cur["last_seen"] = max(cur["last_seen"], rec["last_seen"])
        cur["cmdline"] = cur.get("cmdline") or rec.get("cmdline")
        cur["exe"] = cur.get("exe") or rec.get("exe")
    return sorted(merged.values(), key=lambda r: (_VERDICT_ORDER.get(r["verdict"], 9), r.get("domain") or "",
                                                  r["dst_ip"], r["dst_port"], r["pid"]))


def summarize(records: list[dict], dropped: int = 0, container: str | None = None,
              policy: str | None = None) -> dict:
    """The final line of a report: totals per verdict, and events the kernel could not
    keep because its events map was full (never hidden)."""
    recs = aggregate(records)
    first = recs[0] if recs else {}
    out = {"summary": True, "container": container or first.get("container"),
           "policy": policy or first.get("policy"), "destinations": len(recs), "events_dropped": dropped}
    for verdict in ("blocked", "would-block", "allowed"):
        out[verdict.replace("-", "_")] = sum(r["count"] for r in recs if r["verdict"] == verdict)
    # DNS answers whose addresses the kernel could not all learn (docs/policy.md)
    out["answers_cut"] = sum(r["count"] for r in recs if r.get("rule") == "answer-cut")
    return out


def write(records: Iterable[dict], path: Path, dropped: int = 0, container: str | None = None,
          policy: str | None = None) -> Path:
    """Write (or extend: an existing report's lines are merged in) a JSON Lines report:
    one line per (process, destination, verdict), then a summary line."""
    records = list(records)
    path = Path(path)
    if path.exists():
        old = load_summary(path)
        records = load(path) + records
        dropped += (old or {}).get("events_dropped", 0)
    lines = [json.dumps({k: rec.get(k) for k in FIELDS}, separators=(",", ":")) for rec in aggregate(records)]
    lines.append(json.dumps(summarize(records, dropped, container, policy), separators=(",", ":")))
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def load(path: Path) -> list[dict]:
    """The records of a report (without its summary line)."""
    return [r for r in _lines(path) if not r.get("summary")]


def load_summary(path: Path) -> dict | None:
    return next((r for r in _lines(path) if r.get("summary")), None)


def _lines(path: Path) -> list[dict]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ReportError(f"{path}: no such report") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not JSON: {e.msg}") from None
        if not isinstance(rec, dict) or ("verdict" not in rec and not rec.get("summary")):
            raise ReportError(f"{path}:{n}: not a safedeploy report record")
        out.append(rec)
    return out


def _dest(rec: dict) -> str:
    ip = rec["dst_ip"]
    host = f"[{ip}]" if ":" in ip else ip
    where = f"{host}:{rec['dst_port']}/{rec['proto']}"
    return f"{rec['domain']} ({where})" if rec.get("domain") else where


def format_table(records: list[dict], summary: dict | None = None) -> str:
    """Grouped by verdict; one line per destination and process."""
    lines = []
    if summary and summary.get("answers_cut"):
        lines += [f"WARNING: {summary['answers_cut']} DNS answers had more addresses than the kernel learns "
                  "(see the answer-cut rows); connects to the others may be refused", ""]
    if summary and summary.get("events_dropped"):
        lines += [f"WARNING: {summary['events_dropped']} events were dropped (the kernel's events map was full); "
                  "enforcement was not affected", ""]
    if not records:
        return "\n".join(lines + ["no network activity recorded", ""])
    for verdict in ("blocked", "would-block", "allowed"):
        group = [r for r in aggregate(records) if r["verdict"] == verdict]
        if not group:
            continue
        lines.append(f"{verdict.upper()} ({sum(r['count'] for r in group)} attempts)")
        rows = [(_dest(r), _process(r), str(r["count"]), r["rule"] + (f" — {r['reason']}" if r.get("reason") else ""),
                 r.get("exe") or "-", r.get("cmdline") or "") for r in group]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        head = ("DESTINATION", "PROCESS", "COUNT", "RULE", "EXE")
        widths = [max(w, len(h)) for w, h in zip(widths, head)]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  COMMAND")
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5])
        lines.append("")
    return "\n".join(lines)


def _process(r: dict) -> str:
    return f"{r['pid']} {r['comm']}" if r.get("pid") else "(kernel, no process)"


def _violation(r: dict) -> str:
    why = f" ({r['reason']})" if r.get("reason") else ""
    return f"{r['verdict']}: {_dest(r)} by pid {r['pid']} {r['comm']} x{r['count']} rule {r['rule']}{why}"


def _violations(records: list[dict]) -> list[dict]:
    return [r for r in aggregate(records) if r["verdict"] != "allowed"]


def summary(records: list[dict]) -> list[str]:
    """Lines for stderr: one per blocked (or would-block) destination."""
    return [f"safedeploy: {_violation(r)}" for r in _violations(records)]


def syslog_blocked(records: list[dict], ident: str = "safedeploy", dev: str = "/dev/log") -> int:
    """One syslog line per blocked destination (when /dev/log exists). Returns lines sent."""
    lines = [f"container {r['container']}: {_violation(r)}" for r in _violations(records)]
    if not lines or not os.path.exists(dev):
        return 0
    import socket  # noqa: PLC0415 — only when there is something to log
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(dev)
            for line in lines:
                s.send(f"<36>{ident}: {line}".encode())  # facility auth(4)*8 + warning(4)
                sent += 1
    except OSError:
        pass
    return sent
