"""The pinned maps of one program version: policy headers and counters shared by every
policed cgroup, and each cgroup's own maps (map-in-map): a set of them per policed cgroup,
drained with it, then emptied and kept as a spare for the next policy (bpf/maps.h).
"""

import errno
import os

from . import abi, bpfsys, cdata, cgroup
from .abi import Cgstats, EventKey, EventVal, NameKey, Proc, ProcKey
from .compiler import cgroup_entry, compiled_entries, rule_counts

TYPE_CHECKING = False  # typing is not imported on the hook's hot path
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable

C = {k: v for k, v in vars(abi).items() if k.startswith("SD_")}
SdCgroup, CidrKey, CidrVal, AddrKey = abi.Cgroup, abi.CidrKey, abi.CidrVal, abi.Addr
NameVal, QidKey, Learned, PendingKey = abi.NameVal, abi.QidKey, abi.Learned, abi.PendingKey
LiveEvent = abi.Live

U8 = cdata.c_uint8
U32 = cdata.c_uint32
U64 = cdata.c_uint64

# shared maps: name in maps.h -> (key type, value type); the pins are named map_<name>
MAPS: dict[str, tuple[type, type]] = {
    "cgroups": (U64, SdCgroup),
    "cgstats": (U64, Cgstats),
    "stats": (U32, U64),
    "spares": (U64, U8),
    "slots": (U32, U8),
}
RINGBUFS = ("live",)  # pinned like the maps, read by `safedeploy watch`
# DNS over TCP (bpf/dns_stream.h), pinned like the maps: the dns_socks sockhash holds the
# policed processes' TCP connections to port 53, keyed by socket cookie (SO_COOKIE), emptied
# as the connections close
STREAM_MAPS = ("dns_socks",)
PROG_ARRAYS = ("sd_tails", "sd_egress_tails")  # pinned so the kernel keeps their entries (tail-called programs)

# per-cgroup maps: name -> (key type, value type, template, quota). The outer map cg_<name>
# maps a table key (the header's `tables`) to the cgroup's own inner map, made from the
# template tpl_<template> (the kernel insists on the template's type, key and value sizes
# and flags). Rule maps (quota None) take at most RULES_QUOTA entries (they allocate as they
# fill: BPF_F_NO_PREALLOC); the others hold what the programs learn, each bounded per cgroup
# (LRU maps evict the cgroup's own oldest).
RULES_QUOTA = 65536
INNER: dict[str, tuple[type, type, str, int | None]] = {
    "cidrs": (CidrKey, CidrVal, "cidrs", None),
    "names": (NameKey, NameVal, "names", None),
    "resolvers": (AddrKey, U8, "resolvers", None),
    "learned": (AddrKey, Learned, "learned", 8192),
    "pending": (PendingKey, abi.PendingVal, "pending", 1024),
    "qids": (QidKey, U32, "qids", 2048),
    "qnames": (U32, NameKey, "qnames", 2048),
    "procs": (ProcKey, Proc, "procs", 1024),
    "events": (EventKey, EventVal, "events", 4096),
    "blocked": (EventKey, EventVal, "events", 4096),
    # a queue (no keys): refused UDP queries for the refuser to answer (ocihook/refuser.py)
    "refusals": (None, abi.Refusal, "refusals", C["SD_REFUSALS"]),
}
TEMPLATES = sorted({t for _, _, t, _ in INNER.values()})
# Emptied table sets kept for the next policies. Taking one costs a policy a few lookups;
# making one costs an RCU grace period per outer map (~10-20 ms, done in parallel), which a
# release pays in the background instead of a container's start. Each set holds ~2.5 MB of
# preallocated LRU maps.
SPARES_MAX = 4


def pin_names() -> list[str]:
    """Every map pin of a program version (map_<name>)."""
    return [*MAPS, *(f"cg_{n}" for n in INNER), *(f"tpl_{t}" for t in TEMPLATES), *RINGBUFS, *PROG_ARRAYS,
            *STREAM_MAPS]


