"""``safedeploy run``: a host command (and all its children) in a fresh cgroup under a
policy, unable to leave it (ocihook.confine)."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import caps, cgroup, confine, hook, nss, origin, refuser, report
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
    kept: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def violations(self) -> int:
        """Blocked and would-block decisions: the kernel's exact counts (the summary), not
        only those whose details fit in the report."""
        detailed = sum(r["count"] for r in self.records if r["verdict"] != "allowed" and r["count"] > 0)
        return max(detailed, max(0, self.summary.get("blocked", 0)) + max(0, self.summary.get("would_block", 0)))


def kept_capabilities(policy: "Policy", keep=()) -> list[str]:
    """The dangerous capabilities this run keeps: --keep-cap, the policy's `capabilities:`,
    or all of them under `privileged: true`."""
    if policy.privileged:
        return list(caps.DANGEROUS)
    wanted = {caps.normalize(k) for k in keep} | set(policy.capabilities)
    return [c for c in caps.DANGEROUS if c in wanted]


def run(cmd: list[str], policy: "Policy", report_path: Path | None = None, log=None, keep=()) -> RunResult:
    """Run cmd under policy; always cleans up its cgroup, map entries and attachment."""
    inherited = _network_stdio()
    if inherited:
        raise RunError(f"{inherited[0]} is a network socket, opened outside the cgroup: the command could use "
                       "a connection the policy never judged; redirect it (e.g. </dev/null) or use a pipe")
    try:
        outer = origin.policed_above()
    except origin.OriginError as e:
        raise RunError(str(e)) from None
    if outer:
        raise RunError(f"this process is already policed by {outer}: a run inside it would replace that "
                       "policy with its own (the deepest policed cgroup decides); refused")
    run_id = f"run-{os.getpid()}-{secrets.token_hex(3)}"
    kept = kept_capabilities(policy, keep)
    drop = [c for c in caps.DANGEROUS if c not in kept]
    compiled = dict(compile_policy(policy), digest=policy.digest, capabilities=list(policy.capabilities),
                    privileged=policy.privileged)  # as the hook's resolve_policy: containers it starts are judged by it
    path = cgroup.create(run_id)
    out = os.fspath(report_path) if report_path else None
    record = {"id": run_id, "pid": os.getpid(), "kind": "run", "compiled": compiled, "cgroup": path,
              "cgid": cgroup.cgroup_id(path), "started": time.time(), "attachment": None, "report": out,
              "stop_pids": [os.getpid()], "extra": {"capabilities_kept": kept}}
    registered = False
    answering = None
    try:
        hook.register_and_apply(record, log)
        registered = True
        if record["compiled"]["mode"] != "audit":  # audit lets every query through: nothing to answer
            try:
                answering = refuser.Thread(record["attachment"]["pin_dir"], record["cgid"])
            except (OSError, SafedeployError):
                answering = None  # only dig & co.'s fast failure is lost, not the policy
        try:
            hide = [p for _daemon, p in nss.live_sockets()]  # nscd/resolved: their lookups would bypass DNS
            readonly = confine.protected_paths()  # safedeploy's own state, policies, reports and code
            proc = subprocess.Popen(cmd, preexec_fn=lambda: confine.confine(path, drop, hide, readonly))
        except subprocess.SubprocessError:
            raise RunError(f"cannot start {cmd[0]}: its confinement failed (see above)") from None
        except OSError as e:
            raise RunError(f"cannot run {cmd[0]}: {e.strerror}") from None
        returncode = _wait_forwarding_signals(proc)
    finally:
        if answering is not None:
            answering.stop()
        try:
            cgroup.remove(path)  # kill leftovers first: no unprotected window
        finally:
            if registered:
                written = hook.stop({"id": run_id})
    out_path = Path(written)
    summary = report.load_summary(out_path) or {}
    return RunResult(returncode, report.load(out_path), out_path, run_id, summary.get("events_dropped", 0), kept,
                     summary)


def _network_stdio() -> list[str]:
    """stdin/stdout/stderr that are IP sockets (inetd-style callers): the only descriptors
    the command inherits (Popen closes the rest), and a connection made outside the policy."""
    import socket  # noqa: PLC0415
    import stat  # noqa: PLC0415
    out = []
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as s:
                if s.family in (socket.AF_INET, socket.AF_INET6):
                    out.append(name)
        except OSError:
            continue
    return out


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
