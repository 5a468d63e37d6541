"""Turn raw kernel events (abi.EventKey/EventVal) into report records (docs/report.md)."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from . import abi
from .addr import addr_of, display_ip

C = {k: v for k, v in vars(abi).items() if k.startswith("SD_")}
PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 255: "raw", 0: "ip"}  # raw sockets: any protocol
KIND_NAME = {C["SD_KIND_CONNECT"]: "connect", C["SD_KIND_SENDMSG"]: "sendmsg", C["SD_KIND_DNS"]: "dns",
             C["SD_KIND_SOCKET"]: "socket"}
VERDICT_NAME = {C["SD_EV_ALLOWED"]: "allowed", C["SD_EV_BLOCKED"]: "blocked",
                C["SD_EV_WOULD_BLOCK"]: "would-block"}
UNLISTED_REASON = "a name no rule covers: resolved (search lists), its addresses judged by CIDR rules and the default"

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from .pinned import Drained

FIELDS = ("container", "policy", "verdict", "kind", "proto", "family", "dst_ip", "dst_port", "domain",
          "pid", "comm", "cmdline", "uid", "rule", "reason", "count", "first_seen", "last_seen", "parents",
          "target", "note")


def _note(key, target: str | None) -> str | None:
    """What a reader needs beyond the rule to understand a row."""
    if key.flags & C["SD_EVF_EXPIRED"]:
        return "address learned from the domain, but its TTL (at least dns.min_ttl) had passed"
    if target:
        return f"the domain is a CNAME of {target}"
    if key.rule == C["SD_RULE_UNLISTED"]:
        return "a lookup of a name no rule covers (e.g. a search-list candidate)"
    return None


def boot_ns_to_rfc3339(ns: int) -> str:
    """CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns) -> RFC 3339 UTC wall time."""
    now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = time.time_ns() - (now_boot - ns)
    return datetime.fromtimestamp(wall / 1e9, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _start_ns(pid: int, proc: str) -> int | None:
    """A live process's start time (ns since boot, 10 ms resolution) from /proc/PID/stat."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_cmdline(pid: int, pstart: int = 0, proc: str = "/proc") -> str | None:
    """The command line of a live process, or None. With pstart (the kernel's start time of
    the process that made the call), only when the live process with that pid is that one:
    a later process that reused the pid is never blamed."""
    if not pid:
        return None
    if pstart:
        start = _start_ns(pid, proc)
        if start is None or abs(start - pstart) > 50_000_000:
            return None
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]
    return " ".join(args) if raw else None


def rule_of(compiled: dict, index: int) -> tuple[str, str | None]:
    """(rule text as written, reason) for a rule index from the kernel."""
    if index == C["SD_RULE_DEFAULT"]:
        return "default", None
    if index == C["SD_RULE_RESOLVERS"]:
        return "dns.resolvers", None
    if index == C["SD_RULE_RAW"]:
        return "raw_sockets", "raw sockets bypass connect rules (policy raw_sockets: deny)"
    if index == C["SD_RULE_UNLISTED"]:
        return "dns.unlisted", UNLISTED_REASON
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


def to_records(drained: "Drained", compiled: dict, container: str,
               stop_pids: frozenset[int] = frozenset()) -> list[dict]:
    """One report record per kernel event; command lines come from what the kernel
    captured (the process may be long gone), else from /proc while it lives. `parents`
    lists the deploy's own ancestors, nearest first, up to the runtime (or stop_pids)."""
    out = []
    for key, val in drained.events:
        rule, reason = rule_of(compiled, key.rule)
        if rule == "dns.resolvers" and key.verdict != C["SD_EV_ALLOWED"]:
            reason = "dns.resolvers: not a listed resolver"  # as decide() and explain say
        proc = drained.procs.get((key.pid, key.pstart), {})
        cmd = proc.get("cmdline") or proc_cmdline(key.pid, key.pstart)
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
            "cmdline": cmd,
            "uid": val.uid,
            "rule": rule,
            "reason": reason,
            "count": val.count,
            "first_seen": boot_ns_to_rfc3339(val.first_ns),
            "last_seen": boot_ns_to_rfc3339(val.last_ns),
            "parents": _deploy_parents(proc.get("parents", []), stop_pids),
            "target": drained.names.get(key.target_id) if key.target_id else None,
            "note": _note(key, drained.names.get(key.target_id) if key.target_id else None),
        })
    return out