def name_of_key(key) -> str:
    """The dotted name a names-trie key (or qnames value) holds."""
    n = max(0, min((key.prefixlen - C["SD_NAME_FIXED_BITS"]) // 8, C["SD_NAME_KEY"]))
    raw = bytes(key.name[:n])
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return raw[::-1].decode(errors="replace")


def exe_path(proc: Proc) -> str | None:
    """The executable's path from a capture (the kernel writes its components last first)."""
    n = min(proc.exe_len, C["SD_EXE"])
    if not n:
        return None
    parts = [p.decode(errors="replace") for p in bytes(proc.exe[:n]).split(b"\0") if p]
    path = "/" + "/".join(reversed(parts))
    return path if proc.exe_flags & C["SD_EXE_COMPLETE"] else ".../" + path.lstrip("/")


class Drained:
    """What a released cgroup left: aggregated events, the DNS names and the processes
    (command line, ancestors) they refer to, and the exact per-cgroup counters."""

    def __init__(self, events: list[tuple[EventKey, EventVal]] | None = None, names: dict | None = None,
                 procs: dict | None = None, dropped: int = 0, counters: dict | None = None):
        self.events, self.names, self.procs = events or [], names or {}, procs or {}
        self.dropped = dropped  # decisions whose details the cgroup's quota could not hold
        self.counters = counters or {}  # exact per-cgroup counts (abi.Cgstats)


def _parallel(calls: list[tuple]) -> list:
    """Run bpf(2) calls on threads. Each update or delete of a map-in-map waits for an RCU
    grace period (~15 ms here): in parallel they share one. Raises the first error."""
    if os.environ.get("SAFEDEPLOY_SERIAL_BPF"):  # one thread: what fault injection by call number needs
        return [fn(*args) for fn, *args in calls]
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


class _OpenOnUse(dict):
    """Map name -> fd, each pinned map opened on its first use: a start touches a few of
    them, and every bpf(2) obj_get it skips is time the runtime waits for."""

    NAMES = frozenset(pin_names())

    def __init__(self, pin_dir: str):
        super().__init__()
        self.pin_dir = pin_dir

    def __missing__(self, name: str) -> int:
        if name not in self.NAMES:
            raise KeyError(name)
        fd = self[name] = bpfsys.obj_get(os.path.join(self.pin_dir, f"map_{name}"))
        return fd


class PinnedMaps:
    """Open fds of the pinned maps of one program version."""

    def __init__(self, fds: dict[str, int], path=None):
        self.fds = fds
        self.path = path

    @classmethod
    def open(cls, pin_dir) -> "PinnedMaps":
        """The maps of the version pinned at pin_dir (each opened when first used; the
        header map at once, so a directory without pins fails here)."""
        maps = cls(_OpenOnUse(os.fspath(pin_dir)), os.fspath(pin_dir))
        maps.fds["cgroups"]
        return maps

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

    # -- table sets (the per-cgroup maps) ---------------------------------------
    def _claim_slot(self) -> int:
        """A free slot of the outer arrays, claimed: inserting it into `slots` is the claim
        (one taker wins). Slots are tried at random; 64 tries find one unless nearly all of
        the SD_MAX_TABLES are taken (as many as policed cgroups can be)."""
        for _ in range(64):
            slot = 1 + int.from_bytes(os.urandom(4), "little") % (C["SD_MAX_TABLES"] - 1)
            try:
                bpfsys.map_update(self.fds["slots"], U32(slot), U8(1), bpfsys.BPF_NOEXIST)
                return slot
            except bpfsys.BpfError as e:
                if e.errno != errno.EEXIST:
                    raise
        raise bpfsys.BpfError(errno.E2BIG, "no free table slot: too many policed cgroups")

    def _make_tables(self) -> int:
        """A new, empty set of per-cgroup maps in a newly claimed slot of the outer arrays.
        Waits for an RCU grace period per outer map, in parallel."""
        key = self._claim_slot()
        fds: dict[str, int] = {}
        try:
            for name, (_, _, _, quota) in INNER.items():
                fds[name] = self._create_inner(name, RULES_QUOTA if quota is None else quota)
            _parallel([(bpfsys.map_update, self.fds[f"cg_{name}"], U32(key), U32(fd), bpfsys.BPF_ANY)
                       for name, fd in fds.items()])
        except Exception:
            self._drop_tables(key)
            raise
        finally:
            for fd in fds.values():
                os.close(fd)
        return key

    def _drop_tables(self, key: int) -> int:
        """Remove a table set from the outer maps, then free its slot. When this returns, no
        program still uses it (each delete waits for an RCU grace period). Returns the
        entries removed."""
        removed = sum(_parallel([(bpfsys.map_delete, self.fds[f"cg_{name}"], U32(key)) for name in INNER]))
        bpfsys.map_delete(self.fds["slots"], U32(key))
        return removed

    def spares(self) -> list[int]:
        """The table keys of the emptied sets ready for the next policies."""
        return [k.value for k in bpfsys.map_keys(self.fds["spares"], U64)]

    def stray_tables(self) -> set[int]:
        """Keys of table sets that neither a policy header names nor the spares hold: a
        start killed between taking or making a set and writing its header, or a release
        killed while making a spare (or either of them still at work)."""
        keys = {k.value for k in bpfsys.map_keys(self.fds["slots"], U32)}
        return keys - {h.tables for h in self.policed_cgroups().values()} - set(self.spares())

    def _spares_lock(self):
        """Held while spares are made or stray sets removed (the pin directory's flock).
        Taking a spare needs no lock: the delete from `spares` is the claim."""
        return cgroup.locked(self.path)

    def reap_strays(self) -> int:
        """Remove the stray table sets. Only with no start at work on these pins (gc holds
        the lock starts take); makers of spares are waited for. Returns the sets removed."""
        with self._spares_lock():
            strays = self.stray_tables()
            for key in strays:
                self._drop_tables(key)
        return len(strays)

    def drop_spares(self) -> int:
        """Remove every spare table set (their memory goes back to the kernel)."""
        n = 0
        with self._spares_lock():
            while (key := self._take_spare()) is not None:
                self._drop_tables(key)
                n += 1
        return n

    def _take_spare(self) -> int | None:
        """Claim a spare table set (the delete is the claim: one taker wins), or None."""
        for key in self.spares():
            if bpfsys.map_delete(self.fds["spares"], U64(key)):
                return key
        return None

    def _keep_spare(self, key: int) -> None:
        bpfsys.map_update(self.fds["spares"], U64(key), U8(1), bpfsys.BPF_NOEXIST)

    def prime_spares(self) -> int:
        """Make spare table sets until SPARES_MAX are ready (a fresh program version does it,
        so that the first containers take the fast path too). Returns how many were made."""
        made = 0
        with self._spares_lock():
            while len(self.spares()) < SPARES_MAX:
                self._new_spare()
                made += 1
        return made

    def _new_spare(self) -> None:
        key = self._make_tables()
        try:
            self._keep_spare(key)
        except bpfsys.BpfError:
            self._drop_tables(key)
            raise

    def _table_fds(self, key: int) -> dict[str, int]:
        """Fds of the maps of table set `key` (caller closes); BpfError when one is missing."""
        fds: dict[str, int] = {}
        try:
            for name in INNER:
                fd = self._inner_of_key(key, name)
                if fd is None:
                    raise bpfsys.BpfError(errno.ENOENT, f"table set {key:#x} has no {name} map")
                fds[name] = fd
        except Exception:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    # -- per-cgroup policy -------------------------------------------------------
    def load_policy(self, cgid: int, compiled: dict) -> None:
        """Give cgid a set of maps of its own (a spare one when there is one, else a new
        one), write the rules, then the cgroup header that makes the programs use them.
        Fails (and leaves nothing behind) when the cgroup already has a policy or the
        policy exceeds a cgroup's share."""
        if self.policy_of(cgid) is not None:
            raise bpfsys.BpfError(errno.EEXIST, f"cgroup {cgid} already has a safedeploy policy")
        counts = rule_counts(compiled)
        for name, n in counts.items():
            if n > RULES_QUOTA:
                raise PolicyTooBig(errno.E2BIG, f"policy needs {n} {name} entries, more than a cgroup's share "
                                      f"({RULES_QUOTA}): use fewer ports per rule or wider CIDRs")
        key = self._take_spare()
        if key is None:
            key = self._make_tables()
        fds: dict[str, int] = {}
        try:
            fds = self._table_fds(key)
            for name, k, val in compiled_entries(compiled):
                bpfsys.map_update(fds[name], k, val)
            bpfsys.map_update(self.fds["cgstats"], U64(cgid), Cgstats())
            header = cgroup_entry(compiled)
            header.tables = key
            try:
                bpfsys.map_update(self.fds["cgroups"], U64(cgid), header, bpfsys.BPF_NOEXIST)
            except bpfsys.BpfError as e:
                if e.errno == errno.E2BIG:
                    raise bpfsys.BpfError(e.errno, "policy map cgroups is full: too many policed cgroups") from None
                raise
        except Exception:
            bpfsys.map_delete(self.fds["cgstats"], U64(cgid))
            self._drop_tables(key)  # it holds some of the rules: not a spare any more
            raise
        finally:
            for fd in fds.values():
                os.close(fd)

    def unload_policy(self, cgid: int, compiled: dict | None = None) -> int:
        """Remove the header first (programs stop using the cgroup's maps), then its
        counters and its table set; then, while fewer than SPARES_MAX are kept, make an
        empty set (under a new key) as a spare for the next policy. Returns the entries
        removed from the shared maps."""
        header = self.policy_of(cgid)
        removed = int(bpfsys.map_delete(self.fds["cgroups"], U64(cgid)))
        removed += int(bpfsys.map_delete(self.fds["cgstats"], U64(cgid)))
        if header is None:
            return removed
        # the deletes wait for a grace period: once they return, no program that saw the
        # header can still write into the old maps, or find the new ones through it
        removed += self._drop_tables(header.tables)
        if self.path is not None:
            with self._spares_lock():
                if len(self.spares()) < SPARES_MAX:
                    try:
                        self._new_spare()
                    except bpfsys.BpfError:
                        pass  # no memory for a spare: the next policy makes its own set
        return removed

    def _inner_of_key(self, key: int, name: str) -> int | None:
        map_id = U32()
        if not bpfsys.map_lookup(self.fds[f"cg_{name}"], U32(key), map_id):
            return None
        try:
            return bpfsys.map_fd_by_id(map_id.value)
        except bpfsys.BpfError:
            return None  # released meanwhile

    def inner(self, cgid: int, name: str) -> int | None:
        """An fd of cgid's own map `name` (caller closes), or None (no policy)."""
        header = self.policy_of(cgid)
        return None if header is None else self._inner_of_key(header.tables, name)

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
        for name, (key_t, val_t, _, _) in INNER.items():
            fd = self.inner(cgid, name)
            if fd is not None:
                n += 1 + (len(bpfsys.map_keys(fd, key_t)) if key_t else int(bpfsys.map_peek(fd, val_t())))
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
    def drain_events(self, cgid: int, delete: bool = True) -> list[tuple[EventKey, EventVal]]:
        """Take (read, and delete unless told not to) every aggregated event of a cgroup,
        blocked ones first."""
        out = []
        for name in ("blocked", "events"):
            fd = self.inner(cgid, name)
            if fd is None:
                continue
            try:
                for key in bpfsys.map_keys(fd, EventKey):
                    val = EventVal()
                    if bpfsys.map_lookup(fd, key, val):
                        if delete:
                            bpfsys.map_delete(fd, key)
                        out.append((key, val))
            finally:
                os.close(fd)
        return out

    def drain(self, cgid: int, delete: bool = True) -> Drained:
        """Events of cgid with the names and processes they refer to."""
        counters = self.counters(cgid)
        raw = self.drain_events(cgid, delete)
        return Drained(raw, self.names_of(cgid, {i for k, _ in raw for i in (k.name_id, k.target_id)}),
                       self.procs_of(cgid, ((k.pid, k.pstart) for k, _ in raw)),
                       counters.get("events_dropped", 0) + counters.get("blocked_dropped", 0), counters)

    def names_of(self, cgid: int, name_ids: "Iterable[int]") -> dict[int, str]:
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

    def procs_of(self, cgid: int, pids: "Iterable[tuple[int, int]]") -> dict[tuple[int, int], dict]:
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
                    out[(pid, pstart)] = {"raw": raw, "argv": argv, "exe": exe_path(val),
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
            buf = (U64 * ncpu)()
            bpfsys.map_lookup(self.fds["stats"], U32(idx), buf)
            out[name] = sum(buf)
        return out

    def fill(self) -> dict[str, tuple[int, int]]:
        """(entries, max_entries) of the shared maps (slots: the table sets in use)."""
        out = {}
        for name in ("cgroups", "cgstats", "slots"):
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
