"""Turn raw kernel events (maps.EventKey/EventVal) into report records (DESIGN.md §5)."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from .maps import C, KIND_NAME, PROTO_NAME, VERDICT_NAME, addr_of
from .policy import display_ip

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from .session import Drained

FIELDS = ("container", "policy", "verdict", "kind", "proto", "family", "dst_ip", "dst_port", "domain",
          "pid", "comm", "exe", "cmdline", "uid", "rule", "reason", "count", "first_seen", "last_seen", "parents")


def boot_ns_to_rfc3339(ns: int) -> str:
    """CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns) -> RFC 3339 UTC wall time."""
    now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = time.time_ns() - (now_boot - ns)
    return datetime.fromtimestamp(wall / 1e9, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def proc_exe(pid: int, proc: str = "/proc") -> str | None:
    """The executable of a live process, or None."""
    if pid <= 0:
        return None
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return None


def proc_cmdline(pid: int, proc: str = "/proc") -> str | None:
    """The command line of a live process, or None."""
    if pid <= 0:
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
    if index == C["SD_RULE_SRCROUTE"]:
        return "source_routes", "a source route (IPv6 routing header, IPv4 LSRR/SSRR) (policy source_routes: deny)"
    if index == C["SD_RULE_PROTOCOL"]:
        return "protocols", "an IP protocol the policy does not name in protocols"
    if index == C["SD_RULE_SERVE_DNS"]:
        return "serve_dns", "answering DNS from inside the policed cgroup (policy serve_dns: deny)"
    if index == C["SD_RULE_ANSWER_CUT"]:
        return "answer-cut", (f"a DNS answer with more than {C['SD_MAX_ANSWERS']} addresses: "
                              "the addresses past the cut were not learned")
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
        proc = drained.procs.get(key.pid, {})
        cmd = proc.get("cmdline") or proc_cmdline(key.pid)
        exe = proc.get("exe") or (proc_exe(key.pid) if not proc else None)
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
            "exe": exe,
            "cmdline": cmd,
            "uid": val.uid,
            "rule": rule,
            "reason": reason,
            "count": val.count,
            "first_seen": boot_ns_to_rfc3339(val.first_ns),
            "last_seen": boot_ns_to_rfc3339(val.last_ns),
            "parents": _deploy_parents(proc.get("parents", []), stop_pids),
        })
    return out
