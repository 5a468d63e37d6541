"""Userspace side of bpf/safedeploy.h: the map layouts, and policy <-> map entries.

The structs and constants come from ocihook/abi.py, generated from bpf/abi.h; a kernel
test compares them with what bcc compiled. Nothing here imports bcc.
"""
from __future__ import annotations

import ctypes
import os
TYPE_CHECKING = False  # typing is not imported on the hook's hot path

from . import abi, bpfsys

if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

    from .policy import Policy

BPF_DIR = os.environ.get("SAFEDEPLOY_BPF_SRC") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "bpf")
HEADER = os.path.join(BPF_DIR, "safedeploy.h")

C = {k: v for k, v in vars(abi).items() if k.startswith("SD_")}
IPPROTO = {"tcp": 6, "udp": 17}
PROTO_NAME = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 255: "raw", 0: "ip"}  # raw sockets: any protocol
KIND_NAME = {C["SD_KIND_CONNECT"]: "connect", C["SD_KIND_SENDMSG"]: "sendmsg", C["SD_KIND_DNS"]: "dns",
             C["SD_KIND_SOCKET"]: "socket"}
VERDICT_NAME = {C["SD_EV_ALLOWED"]: "allowed", C["SD_EV_BLOCKED"]: "blocked",
                C["SD_EV_WOULD_BLOCK"]: "would-block"}

SdCgroup, Cgstats, CidrKey, CidrVal, AddrKey = abi.Cgroup, abi.Cgstats, abi.CidrKey, abi.CidrVal, abi.Addr
NameKey, NameVal, QidKey, Learned, PendingKey = abi.NameKey, abi.NameVal, abi.QidKey, abi.Learned, abi.PendingKey
EventKey, EventVal, LiveEvent, ProcKey, Proc = abi.EventKey, abi.EventVal, abi.Live, abi.ProcKey, abi.Proc

U8 = ctypes.c_uint8
U32 = ctypes.c_uint32
U64 = ctypes.c_uint64

# shared maps: name in maps.h -> (key type, value type); the pins are named map_<name>
MAPS: dict[str, tuple[type, type]] = {
    "cgroups": (U64, SdCgroup),
    "cgstats": (U64, Cgstats),
    "stats": (U32, U64),
}
RINGBUFS = ("live",)  # pinned like the maps, read by `safedeploy watch`
# DNS over TCP (bpf/dns_stream.h), pinned like the maps: the dns_socks sockhash holds the
# policed processes' TCP connections to port 53, sd_streams their answer-parsing state; both
# keyed by socket cookie (SO_COOKIE), both emptied as the connections close
STREAM_MAPS = ("dns_socks", "sd_streams")

# per-cgroup maps: name -> (key type, value type, template, quota). The outer map cg_<name>
# maps a cgroup id to the cgroup's own inner map, created with its policy from the template
# tpl_<template> (the kernel insists on the template's type, sizes and flags). Rule maps
# (quota None) are sized to the policy, at most RULES_QUOTA entries; the others hold what
# the programs learn, each bounded per cgroup (LRU maps evict the cgroup's own oldest).
RULES_QUOTA = 65536
INNER: dict[str, tuple[type, type, str, int | None]] = {
    "cidrs": (CidrKey, CidrVal, "cidrs", None),
    "names": (NameKey, NameVal, "names", None),
    "resolvers": (AddrKey, U8, "resolvers", None),
    "learned": (AddrKey, Learned, "learned", 8192),
    "pending": (PendingKey, U8, "pending", 1024),
    "qids": (QidKey, U32, "qids", 2048),
    "qnames": (U32, NameKey, "qnames", 2048),
    "procs": (ProcKey, Proc, "procs", 1024),
    "events": (EventKey, EventVal, "events", 4096),
    "blocked": (EventKey, EventVal, "events", 4096),
}
TEMPLATES = sorted({t for _, _, t, _ in INNER.values()})


def pin_names() -> list[str]:
    """Every map pin of a program version (map_<name>)."""
    return [*MAPS, *(f"cg_{n}" for n in INNER), *(f"tpl_{t}" for t in TEMPLATES), *RINGBUFS, *STREAM_MAPS]


def addr_of(raw):
    """An IPv6Address (v4 as ::ffff:a.b.c.d) from a map's 16 address bytes."""
    import ipaddress  # noqa: PLC0415 — not needed to load a policy
    return ipaddress.IPv6Address(bytes(raw))


