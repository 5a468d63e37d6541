"""Turn raw kernel events (abi.EventKey/EventVal) into report records (docs/report.md)."""
from __future__ import annotations

import base64
import os
import time
from datetime import datetime, timezone

from . import abi
from .addr import addr_of, display_ip

C = {k: v for k, v in vars(abi).items() if k.startswith("SD_")}
PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 255: "raw", 0: "ip",  # raw sockets: any protocol
              136: "udplite", 132: "sctp", 33: "dccp", 47: "gre", 50: "esp", 51: "ah", 2: "igmp", 4: "ipip",
              41: "ipv6", 103: "pim", 115: "l2tp"}
KIND_NAME = {C["SD_KIND_CONNECT"]: "connect", C["SD_KIND_SENDMSG"]: "sendmsg", C["SD_KIND_DNS"]: "dns",
             C["SD_KIND_SOCKET"]: "socket", C["SD_KIND_PACKET"]: "packet", C["SD_KIND_BIND"]: "bind",
             C["SD_KIND_SOCKOPT"]: "sockopt"}
VERDICT_NAME = {C["SD_EV_ALLOWED"]: "allowed", C["SD_EV_BLOCKED"]: "blocked",
                C["SD_EV_WOULD_BLOCK"]: "would-block"}
UNLISTED_REASON = "a name no rule covers: resolved (search lists), its addresses judged by CIDR rules and the default"

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from .pinned import Drained

FIELDS = ("container", "policy", "verdict", "kind", "proto", "family", "dst_ip", "dst_port", "domain",
          "pid", "comm", "exe", "cmdline", "argv", "argv_b64", "argv_truncated", "uid", "rule", "reason", "count",
          "first_seen", "last_seen", "parents", "target", "note")
ARGV_FIELDS = ("cmdline", "argv", "argv_b64", "argv_truncated")


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


def proc_exe(pid: int, pstart: int = 0, proc: str = "/proc") -> str | None:
    """The executable of a live process (the same one, when pstart is known), or None."""
    if pid <= 0 or (pstart and ((s := _start_ns(pid, proc)) is None or abs(s - pstart) > 50_000_000)):
        return None
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return None


def proc_cmdline_raw(pid: int, pstart: int = 0, proc: str = "/proc") -> bytes | None:
    """The exact command line (NUL-separated) of a live process, or None. With pstart (the
    kernel's start time of the process that made the call), only when the live process with
    that pid is that one: a later process that reused the pid is never blamed."""
    if not pid:
        return None
    if pstart:
        start = _start_ns(pid, proc)
        if start is None or abs(start - pstart) > 50_000_000:
            return None
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            return f.read() or None
    except OSError:
        return None


def proc_cmdline(pid: int, pstart: int = 0, proc: str = "/proc") -> str | None:
    """The command line of a live process (arguments joined by spaces), or None."""
    return argv_fields(proc_cmdline_raw(pid, pstart, proc))["cmdline"]


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
    if index == C["SD_RULE_SRCROUTE"]:
        return "source_routes", "a source route (IPv6 routing header, IPv4 LSRR/SSRR) (policy source_routes: deny)"
    if index == C["SD_RULE_PROTOCOL"]:
        return "protocols", "an IP protocol the policy does not name in protocols"
    if index == C["SD_RULE_SERVE_DNS"]:
        return "serve_dns", "answering DNS from inside the policed cgroup (policy serve_dns: deny)"
    if index == C["SD_RULE_ANSWER_CUT"]:
        return "answer-cut", (f"a DNS answer cut (more than {C['SD_MAX_ANSWERS']} addresses, or more records or "
                              "TCP messages in one packet than the kernel walks): the addresses past the cut "
                              "were not learned")
    if index == C["SD_RULE_MALFORMED"]:
        return "malformed-query", "a DNS query the kernel could not parse"
    if index == C["SD_RULE_ZEROCOPY"]:
        return "zerocopy", ("data sent by reference (SO_ZEROCOPY, or DNS data by splice/sendfile): pages the "
                            "process can change after they were judged (refused in policed cgroups)")
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
    captured (exact bytes; the process may be long gone), else from /proc while the same
    process lives. `parents` lists the deploy's own ancestors, nearest first, up to the
    runtime (or stop_pids)."""
    out = []
    for key, val in drained.events:
        rule, reason = rule_of(compiled, key.rule)
        if rule == "dns.resolvers" and key.verdict != C["SD_EV_ALLOWED"]:
            reason = "dns.resolvers: not a listed resolver"  # as decide() and explain say
        proc = drained.procs.get((key.pid, key.pstart), {})
        if proc.get("raw"):
            cmd = argv_fields(proc["raw"], captured=True)
        else:
            cmd = argv_fields(proc_cmdline_raw(key.pid, key.pstart))
        target = drained.names.get(key.target_id) if key.target_id else None
        exe = proc.get("exe") or (proc_exe(key.pid, key.pstart) if not proc else None)
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
            **cmd,
            "uid": val.uid,
            "rule": rule,
            "reason": reason,
            "count": val.count,
            "first_seen": boot_ns_to_rfc3339(val.first_ns),
            "last_seen": boot_ns_to_rfc3339(val.last_ns),
            "parents": _deploy_parents(proc.get("parents", []), stop_pids),
            "target": target,
            "note": _note(key, target),
        })
    return out
