"""Reports: JSON Lines on disk (docs/report.md), a readable table, stderr summary, syslog.

The file keeps process-controlled text exactly (JSON-escaped; ``argv_b64`` for bytes that
are not UTF-8); every line for people goes through :func:`visible.visible`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import settings, write_atomic
from .errors import SafedeployError
from .events import ARGV_FIELDS, FIELDS, argv_bytes
from .visible import argv_line, visible

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

_IDENTITY = ("container", "verdict", "kind", "proto", "family", "dst_ip", "dst_port", "domain", "pid", "rule")
_VERDICT_ORDER = {"blocked": 0, "would-block": 1, "allowed": 2}


class ReportError(SafedeployError):
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
        if not cur.get("cmdline") and rec.get("cmdline"):  # the first known command line, all of it
            cur.update({k: rec.get(k) for k in ARGV_FIELDS})
        cur["exe"] = cur.get("exe") or rec.get("exe")
    return sorted(merged.values(), key=lambda r: (_VERDICT_ORDER.get(r["verdict"], 9), r.get("domain") or "",
                                                  r["dst_ip"], r["dst_port"], r["pid"]))


# per-cgroup quotas whose overflow a report names: counter of cgstats -> (map, what it holds)
_QUOTAS = {"learned_new": ("learned", "learned addresses"), "pending_new": ("pending", "pending DNS queries"),
           "names_new": ("qnames", "DNS names"), "procs_new": ("procs", "captured processes")}


def quota_notes(counters: dict) -> dict[str, int]:
    """What ran out of a cgroup's quotas: {map: entries over its quota (the oldest were
    evicted)} plus the decisions whose details did not fit (blocked_dropped, events_dropped)."""
    from .pinned import INNER  # noqa: PLC0415
    out = {}
    for counter, (name, _) in _QUOTAS.items():
        over = counters.get(counter, 0) - INNER[name][3]
        if over > 0:
            out[name] = over
    for counter in ("blocked_dropped", "events_dropped"):
        if counters.get(counter):
            out[counter] = counters[counter]
    return out


def summarize(records: list[dict], dropped: int = 0, container: str | None = None,
              policy: str | None = None, counters: dict | None = None, base: dict | None = None,
              extra: dict | None = None) -> dict:
    """The final line of a report: totals per verdict, and events the kernel could not
    keep in detail (never hidden). With the kernel's exact per-cgroup counters, the totals
    are those counts (plus base's, a summary this report extends), whether or not every
    decision's details fit in the cgroup's quota."""
    recs = aggregate(records)
    first = recs[0] if recs else {}
    out = {"summary": True, "container": container or first.get("container"),
           "policy": policy or first.get("policy"), "destinations": len(recs), "events_dropped": dropped}
    for verdict in ("blocked", "would-block", "allowed"):
        key = verdict.replace("-", "_")
        out[key] = sum(r["count"] for r in recs if r["verdict"] == verdict)
        if counters:
            out[key] = max(out[key], (base or {}).get(key, 0) + counters.get(key, 0))
    quota = dict((base or {}).get("quota") or {})
    for name, n in quota_notes(counters or {}).items():
        quota[name] = quota.get(name, 0) + n
    if quota:
        out["quota"] = quota
    out.update(extra or {})
    # DNS answers whose addresses the kernel could not all learn (docs/policy.md)
    out["answers_cut"] = max(out.get("answers_cut", 0), sum(r["count"] for r in recs if r.get("rule") == "answer-cut"))
    return out


def write(records: Iterable[dict], path: Path, dropped: int = 0, container: str | None = None,
          policy: str | None = None, counters: dict | None = None, extra: dict | None = None) -> Path:
    """Write (or extend: an existing report's lines are merged in) a JSON Lines report:
    one line per (process, destination, verdict), then a summary line."""
    records = list(records)
    path = Path(path)
    old = None
    if path.exists():
        # a file the policed command could have written (found by an attacker: a planted
        # summary of -1 blocked made --fail-on-violation exit 0): counts that are not
        # positive integers are not merged, so nothing there can lower the kernel's counts
        old = {k: v for k, v in (load_summary(path) or {}).items() if not _bad_count(v)}
        records = [r for r in load(path) if _count_ok(r.get("count"))] + records
        dropped += old.get("events_dropped", 0)
        kept = {k: v for k, v in old.items() if k not in summarize([]) and k != "quota"}
        extra = {**kept, **(extra or {})}
    lines = [json.dumps({k: rec.get(k) for k in FIELDS}, separators=(",", ":")) for rec in aggregate(records)]
    lines.append(json.dumps(summarize(records, dropped, container, policy, counters, old, extra),
                            separators=(",", ":")))
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _count_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _bad_count(v) -> bool:
    """A number that cannot be a count (negative, fractional, a bool in a count's place)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (v < 0 or v != int(v))


def find(target: str, log_dir: str) -> Path:
    """The report a user means: a file, a container/run id, a unique id prefix (as `podman ps`
    shows it), or a podman container name (the newest container of that name with a report,
    found through podman, also after `run --rm` removed it)."""
    path = Path(target)
    if path.exists():
        return path
    logs = Path(log_dir)
    path = logs / f"{target}.jsonl"
    if path.exists() or not target or "/" in target:
        return path
    found = sorted(logs.glob(f"{target}*.jsonl"))
    if len(found) > 1:
        raise ReportError(f"{target!r} matches {len(found)} reports: " + ", ".join(f.stem[:16] for f in found[:5]))
    if found:
        return found[0]
    for cid in reversed(podman_ids(target)):
        if (logs / f"{cid}.jsonl").exists():
            return logs / f"{cid}.jsonl"
    raise ReportError(f"{target}: no report (not a file, a container or run id, an id prefix, "
                      f"or the name of a podman container with a report in {logs})")


def podman_ids(name: str) -> list[str]:
    """Ids of the podman containers that had this name, oldest first: podman's event log keeps
    them after the container is gone. [] without podman."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    if not shutil.which("podman"):
        return []
    ids: list[str] = []
    for cmd in (["podman", "events", "--stream=false", "--filter", f"container={name}", "--filter", "event=create",
                 "--format", "{{.ID}} {{.Name}}"],
                ["podman", "container", "inspect", "--format", "{{.Id}} {{.Name}}", name]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == name and parts[0] not in ids:
                ids.append(parts[0])
    return ids


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


def dest_text(rec: dict) -> str:
    """`name (ip:port/proto)` or `ip:port/proto`, made visible."""
    ip = visible(rec["dst_ip"])
    host = f"[{ip}]" if ":" in ip else ip
    where = f"{host}:{visible(rec['dst_port'])}/{visible(rec['proto'])}"
    return f"{visible(rec['domain'])} ({where})" if rec.get("domain") else where


def command_text(rec: dict) -> str:
    """The command line of a record for people: exact arguments when known, escaped."""
    argv = argv_bytes(rec)
    return argv_line(argv) if argv is not None else visible(rec.get("cmdline"))


def rule_text(rec: dict) -> str:
    """`rule — reason`, made visible."""
    return visible(rec["rule"]) + (f" — {visible(rec['reason'])}" if rec.get("reason") else "") + \
        (f" [{visible(rec['note'])}]" if rec.get("note") else "")


def format_table(records: list[dict], summary: dict | None = None) -> str:
    """Grouped by verdict; one line per destination and process."""
    lines = []
    if summary and summary.get("answers_cut"):
        lines += [f"WARNING: {summary['answers_cut']} DNS answers had more addresses than the kernel learns "
                  "(see the answer-cut rows); connects to the others may be refused", ""]
    if summary and summary.get("events_dropped"):
        lines += [f"WARNING: {summary['events_dropped']} decisions were counted but not kept in detail "
                  "(the cgroup's events quota was full); enforcement was not affected", ""]
    for name, n in ((summary or {}).get("quota") or {}).items():
        if name in ("blocked_dropped", "events_dropped"):
            continue
        lines += [f"WARNING: quota of {name} ran out: {n} entries over it (the oldest were evicted)", ""]
    if not records:
        return "\n".join(lines + ["no network activity recorded", ""])
    for verdict in ("blocked", "would-block", "allowed"):
        group = [r for r in aggregate(records) if r["verdict"] == verdict]
        if not group:
            continue
        lines.append(f"{verdict.upper()} ({sum(r['count'] for r in group)} attempts)")
        rows = [(dest_text(r), _process(r), str(r["count"]), rule_text(r), visible(r.get("exe") or "-"),
                 command_text(r)) for r in group]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        head = ("DESTINATION", "PROCESS", "COUNT", "RULE", "EXE")
        widths = [max(w, len(h)) for w, h in zip(widths, head)]
        lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  COMMAND")
        for row in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5])
        lines.append("")
    return "\n".join(lines)


def _process(r: dict) -> str:
    return f"{r['pid']} {visible(r['comm'])}" if r.get("pid") else "(kernel, no process)"


def _violation(r: dict) -> str:
    why = f" ({visible(r['reason'])})" if r.get("reason") else ""
    who = f"pid {r['pid']} {visible(r['comm'])}" if r.get("pid") else "(kernel, no process)"
    return f"{visible(r['verdict'])}: {dest_text(r)} by {who} x{r['count']} rule {visible(r['rule'])}{why}"


def _violations(records: list[dict]) -> list[dict]:
    return [r for r in aggregate(records) if r["verdict"] != "allowed"]


def summary(records: list[dict]) -> list[str]:
    """Lines for stderr: one per blocked (or would-block) destination."""
    return [f"safedeploy: {_violation(r)}" for r in _violations(records)]


def syslog_blocked(records: list[dict], ident: str = "safedeploy", dev: str | None = None) -> int:
    """One syslog line per blocked destination (when the syslog socket, /dev/log unless
    $SAFEDEPLOY_SYSLOG says otherwise, exists). Returns lines sent."""
    dev = dev or settings.syslog_socket()
    lines = [f"container {visible(r['container'])}: {_violation(r)}" for r in _violations(records)]
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
