"""``safedeploy run``: a host command (and all its children) in a fresh cgroup under a policy."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import cgroup, events, nss, report, session, settings
from .maps import compile_policy

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

    @property
    def violations(self) -> int:
        return sum(r["count"] for r in self.records if r["verdict"] != "allowed")


def run(cmd: list[str], policy: "Policy", report_path: Path | None = None, log=None) -> RunResult:
    """Run cmd under policy; always cleans up its cgroup, map entries and attachment."""
    run_id = f"run-{os.getpid()}-{secrets.token_hex(3)}"
    compiled = compile_policy(policy)
    path = cgroup.create(run_id)
    att = None
    try:
        att = session.apply(path, compiled, log)
        hide = [p for _daemon, p in nss.live_sockets()]

        def child_setup() -> None:
            cgroup.move_self(path)
            _hide_name_service_daemons(hide)
        try:
            proc = subprocess.Popen(cmd, preexec_fn=child_setup)
        except OSError as e:
            raise RunError(f"cannot run {cmd[0]}: {e.strerror}") from None
        except subprocess.SubprocessError:
            raise RunError(f"cannot run {cmd[0]}: joining its cgroup or hiding the name-service sockets "
                           f"({', '.join(hide) or 'none'}) failed") from None
        returncode = _wait_forwarding_signals(proc)
    finally:
        drained = session.Drained()
        try:
            cgroup.remove(path)  # kill leftovers first: no unprotected window
        finally:
            if att is not None:
                drained = session.release(att, compiled)
    records = events.to_records(drained, compiled, run_id, stop_pids=frozenset({os.getpid()}))
    out = report_path or Path(settings.log_dir()) / f"{run_id}.jsonl"
    report.write(records, out, drained.dropped, run_id, policy.name)
    report.syslog_blocked(records)
    return RunResult(returncode, report.aggregate(records), out, run_id, drained.dropped)


def _hide_name_service_daemons(sockets: list[str]) -> None:
    """In the child: nscd / systemd-resolved sockets covered in a private mount namespace, so
    the command's lookups go out as DNS the kernel judges and learns from (ocihook/nss.py)."""
    if sockets:
        nss.hide_sockets(sockets)


class RunError(Exception):
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
