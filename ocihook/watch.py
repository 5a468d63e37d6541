"""``safedeploy watch``: blocked and would-block decisions as they happen, from the pinned
ring buffer the programs write (libbcc's ring buffer reader; no compile)."""
from __future__ import annotations

import ctypes
import json
import os
import time

from . import bpfsys, events, loader
from .hook import state_records
from .addr import display_ip
from .abi import Live as LiveEvent
from .addr import addr_of
from .events import KIND_NAME, PROTO_NAME, VERDICT_NAME
from .pinned import PinnedMaps


class WatchError(Exception):
    """watch cannot start; str() is one line."""


def containers() -> dict[int, str]:
    """cgroup id -> container id, from the hook's state files."""
    return {cgid: rec["id"] for cgid, rec in state_records().items()}


def cgid_of(target: str) -> int:
    """A container id (state file) or a numeric cgroup id."""
    for cgid, cid in containers().items():
        if cid == target or cid.startswith(target):
            return cgid
    if target.isdigit():
        return int(target)
    raise WatchError(f"no policed container {target!r} (see `safedeploy status`)")


def watch(target: str | None = None, duration: float | None = None, as_json: bool = False, out=print) -> int:
    """Print events until interrupted (or for `duration` seconds). Returns events shown."""
    pins = loader.pin_dir()
    if not loader.is_pinned(pins):
        raise WatchError(f"no programs pinned at {pins}: nothing is policed yet")
    try:
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib  # noqa: PLC0415 — the reader, not the compiler
    except ImportError as e:
        raise WatchError(f"bcc is not importable ({e}); install python3-bpfcc") from None
    only = cgid_of(target) if target else None
    states = state_records()
    shown = 0
    since = time.clock_gettime_ns(time.CLOCK_BOOTTIME)  # the buffer may hold old, unread events

    with PinnedMaps.open(pins) as maps:
        def on_event(_ctx, data, _size):
            nonlocal shown
            ev = LiveEvent.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(LiveEvent)))
            k = ev.k
            if ev.ts_ns < since or (only is not None and ev.cgid != only):
                return 0
            if ev.cgid not in states:
                states.update(state_records())
            st = states.get(ev.cgid, {})
            rule, reason = events.rule_of(st.get("compiled", {"rules": []}), k.rule)
            domain = maps.names_of(ev.cgid, [k.name_id]).get(k.name_id) if k.name_id else None
            proc = maps.procs_of(ev.cgid, [(k.pid, k.pstart)]).get((k.pid, k.pstart), {})
            rec = {"time": events.boot_ns_to_rfc3339(ev.ts_ns), "container": st.get("id", f"cgroup:{ev.cgid}"),
                   "verdict": VERDICT_NAME.get(k.verdict), "kind": KIND_NAME.get(k.kind),
                   "proto": PROTO_NAME.get(k.proto, str(k.proto)), "dst_ip": display_ip(addr_of(k.addr)),
                   "dst_port": k.port, "domain": domain, "pid": k.pid, "comm": ev.comm.decode(errors="replace"),
                   "cmdline": proc.get("cmdline") or events.proc_cmdline(k.pid), "rule": rule, "reason": reason}
            shown += 1
            if as_json:
                out(json.dumps(rec))
            else:
                host = f"[{rec['dst_ip']}]" if ":" in rec["dst_ip"] else rec["dst_ip"]
                dest = f"{host}:{rec['dst_port']}/{rec['proto']}"
                dest = f"{domain} ({dest})" if domain else dest
                why = f" ({reason})" if reason else ""
                out(f"{rec['time']} {rec['verdict'].upper():<11} {rec['kind']:<7} {dest}  pid {k.pid} "
                    f"{rec['comm']}  {rec['cmdline'] or ''}  rule {rule}{why}  [{rec['container']}]")
            return 0

        fd = bpfsys.obj_get(os.path.join(pins, "map_live"))
        cb = _RINGBUF_CB_TYPE(on_event)
        rb = lib.bpf_new_ringbuf(fd, cb, None)
        if not rb:
            os.close(fd)
            raise WatchError("cannot open the live ring buffer")
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while deadline is None or time.monotonic() < deadline:
                lib.bpf_poll_ringbuf(rb, 200)
        except KeyboardInterrupt:
            pass
        finally:
            lib.bpf_free_ringbuf(rb)
            os.close(fd)
    return shown
