"""Userspace side of bpf/safedeploy.h: the map layouts, and policy <-> map entries.

The ctypes structures below are the only userspace copy of the header's structs; the
``SD_*`` constants are read from the header itself. A kernel test compares both with
what bcc compiled. Nothing here imports bcc.
"""
from __future__ import annotations

import ctypes
import os
TYPE_CHECKING = False  # typing is not imported on the hook's hot path

from . import bpfsys, read_text

if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

    from .policy import Policy

BPF_DIR = os.environ.get("SAFEDEPLOY_BPF_SRC") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "bpf")
HEADER = os.path.join(BPF_DIR, "safedeploy.h")


def _read_constants(header: str) -> dict[str, int]:
    """Every ``#define SD_NAME <integer>`` of the header (no regex: this is the hot path)."""
    out = {}
    for line in read_text(header).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define" and parts[1].startswith("SD_"):
            try:
                out[parts[1]] = int(parts[2], 0)
            except ValueError:
                continue
    return out


C = _read_constants(HEADER)
IPPROTO = {"tcp": 6, "udp": 17}
PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 255: "raw", 0: "ip",  # raw sockets: any protocol
              136: "udplite", 132: "sctp", 33: "dccp", 47: "gre", 50: "esp", 51: "ah", 2: "igmp", 4: "ipip",
              41: "ipv6", 103: "pim", 115: "l2tp"}
KIND_NAME = {C["SD_KIND_CONNECT"]: "connect", C["SD_KIND_SENDMSG"]: "sendmsg", C["SD_KIND_DNS"]: "dns",
             C["SD_KIND_SOCKET"]: "socket", C["SD_KIND_PACKET"]: "packet", C["SD_KIND_BIND"]: "bind",
             C["SD_KIND_SOCKOPT"]: "sockopt"}
VERDICT_NAME = {C["SD_EV_ALLOWED"]: "allowed", C["SD_EV_BLOCKED"]: "blocked",
                C["SD_EV_WOULD_BLOCK"]: "would-block"}


class SdCgroup(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_uint8), ("dflt", ctypes.c_uint8), ("has_resolvers", ctypes.c_uint8),
                ("name_denies", ctypes.c_uint8), ("allow_raw", ctypes.c_uint8), ("allow_srcroute", ctypes.c_uint8),
                ("serve_dns", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("protos", ctypes.c_uint8 * 32)]


class CidrKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("cgid", ctypes.c_uint64), ("addr", ctypes.c_uint8 * 16)]


class CidrVal(ctypes.Structure):
    _fields_ = [("rule", ctypes.c_uint16), ("verdict", ctypes.c_uint8), ("plen", ctypes.c_uint8)]


class AddrKey(ctypes.Structure):
    _fields_ = [("cgid", ctypes.c_uint64), ("addr", ctypes.c_uint8 * 16)]


class EventKey(ctypes.Structure):
    _fields_ = [("cgid", ctypes.c_uint64), ("addr", ctypes.c_uint8 * 16), ("pid", ctypes.c_uint32),
                ("port", ctypes.c_uint16), ("rule", ctypes.c_uint16), ("verdict", ctypes.c_uint8),
                ("kind", ctypes.c_uint8), ("proto", ctypes.c_uint8), ("family", ctypes.c_uint8),
                ("name_id", ctypes.c_uint32)]


