"""``safedeploy watch``: blocked and would-block decisions as they happen, from the pinned
ring buffer the programs write (libbcc's ring buffer reader; no compile)."""
from __future__ import annotations

import ctypes
import json
import os
import time

from . import bpfsys, events, loader, report, settings
from .errors import SafedeployError
from .hook import state_records
from .abi import Live as LiveEvent
from .addr import addr_of, display_ip
from .events import C, KIND_NAME, PROTO_NAME, VERDICT_NAME
from .pinned import PinnedMaps
from .visible import cut, visible


class WatchError(SafedeployError):
    """watch cannot start; str() is one line."""


def containers() -> dict[int, str]:
    """cgroup id -> container (or run) id, from the state records."""
    return {cgid: rec["id"] for cgid, rec in state_records().items()}


def cgid_of(target: str) -> int:
    """A container or run id (or a prefix: state records) or a numeric cgroup id."""
    for cgid, cid in containers().items():
        if cid == target or cid.startswith(target):
            return cgid
    if target.isdigit():
        return int(target)
    raise WatchError(f"no policed container {visible(target)!r} (see `safedeploy status`)")


def owner_text(state: dict | None, cgid: int) -> str:
    """Who a cgroup belongs to, for people: `run ID`, `container ID` (12 characters) or,
    without a state record, `cgroup CGID`."""
    if not state:
        return f"cgroup {cgid}"
    if state.get("kind") == "run":
        return f"run {visible(state['id'])}"
    return f"container {visible(state['id'][:12])}"


def line_of(rec: dict, owner: str, width: int | None = None) -> str:
    """One event as one line (the time of day, UTC): the command line last, the whole line
    cut to width (None: whole)."""
    why = f" ({visible(rec['reason'])})" if rec.get("reason") else ""
    cmd = report.command_text(rec)
    line = (f"{rec['time'][11:23]} {rec['verdict'].upper():<11} {rec['kind']:<7} {report.dest_text(rec)}  [{owner}]  "
            f"rule {visible(rec['rule'])}{why}  pid {rec['pid']} {visible(rec['comm'])}" + (f"  {cmd}" if cmd else ""))
    return line if width is None else cut(line, width)


def terminal_width() -> int | None:
    """The width to cut lines at: $COLUMNS, else the terminal's; None when stdout is not
    a terminal (a pipe or file gets whole lines)."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    try:
        return os.get_terminal_size(1).columns
    except OSError:
        return None


class Owners:
    """cgroup id -> state record, re-read when the state directory changes; a record
    that went away stays known (its last events may still be in the ring buffer)."""

    def __init__(self):
        self.records: dict[int, dict] = {}
        self.mtime: int | None = None
        self.refresh()

    def refresh(self) -> None:
        try:
            mtime = os.stat(settings.state_dir()).st_mtime_ns
        except OSError:
            return
        if mtime != self.mtime:
            self.mtime = mtime
            self.records.update(state_records())

    def get(self, cgid: int) -> dict | None:
        if cgid not in self.records:
            self.refresh()
        return self.records.get(cgid)


def watch(target: str | None = None, duration: float | None = None, as_json: bool = False, out=print,
          wide: bool = False, ready=None) -> int:
    """Print events until interrupted (or for `duration` seconds). Returns events shown.
    ready() is called once the ring buffer is open: every event from then on is shown."""
    pins = loader.pin_dir()
    if not loader.is_pinned(pins):
        raise WatchError(f"no programs pinned at {pins}: nothing is policed yet")
    try:
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib  # noqa: PLC0415 — the reader, not the compiler
    except ImportError as e:
        raise WatchError(f"bcc is not importable ({e}); install python3-bpfcc") from None
    only = cgid_of(target) if target else None
    owners = Owners()
    width = None if wide or as_json else terminal_width()
    shown = 0
    since = time.clock_gettime_ns(time.CLOCK_BOOTTIME)  # the buffer may hold old, unread events

    with PinnedMaps.open(pins) as maps:
        def on_event(_ctx, data, _size):
            nonlocal shown
            ev = LiveEvent.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(LiveEvent)))
            k = ev.k
            if ev.ts_ns < since or (only is not None and ev.cgid != only):
                return 0
            st = owners.get(ev.cgid)
            rule, reason = events.rule_of((st or {}).get("compiled", {"rules": []}), k.rule)
            if rule == "dns.resolvers" and k.verdict != C["SD_EV_ALLOWED"]:
                reason = "dns.resolvers: not a listed resolver"  # as the report says
            domain = maps.names_of(ev.cgid, [k.name_id]).get(k.name_id) if k.name_id else None
            proc = maps.procs_of(ev.cgid, [(k.pid, k.pstart)]).get((k.pid, k.pstart), {})
            cmd = events.argv_fields(proc["raw"], captured=True) if proc.get("raw") else events.argv_fields(
                events.proc_cmdline_raw(k.pid, k.pstart))
            rec = {"time": events.boot_ns_to_rfc3339(ev.ts_ns),
                   "container": st["id"] if st else f"cgroup:{ev.cgid}",
                   "verdict": VERDICT_NAME.get(k.verdict, str(k.verdict)), "kind": KIND_NAME.get(k.kind, str(k.kind)),
                   "proto": PROTO_NAME.get(k.proto, str(k.proto)), "dst_ip": display_ip(addr_of(k.addr)),
                   "dst_port": k.port, "domain": domain, "pid": k.pid, "comm": ev.comm.decode(errors="replace"),
                   **cmd, "rule": rule, "reason": reason}
            shown += 1
            out(json.dumps(rec) if as_json else line_of(rec, owner_text(st, ev.cgid), width))
            return 0

        fd = bpfsys.obj_get(os.path.join(pins, "map_live"))
        cb = _RINGBUF_CB_TYPE(on_event)
        rb = lib.bpf_new_ringbuf(fd, cb, None)
        if not rb:
            os.close(fd)
            raise WatchError("cannot open the live ring buffer")
        if ready is not None:
            ready()
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while deadline is None or time.monotonic() < deadline:
                lib.bpf_poll_ringbuf(rb, 200)
                owners.refresh()  # a short run's record, before it is gone
        except KeyboardInterrupt:
            pass
        finally:
            lib.bpf_free_ringbuf(rb)
            os.close(fd)
    return shown