def compile_policy(policy: "Policy") -> dict:
    """A policy in kernel form, JSON-serialisable: what the hook caches and what state
    files keep, so the warm path needs neither the policy module nor a re-parse."""
    return {
        "name": policy.name, "mode": policy.mode, "default": policy.default,
        "has_resolvers": policy.resolvers is not None,
        "rules": [[r.text, r.reason] for r in policy.rules],
        "cidrs": [[bytes(k).hex(), bytes(v).hex()] for k, v in cidr_entries(policy)],
        "names": [[bytes(k).hex(), bytes(v).hex()] for k, v in name_entries(policy)],
        "resolvers": [a.packed.hex() for a in policy.resolvers or ()],
        "name_denies": any(r.kind == "name" and r.verdict == "deny" for r in policy.rules),
        "allow_raw": policy.raw_sockets == "allow",
    }


def name_key_bytes(name: str, wildcard: bool) -> bytes:
    """The names-trie key of a rule's name, as the kernel builds it from a query: the
    lower-case name reversed, then a 0 byte (exact) or a dot (``*.name``: names below it)."""
    raw = name.lower().rstrip(".").encode()[::-1] + (b"." if wildcard else b"\0")
    if len(raw) > C["SD_NAME_KEY"]:
        raise ValueError(f"name {name} is longer than {C['SD_NAME_MAX']} characters")
    return raw


def name_entries(policy: "Policy") -> list[tuple[NameKey, NameVal]]:
    """Name rules by (proto, port, name). proto 0 holds the DNS query verdict
    (decide_query): allow rules (any ports) and port-less deny rules."""
    merged: dict[tuple, tuple[int, int]] = {}

    def put(slot, verdict, index):
        old = merged.get(slot)
        if old is None or (verdict, -index) > (old[0], -old[1]):
            merged[slot] = (verdict, index)
    for rule in policy.rules:
        if rule.kind != "name":
            continue
        verdict = C["SD_DENY"] if rule.verdict == "deny" else C["SD_ALLOW"]
        key = name_key_bytes(rule.name, rule.wildcard)
        for proto in [rule.proto] if rule.proto else ["tcp", "udp"]:
            for port in rule.ports or (0,):
                put((IPPROTO[proto], port, key), verdict, rule.index)
        if rule.verdict == "allow" or (rule.ports is None and rule.proto is None):
            put((0, 0, key), verdict, rule.index)
    out = []
    for (proto, port, key), (verdict, index) in merged.items():
        k = NameKey(prefixlen=C["SD_NAME_FIXED_BITS"] + 8 * len(key), proto=proto, port=port)
        ctypes.memmove(k.name, key, len(key))
        out.append((k, NameVal(rule=index, verdict=verdict, nlen=len(key))))
    return out


