"""The field harness: an HTTP listener, the policy, resolv.conf variants, and batches of real
clients run under ``safedeploy run`` (in a private mount namespace) or in a podman container
from the debootstrapped Debian image, each client timed by driver.py."""
from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from resolvers import ZONE

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

MIRROR = f"mirror.{ZONE}"
TIMES: list[tuple[Path, list[dict]]] = []   # (file, rows) of each module's client wall times
POLICY = f"""version: 1
name: field
default: deny
allow:
  - {MIRROR}
  - alias.{ZONE}
  - many.{ZONE}
  - ttl.{ZONE}
  - v6.{ZONE}
deny:
  - {{domain: auth.{ZONE}, reason: "circular: the auth service"}}
  - {{domain: back.{ZONE}, reason: "circular: the old mirror name"}}
dns:
  resolvers: [RESOLVER]
"""

# resolv.conf variants (glibc options); the nameserver line is added per resolver
RESOLV_OPTIONS = {
    "plain": "",
    "use-vc": "options use-vc",
    "single-request": "options single-request",
    "single-request-reopen": "options single-request-reopen",
    "edns0": "options edns0",
    "search-ndots5": "search svc.corp.test corp.test\noptions ndots:5",
}


def resolv_conf(resolver_ip: str, options: str = "plain") -> str:
    return f"nameserver {resolver_ip}\n{RESOLV_OPTIONS[options]}\n"


def policy_text(resolver_ip: str) -> str:
    return POLICY.replace("RESOLVER", resolver_ip)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.server.server_address[0], self.path))
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_a):
        pass


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Listener:
    """HTTP on one port of 127.0.0.1-4 and ::1: every request is recorded as (ip, path), so a
    test knows whether a client reached an address, whichever one it was."""

    ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "::1")

    def __init__(self):
        self.seen: list[tuple[str, str]] = []
        for _ in range(20):   # a port free on all five addresses
            servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Handler)]
            self.port = servers[0].server_address[1]
            try:
                for a in self.ADDRS[1:]:
                    servers.append((_V6Server if ":" in a else ThreadingHTTPServer)((a, self.port), _Handler))
            except OSError:
                for srv in servers:
                    srv.server_close()
                continue
            self.servers = servers
            break
        else:
            raise RuntimeError("no port free on 127.0.0.1-4 and ::1")
        for s in self.servers:
            s.seen = self.seen
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def reached(self, tag: str) -> list[str]:
        """The addresses a request with this tag reached."""
        return [ip for ip, path in self.seen if path.startswith(f"/{tag}/")]

    def close(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


@dataclass
class Job:
    id: str
    argv: list[str]
    timeout: float = 3.0
    sleep_after: float = 0.0

    def plan(self) -> dict:
        return {"id": self.id, "argv": self.argv, "timeout": self.timeout, "sleep_after": self.sleep_after}


@dataclass
class Batch:
    results: dict[str, dict]
    records: list[dict]
    stderr: str
    report_paths: tuple = ()


def _env(dirs: Path) -> dict:
    return dict(os.environ, SAFEDEPLOY_LOG_DIR=str(dirs / "log"), SAFEDEPLOY_STATE_DIR=str(dirs / "state"),
                SAFEDEPLOY_POLICY_DIR=str(dirs / "policies"))


def run_batch(jobs: list[Job], resolver_ip: str, work: Path, options: str = "plain") -> Batch:
    """``safedeploy run`` of driver.py over the jobs, in a private mount namespace whose
    /etc/resolv.conf names the resolver (the host's is never touched)."""
    from ocihook import report
    work.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    rc, pol, plan = work / f"resolv-{tag}.conf", work / f"policy-{tag}.yaml", work / f"plan-{tag}.json"
    out, rep = work / f"out-{tag}.json", work / f"report-{tag}.jsonl"
    rc.write_text(resolv_conf(resolver_ip, options))
    pol.write_text(policy_text(resolver_ip))
    plan.write_text(json.dumps([j.plan() for j in jobs]))
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
           'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(rc),
           sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--report", str(rep), "--",
           "/usr/bin/python3", str(HERE / "driver.py"), str(plan), str(out)]
    limit = sum(j.timeout + j.sleep_after for j in jobs) + 60
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=_env(work), cwd=REPO)
    if not out.exists():
        raise AssertionError(f"the batch did not run (exit {res.returncode}): {res.stderr[-1500:]}")
    return Batch(json.loads(out.read_text()), report.load(rep), res.stderr)


def run_unpoliced_batch(jobs: list[Job], resolver_ip: str, work: Path, options: str = "plain") -> dict:
    """The same driver in the same kind of private mount namespace, without safedeploy (for the
    measurements of how clients react to errors: measure.py)."""
    work.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    rc, plan, out = work / f"resolv-{tag}.conf", work / f"plan-{tag}.json", work / f"out-{tag}.json"
    rc.write_text(resolv_conf(resolver_ip, options))
    plan.write_text(json.dumps([j.plan() for j in jobs]))
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
           str(rc), "/usr/bin/python3", str(HERE / "driver.py"), str(plan), str(out)]
    subprocess.run(cmd, capture_output=True, text=True, timeout=sum(j.timeout for j in jobs) + 60)
    return json.loads(out.read_text())


def run_podman_batch(jobs: list[Job], resolver_ip: str, work: Path, hook, image: str, conf: Path,
                     options: str = "plain") -> Batch:
    """The same jobs in a podman container of the Debian image (host network, the hook from a
    test-local hooks.d), /etc/resolv.conf bind-mounted from the test."""
    from ocihook import report
    work.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    (work / "resolv.conf").write_text(resolv_conf(resolver_ip, options))
    (work / "plan.json").write_text(json.dumps([j.plan() for j in jobs]))
    (work / "out.json").unlink(missing_ok=True)
    doc = base64.b64encode(policy_text(resolver_ip).encode()).decode()
    name = f"sdfield-{tag}"
    cidfile = work / f"cid-{tag}"
    cmd = ["podman", "--runtime", "runc", "--hooks-dir", str(hook.dir), "run", "--rm", "--name", name,
           "--cidfile", str(cidfile),
           "--network", "host", "--annotation", f"safedeploy.policy=base64:{doc}",
           "-v", f"{work / 'resolv.conf'}:/etc/resolv.conf:ro", "-v", f"{HERE}:/field:ro", "-v", f"{work}:/work",
           image, "python3", "/field/driver.py", "/work/plan.json", "/work/out.json"]
    limit = sum(j.timeout + j.sleep_after for j in jobs) + 120
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                         env=dict(os.environ, CONTAINERS_CONF=str(conf)))
    if not (work / "out.json").exists():
        raise AssertionError(f"the container did not run (exit {res.returncode}): {res.stderr[-1500:]}")
    import rtutil
    cid = cidfile.read_text().strip()
    # the hook's poststop drains in the background, at low priority: give a busy host time
    reports = rtutil.wait_poststop(hook.log_dir, hook.state_dir, pattern=cid, timeout=90)
    if not reports:
        raise AssertionError(f"no report for container {cid} in {hook.log_dir} after 90 s")
    recs = [r for p in reports for r in report.load(p)]
    return Batch(json.loads((work / "out.json").read_text()), recs, res.stderr, tuple(reports))
