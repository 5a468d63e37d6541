"""Turn raw kernel events (maps.EventKey/EventVal) into report records (docs/report.md)."""
from __future__ import annotations

import base64
import os
import time
from datetime import datetime, timezone

from . import bpfsys, session
from .maps import C, KIND_NAME, PROTO_NAME, VERDICT_NAME, PinnedMaps, Proc, ProcKey, addr_of
from .policy import display_ip

FIELDS = ("container", "policy", "verdict", "kind", "proto", "family", "dst_ip", "dst_port", "domain",
          "pid", "comm", "cmdline", "argv", "argv_b64", "argv_truncated", "uid", "rule", "reason", "count",
          "first_seen", "last_seen", "parents")
ARGV_FIELDS = ("cmdline", "argv", "argv_b64", "argv_truncated")


def boot_ns_to_rfc3339(ns: int) -> str:
    """CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns) -> RFC 3339 UTC wall time."""
    now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = time.time_ns() - (now_boot - ns)
    return datetime.fromtimestamp(wall / 1e9, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def proc_cmdline_raw(pid: int, proc: str = "/proc") -> bytes | None:
    """The exact command line (NUL-separated) of a live process, or None."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            return f.read() or None
    except OSError:
        return None


def proc_cmdline(pid: int, proc: str = "/proc") -> str | None:
    """The command line of a live process (arguments joined by spaces), or None."""
    return argv_fields(proc_cmdline_raw(pid, proc))["cmdline"]


def argv_fields(raw: bytes | None, captured: bool = False) -> dict:
    """The report's command-line fields from a NUL-separated command line (as in
    /proc/PID/cmdline; `captured`: as the kernel copied it, at most SD_CMDLINE bytes):
    ``argv`` the arguments as text (a byte that is not UTF-8 becomes U+FFFD), ``argv_b64``
    the exact bytes, the arguments joined by NUL, in base64 when ``argv`` is not exact
    (else null), ``argv_truncated`` when the kernel's copy filled its SD_CMDLINE bytes (the
    command line may go on; the last argument is where the copy stopped, all of the bytes
    kept), and ``cmdline`` the arguments joined by spaces."""
    if not raw:
        return {"cmdline": None, "argv": None, "argv_b64": None, "argv_truncated": False}
    cut = captured and len(raw) >= C["SD_CMDLINE"]
    args = (raw[:-1] if raw.endswith(b"\0") and not cut else raw).split(b"\0")
    text = [a.decode("utf-8", "replace") for a in args]
    exact = all(t.encode() == a for t, a in zip(text, args))
    return {"cmdline": " ".join(text), "argv": text,
            "argv_b64": None if exact else base64.b64encode(b"\0".join(args)).decode(),
            "argv_truncated": cut}


def argv_bytes(rec: dict) -> list[bytes] | None:
    """The exact arguments of a report (or watch --json) record, or None."""
    if rec.get("argv_b64"):
        return base64.b64decode(rec["argv_b64"]).split(b"\0")
    return None if rec.get("argv") is None else [a.encode() for a in rec["argv"]]


def captured_cmdline(maps: PinnedMaps, cgid: int, pid: int) -> bytes | None:
    """The command line exactly as the kernel captured it for (cgid, pid), or None.
    (PinnedMaps.procs_of decodes it; the report keeps the bytes.)"""
    val = Proc()
    if bpfsys.map_lookup(maps.fds["procs"], ProcKey(cgid=cgid, tgid=pid), val) and val.len:
        return bytes(val.cmdline[:min(val.len, C["SD_CMDLINE"])])
    return None


def release(att: "session.Attachment", compiled: dict | None = None) -> "session.Drained":
    """session.release, keeping the kernel's exact command lines first (release removes
    them): ``drained.raw_cmdlines`` maps pid -> bytes for :func:`to_records`."""
    raw: dict[int, bytes] = {}
    if os.path.exists(att.pin_dir):
        with PinnedMaps.open(att.pin_dir) as maps:
            for key in bpfsys.map_keys(maps.fds["procs"], ProcKey):
                if key.cgid == att.cgid:
                    cmd = captured_cmdline(maps, att.cgid, key.tgid)
                    if cmd:
                        raw[key.tgid] = cmd
    drained = session.release(att, compiled)
    drained.raw_cmdlines = raw
    return drained


def rule_of(compiled: dict, index: int) -> tuple[str, str | None]:
    """(rule text as written, reason) for a rule index from the kernel."""
    if index == C["SD_RULE_DEFAULT"]:
        return "default", None
    if index == C["SD_RULE_RESOLVERS"]:
        return "dns.resolvers", None
    if index == C["SD_RULE_RAW"]:
        return "raw_sockets", "raw sockets bypass connect rules (policy raw_sockets: deny)"
    if index == C["SD_RULE_MALFORMED"]:
        return "malformed-query", "a DNS query the kernel could not parse"
    if 0 <= index < len(compiled.get("rules", ())):
        text, reason = compiled["rules"][index]
        return text, reason
    return f"rule#{index}", None


# the ancestors chain stops at whoever started the deploy: a runtime, or `safedeploy run`
RUNTIME_COMMS = frozenset({"conmon", "runc", "crun", "containerd-shim", "containerd-shim-runc-v2", "podman",
                           "runc:[2:INIT]", "runc:[1:CHILD]", "systemd"})


def _deploy_parents(chain: list[dict], stop_pids: frozenset[int]) -> list[str]:
    out = []
    for p in chain:
        if p["pid"] <= 1 or p["pid"] in stop_pids or p["comm"] in RUNTIME_COMMS:
            break
        out.append(f"{p['pid']} {p['comm']}")
    return out


def to_records(drained: "session.Drained", compiled: dict, container: str,
               stop_pids: frozenset[int] = frozenset()) -> list[dict]:
    """One report record per kernel event; command lines come from what the kernel
    captured (the process may be long gone), else from /proc while it lives. `parents`
    lists the deploy's own ancestors, nearest first, up to the runtime (or stop_pids).
    Exact command lines come from ``drained.raw_cmdlines`` (see :func:`release`)."""
    raw_cmdlines = getattr(drained, "raw_cmdlines", {})
    out = []
    for key, val in drained.events:
        rule, reason = rule_of(compiled, key.rule)
        if rule == "dns.resolvers" and key.verdict != C["SD_EV_ALLOWED"]:
            reason = "dns.resolvers: not a listed resolver"  # as decide() and explain say
        proc = drained.procs.get(key.pid, {})
        if key.pid in raw_cmdlines:
            cmd = argv_fields(raw_cmdlines[key.pid], captured=True)
        elif proc.get("cmdline"):  # captured, but only its decoded form is left
            cmd = dict(argv_fields(None), cmdline=proc["cmdline"])
        else:
            cmd = argv_fields(proc_cmdline_raw(key.pid))
        out.append({
            "container": container,
            "policy": compiled["name"],
            "verdict": VERDICT_NAME.get(key.verdict, str(key.verdict)),
            "kind": KIND_NAME.get(key.kind, str(key.kind)),
            "proto": PROTO_NAME.get(key.proto, str(key.proto)),
            "family": key.family,
            "dst_ip": display_ip(addr_of(key.addr)),
            "dst_port": key.port,
            "domain": drained.names.get(key.name_id) if key.name_id else None,
            "pid": key.pid,
            "comm": val.comm.decode(errors="replace"),
            **cmd,
            "uid": val.uid,
            "rule": rule,
            "reason": reason,
            "count": val.count,
            "first_seen": boot_ns_to_rfc3339(val.first_ns),
            "last_seen": boot_ns_to_rfc3339(val.last_ns),
            "parents": _deploy_parents(proc.get("parents", []), stop_pids),
        })
    return out
