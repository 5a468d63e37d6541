"""``safedeploy run``: a host command (and all its children) in a fresh cgroup under a policy."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import cgroup, events, hook, report, session, settings
from .compiler import compile_policy
from .errors import SafedeployError

if TYPE_CHECKING:  # pragma: no cover
    from .policy import Policy

EXIT_VIOLATION = 3


@dataclass
class RunResult:
    returncode: int
    records: list[dict] = field(default_factory=list)
    report_path: Path | None = None
    run_id: str = ""
    dropped: int = 0
    summary: dict = field(default_factory=dict)

    @property
    def violations(self) -> int:
        """Blocked and would-block decisions: the kernel's exact counts (the summary), not
        only those whose details fit in the report."""
        detailed = sum(r["count"] for r in self.records if r["verdict"] != "allowed")
        return max(detailed, self.summary.get("blocked", 0) + self.summary.get("would_block", 0))


def run(cmd: list[str], policy: "Policy", report_path: Path | None = None, log=None) -> RunResult:
    """Run cmd under policy; always cleans up its cgroup, map entries and attachment."""
    run_id = f"run-{os.getpid()}-{secrets.token_hex(3)}"
    compiled = compile_policy(policy)
    path = cgroup.create(run_id)
    att = None
    try:
        att = session.apply(path, compiled, log)
        _write_state(run_id, compiled, att)
        try:
            proc = subprocess.Popen(cmd, preexec_fn=lambda: cgroup.move_self(path))
        except OSError as e:
            raise RunError(f"cannot run {cmd[0]}: {e.strerror}") from None
        returncode = _wait_forwarding_signals(proc)
    finally:
        drained = session.Drained()
        try:
            cgroup.remove(path)  # kill leftovers first: no unprotected window
        finally:
            try:
                if att is not None:
                    drained = session.release(att, compiled)
            finally:
                _remove_state(run_id)
    records = events.to_records(drained, compiled, run_id, stop_pids=frozenset({os.getpid()}))
    out = report_path or Path(settings.log_dir()) / f"{run_id}.jsonl"
    report.write(records, out, drained.dropped, run_id, policy.name, drained.counters)
    report.syslog_blocked(records)
    return RunResult(returncode, report.aggregate(records), out, run_id, drained.dropped,
                     report.summarize(records, drained.dropped, run_id, policy.name, drained.counters))


def _write_state(run_id: str, compiled: dict, att: session.Attachment) -> None:
    """A state record, as the hook writes for a container, so `watch` and `status` name
    the run (and `gc` releases it should this process die; while it lives, gc leaves it)."""
    import time  # noqa: PLC0415
    hook.write_state(run_id, {"id": run_id, "kind": "run", "pid": os.getpid(), "compiled": compiled,
                              "cgroup": att.cgroup, "cgid": att.cgid, "started": time.time(),
                              "attachment": att.to_dict()})


def _remove_state(run_id: str) -> None:
    try:
        os.unlink(hook.state_path(run_id))
    except FileNotFoundError:
        pass


class RunError(SafedeployError):
    """The command could not be started; str() is one line."""


def _wait_forwarding_signals(proc: subprocess.Popen) -> int:
    """Wait for proc; SIGINT/SIGTERM/SIGHUP go to it instead of killing us mid-cleanup."""
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda sig, _f: proc.send_signal(sig)) for s in forwarded}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return rc if rc >= 0 else 128 - rc