def name_of_key(key) -> str:
    """The dotted name a names-trie key (or qnames value) holds."""
    n = max(0, min((key.prefixlen - C["SD_NAME_FIXED_BITS"]) // 8, C["SD_NAME_KEY"]))
    raw = bytes(key.name[:n])
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return raw[::-1].decode(errors="replace")


def cgroup_entry(compiled: dict) -> SdCgroup:
    return SdCgroup(mode=C["SD_MODE_AUDIT"] if compiled["mode"] == "audit" else C["SD_MODE_ENFORCE"],
                    dflt=C["SD_DENY"] if compiled["default"] == "deny" else C["SD_ALLOW"],
                    has_resolvers=1 if compiled["has_resolvers"] else 0,
                    name_denies=1 if compiled.get("name_denies") else 0,
                    allow_raw=1 if compiled.get("allow_raw") else 0)


def cidr_entries(policy: "Policy") -> list[tuple[CidrKey, CidrVal]]:
    """LPM entries for the CIDR rules. Rules that land on the same key are merged as
    decide() breaks ties: deny beats allow, then the lowest index."""
    merged: dict[tuple, tuple[int, int]] = {}
    for rule in policy.rules:
        if rule.kind != "cidr":
            continue
        verdict = C["SD_DENY"] if rule.verdict == "deny" else C["SD_ALLOW"]
        protos = [rule.proto] if rule.proto else ["tcp", "udp"]
        for proto in protos:
            for port in rule.ports or (0,):
                slot = (IPPROTO[proto], port, rule.network.network_address.packed, rule.network.prefixlen)
                old = merged.get(slot)
                if old is None or (verdict, -rule.index) > (old[0], -old[1]):
                    merged[slot] = (verdict, rule.index)
    out = []
    for (proto, port, addr, plen), (verdict, index) in merged.items():
        key = CidrKey(prefixlen=C["SD_CIDR_FIXED_BITS"] + plen, proto=proto, port=port)
        ctypes.memmove(key.addr, addr, 16)
        out.append((key, CidrVal(rule=index, verdict=verdict, plen=plen)))
    return out


def _compiled_entries(compiled: dict):
    """(inner map name, key, value) of every rule entry of a compiled policy."""
    for k, v in compiled["cidrs"]:
        yield "cidrs", CidrKey.from_buffer_copy(bytes.fromhex(k)), CidrVal.from_buffer_copy(bytes.fromhex(v))
    for k, v in compiled.get("names", ()):
        yield "names", NameKey.from_buffer_copy(bytes.fromhex(k)), NameVal.from_buffer_copy(bytes.fromhex(v))
    for a in compiled["resolvers"]:
        key = AddrKey()
        ctypes.memmove(key.addr, bytes.fromhex(a), 16)
        yield "resolvers", key, U8(1)


def rule_counts(compiled: dict) -> dict[str, int]:
    """Entries each rule map of a compiled policy needs."""
    return {"cidrs": len(compiled["cidrs"]), "names": len(compiled.get("names", ())),
            "resolvers": len(compiled["resolvers"])}


def _parallel(calls: list[tuple]) -> list:
    """Run bpf(2) calls on threads. Each update or delete of a map-in-map waits for an RCU
    grace period (~15 ms here): in parallel they share one. Raises the first error."""
    import threading  # noqa: PLC0415 — only where maps are created or released
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def one(i: int, fn, *args) -> None:
        try:
            results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 — re-raised below, in the caller's thread
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i, *call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


class PolicyTooBig(bpfsys.BpfError):
    """A policy needs more entries than a cgroup's share of a rule map."""


class PinnedMaps:
    """Open fds of the pinned maps of one program version."""

    def __init__(self, fds: dict[str, int]):
        self.fds = fds

    @classmethod
    def open(cls, pin_dir) -> "PinnedMaps":
        fds = {}
        try:
            for name in (*MAPS, *(f"cg_{n}" for n in INNER), *(f"tpl_{t}" for t in TEMPLATES)):
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

    def _create_inner(self, name: str, entries: int) -> int:
        info = bpfsys.map_info(self.fds[f"tpl_{INNER[name][2]}"])
        return bpfsys.map_create(info["type"], info["key_size"], info["value_size"], max(1, entries),
                                 info["flags"], f"sd_{name}")

    def load_policy(self, cgid: int, compiled: dict) -> None:
        """Give cgid its own maps (rules sized to the policy, the rest to their quotas),
        write the rules, then the cgroup header that makes the programs use them. Fails
        (and leaves nothing behind) when the cgroup already has a policy or the policy
        exceeds a cgroup's share."""
        if self.policy_of(cgid) is not None:
            raise bpfsys.BpfError(17, f"cgroup {cgid} already has a safedeploy policy")
        counts = rule_counts(compiled)
        for name, n in counts.items():
            if n > RULES_QUOTA:
                raise PolicyTooBig(7, f"policy needs {n} {name} entries, more than a cgroup's share "
                                      f"({RULES_QUOTA}): use fewer ports per rule or wider CIDRs")
        fds: dict[str, int] = {}
        try:
            for name, (_, _, _, quota) in INNER.items():
                fds[name] = self._create_inner(name, counts[name] if quota is None else quota)
            for name, key, val in _compiled_entries(compiled):
                bpfsys.map_update(fds[name], key, val)
            bpfsys.map_update(self.fds["cgstats"], U64(cgid), Cgstats())
            _parallel([(bpfsys.map_update, self.fds[f"cg_{name}"], U64(cgid), ctypes.c_uint32(fd), bpfsys.BPF_NOEXIST)
                       for name, fd in fds.items()])
            try:
                bpfsys.map_update(self.fds["cgroups"], U64(cgid), cgroup_entry(compiled), bpfsys.BPF_NOEXIST)
            except bpfsys.BpfError as e:
                if e.errno == 7:
                    raise bpfsys.BpfError(e.errno, "policy map cgroups is full: too many policed cgroups") from None
                raise
        except Exception:
            self.unload_policy(cgid)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)

    def unload_policy(self, cgid: int, compiled: dict | None = None) -> int:
        """Remove the header first (programs stop using the cgroup's maps), then the
        cgroup's counters and maps: a few deletes, whatever other cgroups hold. Returns
        the entries removed from the shared maps."""
        removed = int(bpfsys.map_delete(self.fds["cgroups"], U64(cgid)))
        removed += int(bpfsys.map_delete(self.fds["cgstats"], U64(cgid)))
        return removed + sum(_parallel([(bpfsys.map_delete, self.fds[f"cg_{name}"], U64(cgid)) for name in INNER]))

    def inner(self, cgid: int, name: str) -> int | None:
        """An fd of cgid's own map `name` (caller closes), or None."""
        map_id = ctypes.c_uint32()
        if not bpfsys.map_lookup(self.fds[f"cg_{name}"], U64(cgid), map_id):
            return None
        try:
            return bpfsys.map_fd_by_id(map_id.value)
        except bpfsys.BpfError:
            return None  # released meanwhile

    def _items(self, cgid: int, name: str, limit: int | None = None) -> list:
        fd = self.inner(cgid, name)
        if fd is None:
            return []
        key_t, val_t = INNER[name][:2]
        out = []
        try:
            for key in bpfsys.map_keys(fd, key_t)[:limit]:
                val = val_t()
                if bpfsys.map_lookup(fd, key, val):
                    out.append((key, val))
        finally:
            os.close(fd)
        return out

    def entries_of(self, cgid: int) -> int:
        """How many entries (policy header, counters, maps and what they hold) belong to cgid."""
        n = int(self.policy_of(cgid) is not None)
        n += int(bpfsys.map_lookup(self.fds["cgstats"], U64(cgid), Cgstats()))
        for name in INNER:
            fd = self.inner(cgid, name)
            if fd is not None:
                n += 1 + len(bpfsys.map_keys(fd, INNER[name][0]))
                os.close(fd)
        return n

    def policed_cgroups(self) -> dict[int, SdCgroup]:
        out = {}
        for key in bpfsys.map_keys(self.fds["cgroups"], U64):
            val = SdCgroup()
            if bpfsys.map_lookup(self.fds["cgroups"], key, val):
                out[key.value] = val
        return out

    def counters(self, cgid: int) -> dict[str, int]:
        """The exact per-cgroup counters (cgstats), {} when cgid has none."""
        val = Cgstats()
        if not bpfsys.map_lookup(self.fds["cgstats"], U64(cgid), val):
            return {}
        return {name: getattr(val, name) for name, _ in Cgstats._fields_}

    # -- events ------------------------------------------------------------------
    def drain_events(self, cgid: int) -> list[tuple[EventKey, EventVal]]:
        """Take (read and delete) every aggregated event of a cgroup, blocked ones first."""
        out = []
        for name in ("blocked", "events"):
            fd = self.inner(cgid, name)
            if fd is None:
                continue
            try:
                for key in bpfsys.map_keys(fd, EventKey):
                    val = EventVal()
                    if bpfsys.map_lookup(fd, key, val):
                        bpfsys.map_delete(fd, key)
                        out.append((key, val))
            finally:
                os.close(fd)
        return out

    def drain(self, cgid: int):
        """Events of cgid with the names and processes they refer to (session.Drained)."""
        from .session import Drained  # noqa: PLC0415
        counters = self.counters(cgid)
        raw = self.drain_events(cgid)
        return Drained(raw, self.names_of(cgid, (k.name_id for k, _ in raw)),
                       self.procs_of(cgid, ((k.pid, k.pstart) for k, _ in raw)),
                       counters.get("events_dropped", 0) + counters.get("blocked_dropped", 0), counters)

    def names_of(self, cgid: int, name_ids: Iterable[int]) -> dict[int, str]:
        """The queried names (the cgroup's qnames map) behind event name ids."""
        out = {}
        wanted = set(name_ids) - {0}
        fd = self.inner(cgid, "qnames") if wanted else None
        if fd is None:
            return out
        try:
            for nid in wanted:
                val = NameKey()
                if bpfsys.map_lookup(fd, U32(nid), val):
                    out[nid] = name_of_key(val)
        finally:
            os.close(fd)
        return out

    def procs_of(self, cgid: int, pids: Iterable[tuple[int, int]]) -> dict[tuple[int, int], dict]:
        """What the kernel captured about processes, by (pid, start time): argv (exact bytes),
        cmdline and ancestors (nearest first)."""
        out = {}
        wanted = {p for p in pids if p[0]}
        fd = self.inner(cgid, "procs") if wanted else None
        if fd is None:
            return out
        try:
            for pid, pstart in wanted:
                val = Proc()
                if bpfsys.map_lookup(fd, ProcKey(tgid=pid, pstart=pstart), val):
                    raw = bytes(val.cmdline[:val.len]) if val.len else b""
                    argv = raw.rstrip(b"\0").split(b"\0") if raw else []
                    chain = [{"pid": val.chain[i].pid, "comm": val.chain[i].comm.decode(errors="replace")}
                             for i in range(min(val.chain_len, C["SD_CHAIN"]))]
                    out[(pid, pstart)] = {"argv": argv,
                                          "cmdline": " ".join(a.decode(errors="replace") for a in argv) or None,
                                          "parents": chain}
        finally:
            os.close(fd)
        return out

    def event_counts(self) -> dict[int, dict[str, int]]:
        """Per policed cgroup and verdict, the exact decision counts so far."""
        out = {}
        for cgid in self.policed_cgroups():
            c = self.counters(cgid)
            out[cgid] = {"allowed": c.get("allowed", 0), "blocked": c.get("blocked", 0),
                         "would-block": c.get("would_block", 0)}
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
        """(entries, max_entries) of the shared maps."""
        out = {}
        for name in ("cgroups", "cgstats"):
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
