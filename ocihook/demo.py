"""``safedeploy demo``: a deploy script under a real policy, on this host's real kernel.

The "deploy script" reaches the package mirror it is allowed to use (a local listener on
127.0.0.1) and tries the auth service that is down in this outage (127.0.0.2): a circular
dependency that the policy refuses at once with EPERM instead of hanging the rollback.
"""
from __future__ import annotations

import socket
import sys
import tempfile
import threading
from pathlib import Path

from . import loader, report, runner
from .policy import load_policy_text

POLICY = """\
version: 1
name: demo
mode: enforce
default: deny
allow:
  - {cidr: 127.0.0.1/32, ports: [PORT], reason: "package mirror"}
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: the auth service is what this deploy repairs"}
"""

SCRIPT = """\
import socket, time
def fetch(what, host, port):
    t = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"GET /\\n"); data = s.recv(64)
        print(f"deploy: {what:<28} ok   ({data.decode().strip()})")
    except OSError as e:
        print(f"deploy: {what:<28} FAIL {e.strerror} after {1000 * (time.monotonic() - t):.1f} ms")
fetch("fetch artefact from mirror", "127.0.0.1", PORT)
fetch("ask auth service for token", "127.0.0.2", 443)
fetch("phone home to telemetry", "127.0.0.3", 8443)
"""


def _serve(sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.recv(64)
            conn.sendall(b"artefact v42\n")


def run_demo() -> int:
    with socket.socket() as srv, tempfile.TemporaryDirectory(prefix="safedeploy-demo-") as tmp:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        threading.Thread(target=_serve, args=(srv,), daemon=True).start()
        policy_text = POLICY.replace("PORT", str(port))
        print("== policy ==")
        print(policy_text)
        policy = load_policy_text(policy_text, "demo.yaml")
        script = Path(tmp) / "deploy.py"
        script.write_text(SCRIPT.replace("PORT", str(port)))
        print("== safedeploy run --policy demo.yaml -- python3 deploy.py ==", flush=True)
        res = runner.run([sys.executable, str(script)], policy, Path(tmp) / "report.jsonl", log=loader.stderr_log)
        for line in report.summary(res.records):
            print(line)
        print(f"\n== safedeploy report {res.run_id} ==")
        print(report.format_table(res.records))
        blocked = {r["dst_ip"] for r in res.records if r["verdict"] == "blocked"}
        ok = res.returncode == 0 and blocked == {"127.0.0.2", "127.0.0.3"}
        print("demo: " + ("the circular dependency was cut and reported" if ok else "UNEXPECTED result"))
        return 0 if ok else 1