class EventVal(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint64), ("first_ns", ctypes.c_uint64), ("last_ns", ctypes.c_uint64),
                ("uid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("comm", ctypes.c_char * 16)]


class NameKey(ctypes.Structure):
    _fields_ = [("cgid", ctypes.c_uint64), ("hash", ctypes.c_uint64), ("kind", ctypes.c_uint8),
                ("proto", ctypes.c_uint8), ("port", ctypes.c_uint16), ("pad", ctypes.c_uint32)]


class NameVal(ctypes.Structure):
    _fields_ = [("rule", ctypes.c_uint16), ("verdict", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class QnameKey(ctypes.Structure):
    _fields_ = [("cgid", ctypes.c_uint64), ("name_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Qname(ctypes.Structure):
    _fields_ = [("hashes", ctypes.c_uint64 * C["SD_MAX_SUFFIXES"]), ("nhash", ctypes.c_uint32),
                ("len", ctypes.c_uint32), ("name", ctypes.c_char * C["SD_NAME_BUF"])]


class Learned(ctypes.Structure):
    _fields_ = [("expires_ns", ctypes.c_uint64), ("name_id", ctypes.c_uint32), ("verdict", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("rule", ctypes.c_uint16)]


class LiveEvent(ctypes.Structure):
    _fields_ = [("k", EventKey), ("ts_ns", ctypes.c_uint64), ("comm", ctypes.c_char * 16)]


class PendingKey(ctypes.Structure):
    _fields_ = [("cgid", ctypes.c_uint64), ("addr", ctypes.c_uint8 * 16), ("txid", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("pad2", ctypes.c_uint32)]


class Pending(ctypes.Structure):
    _fields_ = [("expires_ns", ctypes.c_uint64), ("name_id", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class ProcKey(ctypes.Structure):
    _fields_ = [("cgid", ctypes.c_uint64), ("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class Ancestor(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("comm", ctypes.c_char * 16)]


class Proc(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint32), ("chain_len", ctypes.c_uint32),
                ("chain", Ancestor * C["SD_CHAIN"]), ("cmdline", ctypes.c_uint8 * C["SD_CMDLINE"]),
                ("exe_len", ctypes.c_uint32), ("exe_flags", ctypes.c_uint32), ("exe", ctypes.c_uint8 * C["SD_EXE"])]


def exe_path(proc: Proc) -> str | None:
    """The executable's path from a capture (the kernel writes its components last first)."""
    n = min(proc.exe_len, C["SD_EXE"])
    if not n:
        return None
    parts = [p.decode(errors="replace") for p in bytes(proc.exe[:n]).split(b"\0") if p]
    path = "/" + "/".join(reversed(parts))
    return path if proc.exe_flags & C["SD_EXE_COMPLETE"] else ".../" + path.lstrip("/")


U8 = ctypes.c_uint8
U64 = ctypes.c_uint64

# map name in the header -> (key type, value type); the pins are named map_<name>
MAPS: dict[str, tuple[type, type]] = {
    "cgroups": (U64, SdCgroup),
    "cidrs": (CidrKey, CidrVal),
    "resolvers": (AddrKey, U8),
    "events": (EventKey, EventVal),
    "stats": (ctypes.c_uint32, U64),
    "names": (NameKey, NameVal),
    "qnames": (QnameKey, Qname),
    "learned": (AddrKey, Learned),
    "procs": (ProcKey, Proc),
    "drops": (U64, U64),
    "pending": (PendingKey, Pending),
}
RINGBUFS = ("live",)  # pinned like the maps, read by `safedeploy watch`
PROG_ARRAYS = ("sd_tails",)  # pinned so the kernel keeps their entries (tail-called programs)
# the maps that hold per-cgroup state (cleared when a cgroup is released)
POLICY_MAPS = ("cidrs", "resolvers", "names", "qnames", "learned", "procs", "pending")  # keys have a cgid
DYNAMIC_MAPS = ("qnames", "learned", "procs", "pending")  # written by the programs, not from the policy


def addr_of(raw):
    """An IPv6Address (v4 as ::ffff:a.b.c.d) from a map's 16 address bytes."""
    import ipaddress  # noqa: PLC0415 — not needed to load a policy
    return ipaddress.IPv6Address(bytes(raw))


def compile_policy(policy: "Policy") -> dict:
    """A policy in kernel form, JSON-serialisable: what the hook caches and what state
    files keep, so the warm path needs neither the policy module nor a re-parse.
    Entry keys are stored with cgid 0; :func:`_with_cgid` fills it in."""
    return {
        "name": policy.name, "mode": policy.mode, "default": policy.default,
        "has_resolvers": policy.resolvers is not None,
        "rules": [[r.text, r.reason] for r in policy.rules],
        "cidrs": [[bytes(k).hex(), bytes(v).hex()] for k, v in cidr_entries(policy, 0)],
        "names": [[bytes(k).hex(), bytes(v).hex()] for k, v in name_entries(policy, 0)],
        "resolvers": [a.packed.hex() for a in policy.resolvers or ()],
        "name_denies": any(r.kind == "name" and r.verdict == "deny" for r in policy.rules),
        "allow_raw": policy.raw_sockets == "allow",
        "allow_srcroute": policy.source_routes == "allow",
        "serve_dns": policy.serve_dns == "allow",
        "protocols": list(policy.protocols),
    }


def name_hash(base: str) -> int:
    """FNV-1a 64 of the reversed lower-case name: what the kernel computes per suffix."""
    h = 0xCBF29CE484222325
    for c in reversed(base.encode()):
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def name_entries(policy: "Policy", cgid: int) -> list[tuple[NameKey, NameVal]]:
    """Name rules by (hash of base, exact|wildcard, proto, port). proto 0 holds the DNS
    query verdict (decide_query): allow rules (any ports) and port-less deny rules."""
    merged: dict[tuple, tuple[int, int]] = {}

    def put(slot, verdict, index):
        old = merged.get(slot)
        if old is None or (verdict, -index) > (old[0], -old[1]):
            merged[slot] = (verdict, index)
    for rule in policy.rules:
        if rule.kind != "name":
            continue
        verdict = C["SD_DENY"] if rule.verdict == "deny" else C["SD_ALLOW"]
        h = name_hash(rule.name)
        kind = C["SD_NAME_WILD"] if rule.wildcard else C["SD_NAME_EXACT"]
        for proto in [rule.proto] if rule.proto else ["tcp", "udp"]:
            for port in rule.ports or (0,):
                put((h, kind, IPPROTO[proto], port), verdict, rule.index)
        if rule.verdict == "allow" or (rule.ports is None and rule.proto is None):
            put((h, kind, 0, 0), verdict, rule.index)
        if policy.protocols and rule.ports is None and rule.proto is None:  # other IP protocols
            put((h, kind, C["SD_PROTO_OTHER"], 0), verdict, rule.index)
    return [(NameKey(cgid=cgid, hash=h, kind=kind, proto=proto, port=port), NameVal(rule=index, verdict=verdict))
            for (h, kind, proto, port), (verdict, index) in merged.items()]


def cgroup_entry(compiled: dict) -> SdCgroup:
    entry = SdCgroup(mode=C["SD_MODE_AUDIT"] if compiled["mode"] == "audit" else C["SD_MODE_ENFORCE"],
                     dflt=C["SD_DENY"] if compiled["default"] == "deny" else C["SD_ALLOW"],
                     has_resolvers=1 if compiled["has_resolvers"] else 0,
                     name_denies=1 if compiled.get("name_denies") else 0,
                     allow_raw=1 if compiled.get("allow_raw") else 0,
                     allow_srcroute=1 if compiled.get("allow_srcroute") else 0,
                     serve_dns=1 if compiled.get("serve_dns") else 0)
    for proto in compiled.get("protocols", ()):
        entry.protos[proto >> 3] |= 1 << (proto & 7)
    return entry


def cidr_entries(policy: "Policy", cgid: int) -> list[tuple[CidrKey, CidrVal]]:
    """LPM entries for the CIDR rules. Rules that land on the same key are merged as
    decide() breaks ties: deny beats allow, then the lowest index."""
    merged: dict[tuple, tuple[int, int]] = {}
    for rule in policy.rules:
        if rule.kind != "cidr":
            continue
        verdict = C["SD_DENY"] if rule.verdict == "deny" else C["SD_ALLOW"]
        protos = [IPPROTO[rule.proto]] if rule.proto else [IPPROTO["tcp"], IPPROTO["udp"]]
        if policy.protocols and rule.proto is None and rule.ports is None:
            protos.append(C["SD_PROTO_OTHER"])  # other IP protocols meet the port-less rules
        for proto in protos:
            for port in rule.ports or (0,):
                slot = (proto, port, rule.network.network_address.packed, rule.network.prefixlen)
                old = merged.get(slot)
                if old is None or (verdict, -rule.index) > (old[0], -old[1]):
                    merged[slot] = (verdict, rule.index)
    out = []
    for (proto, port, addr, plen), (verdict, index) in merged.items():
        key = CidrKey(prefixlen=C["SD_CIDR_FIXED_BITS"] + plen, proto=proto, port=port, cgid=cgid)
        key.addr[:] = addr
        out.append((key, CidrVal(rule=index, verdict=verdict, plen=plen)))
    return out


def _with_cgid(key_type, hexkey: str, cgid: int):
    key = key_type.from_buffer_copy(bytes.fromhex(hexkey))
    key.cgid = cgid
    return key


def _compiled_entries(compiled: dict, cgid: int):
    """(map name, key, value) of every rule entry of a compiled policy for cgid."""
    for k, v in compiled["cidrs"]:
        yield "cidrs", _with_cgid(CidrKey, k, cgid), CidrVal.from_buffer_copy(bytes.fromhex(v))
    for k, v in compiled.get("names", ()):
        yield "names", _with_cgid(NameKey, k, cgid), NameVal.from_buffer_copy(bytes.fromhex(v))
    for a in compiled["resolvers"]:
        key = AddrKey(cgid=cgid)
        key.addr[:] = bytes.fromhex(a)
        yield "resolvers", key, U8(1)


class PinnedMaps:
    """Open fds of the pinned maps of one program version."""

    def __init__(self, fds: dict[str, int]):
        self.fds = fds

    @classmethod
    def open(cls, pin_dir) -> "PinnedMaps":
        fds = {}
        try:
            for name in MAPS:
                fds[name] = bpfsys.obj_get(os.path.join(pin_dir, f"map_{name}"))
        except Exception:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> "PinnedMaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- per-cgroup policy -------------------------------------------------------
    def policy_of(self, cgid: int) -> SdCgroup | None:
        val = SdCgroup()
        return val if bpfsys.map_lookup(self.fds["cgroups"], U64(cgid), val) else None

    def load_policy(self, cgid: int, compiled: dict) -> None:
        """Write the rules, then the cgroup header that makes the programs use them.
        Fails (and leaves nothing behind) when the cgroup already has a policy."""
        if self.policy_of(cgid) is not None:
            raise bpfsys.BpfError(17, f"cgroup {cgid} already has a safedeploy policy")
        try:
            for name, key, val in _compiled_entries(compiled, cgid):
                try:
                    bpfsys.map_update(self.fds[name], key, val)
                except bpfsys.BpfError as e:
                    if e.errno == 7:  # E2BIG: the shared map is full
                        raise bpfsys.BpfError(e.errno, f"policy map {name} is full: cannot load the policy") from None
                    raise
            try:
                bpfsys.map_update(self.fds["cgroups"], U64(cgid), cgroup_entry(compiled),
                                  bpfsys.BPF_NOEXIST)
            except bpfsys.BpfError as e:
                if e.errno == 7:
                    raise bpfsys.BpfError(e.errno, "policy map cgroups is full: too many policed cgroups") from None
                raise
        except Exception:
            self.unload_policy(cgid, compiled)
            raise

    def unload_policy(self, cgid: int, compiled: dict | None = None) -> int:
        """Remove the header first (programs stop using the rules), then every rule
        entry of cgid: exactly the compiled policy's keys when known, else by scanning
        the shared maps (gc of a cgroup whose policy is lost). Returns entries removed."""
        removed = int(bpfsys.map_delete(self.fds["cgroups"], U64(cgid)))
        removed += int(bpfsys.map_delete(self.fds["drops"], U64(cgid)))
        scan = POLICY_MAPS
        if compiled is not None:
            for name, key, _ in _compiled_entries(compiled, cgid):
                removed += int(bpfsys.map_delete(self.fds[name], key))
            scan = DYNAMIC_MAPS  # what the kernel learned for this cgroup
        for name in scan:
            key_type = MAPS[name][0]
            fd = self.fds[name]
            for key in bpfsys.map_keys(fd, key_type):
                if key.cgid == cgid:
                    removed += int(bpfsys.map_delete(fd, key))
        return removed

    def entries_of(self, cgid: int) -> int:
        """How many map entries (policy and events) belong to cgid."""
        n = int(self.policy_of(cgid) is not None)
        for name in (*POLICY_MAPS, "events"):
            n += sum(1 for k in bpfsys.map_keys(self.fds[name], MAPS[name][0]) if k.cgid == cgid)
        return n

    def policed_cgroups(self) -> dict[int, SdCgroup]:
        out = {}
        for key in bpfsys.map_keys(self.fds["cgroups"], U64):
            val = SdCgroup()
            if bpfsys.map_lookup(self.fds["cgroups"], key, val):
                out[key.value] = val
        return out

    # -- events ------------------------------------------------------------------
    def drain_events(self, cgids: Iterable[int]) -> list[tuple[EventKey, EventVal]]:
        """Take (read and delete) every aggregated event of the given cgroups."""
        wanted = set(cgids)
        fd = self.fds["events"]
        out = []
        for key in bpfsys.map_keys(fd, EventKey):
            if key.cgid not in wanted:
                continue
            val = EventVal()
            if bpfsys.map_lookup(fd, key, val):
                bpfsys.map_delete(fd, key)
                out.append((key, val))
        return out

    def drain(self, cgid: int):
        """Events of cgid with the names and processes they refer to (session.Drained)."""
        from .session import Drained  # noqa: PLC0415
        raw = self.drain_events([cgid])
        dropped = U64()
        bpfsys.map_lookup(self.fds["drops"], U64(cgid), dropped)
        return Drained(raw, self.names_of(cgid, (k.name_id for k, _ in raw)),
                       self.procs_of(cgid, (k.pid for k, _ in raw)), dropped.value)

    def names_of(self, cgid: int, name_ids: Iterable[int]) -> dict[int, str]:
        """The queried names (qnames map) behind event name ids."""
        out = {}
        for nid in set(name_ids) - {0}:
            val = Qname()
            if bpfsys.map_lookup(self.fds["qnames"], QnameKey(cgid=cgid, name_id=nid), val):
                out[nid] = val.name[:val.len].decode(errors="replace")
        return out

    def procs_of(self, cgid: int, pids: Iterable[int]) -> dict[int, dict]:
        """What the kernel captured about processes: cmdline and ancestors (nearest first)."""
        out = {}
        for pid in set(pids):
            val = Proc()
            if bpfsys.map_lookup(self.fds["procs"], ProcKey(cgid=cgid, tgid=pid), val):
                raw = bytes(val.cmdline[:val.len]) if val.len else b""
                args = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []
                chain = [{"pid": val.chain[i].pid, "comm": val.chain[i].comm.decode(errors="replace")}
                         for i in range(min(val.chain_len, C["SD_CHAIN"]))]
                out[pid] = {"cmdline": " ".join(args) or None, "parents": chain, "exe": exe_path(val)}
        return out

    def event_counts(self) -> dict[int, dict[str, int]]:
        """Per cgroup and verdict, the attempts aggregated so far (not drained)."""
        out: dict[int, dict[str, int]] = {}
        fd = self.fds["events"]
        for key in bpfsys.map_keys(fd, EventKey):
            val = EventVal()
            if bpfsys.map_lookup(fd, key, val):
                per = out.setdefault(key.cgid, {})
                verdict = VERDICT_NAME.get(key.verdict, "?")
                per[verdict] = per.get(verdict, 0) + val.count
        return out

    def stats(self) -> dict[str, int]:
        """Per-CPU counters summed over CPUs."""
        ncpu = possible_cpus()
        names = {v: k[len("SD_STAT_"):].lower() for k, v in C.items() if k.startswith("SD_STAT_")}
        out = {}
        for idx, name in sorted(names.items()):
            buf = (ctypes.c_uint64 * ncpu)()
            bpfsys.map_lookup(self.fds["stats"], ctypes.c_uint32(idx), buf)
            out[name] = sum(buf)
        return out

    def fill(self) -> dict[str, tuple[int, int]]:
        """(entries, max_entries) of each hash/LPM map."""
        out = {}
        for name in ("cgroups", "cidrs", "resolvers", "events"):
            n = len(bpfsys.map_keys(self.fds[name], MAPS[name][0]))
            out[name] = (n, bpfsys.map_info(self.fds[name])["max_entries"])
        return out


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n
