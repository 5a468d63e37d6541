"""``safedeploy demo``: the main job on a built-in example, for real.

A busybox container (rootfs built from Debian's busybox-static, no registry needed) runs a
"deploy script" under the policy ``demo``, started through the installed OCI hook. It finds
everything by name, through a DNS server the demo starts on loopback (dnslib), as a real
deploy does: it fetches its artefact from the package mirror it is allowed to use
(``mirror.demo.test``, 127.0.0.1) and then asks the auth service for a token — the service
this very deploy is meant to repair (``auth.demo.test``, 127.0.0.2, which accepts and then
hangs, as a broken service does). The policy refuses that circular dependency at once: the
lookup of the denied name fails, and so does the lookup of a CDN alias whose CNAME leads to
it (``token.cdn.demo.test``: its answer is refused). The report says who tried which name and which rule
refused it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from . import install, report, settings
from .errors import SafedeployError

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "nc", "echo", "cat", "sleep", "touch", "ls", "true", "wget", "date")
IMAGE = "localhost/safedeploy-demo-busybox:latest"

POLICY = """\
version: 1
name: demo
mode: enforce
default: deny
allow:
  - {domain: mirror.demo.test, ports: [MIRROR], reason: "package mirror"}
  - {domain: "*.cdn.demo.test", reason: "the CDN"}
deny:
  - {domain: auth.demo.test, reason: "circular: the auth service is what this deploy repairs"}
dns:
  resolvers: [DNS]
"""

# the demo's zone: (type, value); token.cdn.demo.test is a CDN alias of the auth service
ZONE = {"mirror.demo.test": [("A", "127.0.0.1", 300)],
        "auth.demo.test": [("A", "127.0.0.2", 300)],
        "token.cdn.demo.test": [("CNAME", "auth.demo.test", 300)]}

SCRIPT = """\
echo "deploy: fetching artefact from mirror.demo.test"
echo GET | nc mirror.demo.test MIRROR
echo "deploy: asking auth.demo.test for a token"
if echo GET | nc -w 5 auth.demo.test 8443; then echo "deploy: got a token"; \
else echo "deploy: auth unreachable"; fi
echo "deploy: asking its CDN alias token.cdn.demo.test instead"
if echo GET | nc -w 5 token.cdn.demo.test 8443; then echo "deploy: got a token"; \
else echo "deploy: still unreachable, using break-glass credentials"; fi
echo "deploy: phoning home to telemetry"
echo GET | nc -w 5 127.0.0.3 8443 || true
echo "deploy: rollout done"
"""


# podman's own default capabilities, spelled out: a containers.conf of our own replaces
# the system's, and the compiled-in defaults of some builds add CAP_NET_RAW, which the
# hook refuses (AF_PACKET bypasses the programs; docs/security.md)
CONTAINERS_CONF = """[containers]
default_ulimits = []
default_capabilities = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "SETFCAP",
                        "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"]
"""


class DemoError(SafedeployError):
    """The demo cannot run here; str() is one line."""


# -- a busybox rootfs, bundles and podman images (tests use these too) ------------------
def make_rootfs(dest: Path) -> Path:
    if not BUSYBOX.exists():
        raise DemoError(f"{BUSYBOX} missing: apt-get install busybox-static")
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        link = dest / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (dest / d).mkdir(exist_ok=True)
    return dest


def import_image(rootfs: Path, image: str, env: dict | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "rootfs.tar"
        with tarfile.open(tar, "w") as t:
            t.add(rootfs, arcname=".")
        res = subprocess.run(["podman", "import", str(tar), image], capture_output=True, text=True, env=env)
    if res.returncode:
        raise DemoError(f"podman import failed: {res.stderr.strip()[:200]}")


def make_bundle(bundle: Path, rootfs: Path, script: str, *, annotations: dict | None = None,
                hook_path: Path | None = None, hook_env: list[str] | None = None,
                stages=("prestart", "poststop"), resolv_conf: Path | None = None) -> Path:
    """A runc bundle that shares the host network (so loopback services are reachable),
    with the hook in config.json the way oci-hooks would inject it."""
    bundle.mkdir(parents=True, exist_ok=True)
    if not (bundle / "rootfs").exists():
        shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    (bundle / "config.json").unlink(missing_ok=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["sh", "-c", script]
    cfg["root"]["readonly"] = False
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
    if resolv_conf:
        cfg["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv_conf),
                              "options": ["bind", "ro"]})
    if annotations:
        cfg["annotations"] = annotations
    if hook_path:
        entry = {"path": str(hook_path), "env": hook_env or [], "timeout": 30}
        cfg["hooks"] = {st: [dict(entry, args=["safedeploy-hook", st])] for st in stages}
    (bundle / "config.json").write_text(json.dumps(cfg, indent=1))
    return bundle


# -- the local services ------------------------------------------------------------------
def _serve(sock: socket.socket, answer: bytes | None) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        if answer is None:  # a broken service: accepts, then never answers
            threading.Timer(30, conn.close).start()
            continue
        with conn:
            conn.sendall(answer)


def _service(host: str, port: int, answer: bytes | None) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    threading.Thread(target=_serve, args=(s, answer), daemon=True).start()
    return s


def _dns_server(log) -> tuple[object, str]:
    """A dnslib server for ZONE on port 53 of a free loopback address."""
    from dnslib import CNAME, QTYPE, RR, A  # noqa: PLC0415
    from dnslib.server import BaseResolver, DNSLogger, DNSServer  # noqa: PLC0415

    class Resolver(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            name = str(request.q.qname).rstrip(".").lower()
            for _ in range(4):
                cname = None
                for typ, value, ttl in ZONE.get(name, []):
                    if typ == "CNAME":
                        reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=ttl))
                        cname = value
                    elif request.q.qtype == QTYPE.A:
                        reply.add_answer(RR(name, QTYPE.A, rdata=A(value), ttl=ttl))
                if not cname:
                    break
                name = cname
            if not reply.rr and name not in ZONE:
                reply.header.rcode = 3  # NXDOMAIN
            return reply

    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    for last in range(53, 80):
        ip = f"127.0.53.{last}"
        try:
            servers = [DNSServer(Resolver(), address=ip, port=53, tcp=tcp, logger=quiet) for tcp in (False, True)]
        except OSError:
            continue
        for srv in servers:
            srv.start_thread()
        log(f"== DNS for *.demo.test on {ip}:53 (dnslib) ==")
        return servers, ip
    raise DemoError("no free loopback address for the demo's DNS server (127.0.53.53-79)")


def run_demo(runtime: str = "auto", log=print) -> int:
    if runtime == "auto":
        runtime = "podman" if shutil.which("podman") else "runc"
    if not shutil.which(runtime) or not shutil.which("runc"):
        raise DemoError(f"{runtime} is not installed (make demo installs it)")
    work = Path(tempfile.mkdtemp(prefix="safedeploy-demo-"))
    mirror = _service("127.0.0.1", 0, b"artefact v42 (sha256 ok)\n")
    auth = _service("127.0.0.2", 8443, None)
    dns: list = []
    try:
        dns, dns_ip = _dns_server(log)
        resolv = work / "resolv.conf"
        resolv.write_text(f"nameserver {dns_ip}\noptions timeout:2 attempts:1\n")
        port = mirror.getsockname()[1]
        pdir = Path(settings.policy_dir())
        pdir.mkdir(parents=True, exist_ok=True)
        policy_text = POLICY.replace("MIRROR", str(port)).replace("DNS", dns_ip)
        (pdir / "demo.yaml").write_text(policy_text)
        log(f"== policy {pdir / 'demo.yaml'} ==\n{policy_text}")
        hooks_dir, hook_path = work / "hooks.d", work / "safedeploy-hook"
        install.install(hooks_dir, hook_path, preload=True, log=lambda m: log(f"install: {m}"))
        rootfs = make_rootfs(work / "rootfs")
        script = SCRIPT.replace("MIRROR", str(port))
        cid = f"safedeploy-demo-{secrets.token_hex(3)}"
        t0 = time.monotonic()
        if runtime == "podman":
            conf = work / "containers.conf"
            conf.write_text(CONTAINERS_CONF)
            env = dict(os.environ, CONTAINERS_CONF=str(conf))
            import_image(rootfs, IMAGE, env)
            cidfile = work / "cid"
            cmd = ["podman", "--runtime", "runc", "--hooks-dir", str(hooks_dir), "run", "--rm", "--name", cid,
                   "--cidfile", str(cidfile), "--network", "host", "--annotation", "safedeploy.policy=demo",
                   "-v", f"{resolv}:/etc/resolv.conf:ro",
                   IMAGE, "sh", "-c", script]
            log("== " + " ".join(cmd[:-3]) + " sh -c <deploy script> ==")
            res = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=120)
            cid = cidfile.read_text().strip() if cidfile.exists() else cid
        else:
            bundle = make_bundle(work / "bundle", rootfs, script, annotations={"safedeploy.policy": "demo"},
                                 hook_path=hook_path, hook_env=install.hook_env(), resolv_conf=resolv)
            log(f"== runc run --bundle {bundle} {cid} ==")
            res = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], text=True, capture_output=True,
                                 timeout=120)
        log(res.stdout + res.stderr)
        log(f"(container finished in {time.monotonic() - t0:.2f}s, exit {res.returncode})")
        path = Path(settings.log_dir()) / f"{cid}.jsonl"
        for _ in range(200):  # the poststop hook writes the report in the background
            if path.exists() or res.returncode != 0:
                break
            time.sleep(0.05)
        if res.returncode != 0 or not path.exists():
            raise DemoError(f"the container did not run as expected (exit {res.returncode}); see above")
        records = report.load(path)
        log(f"\n== safedeploy report {cid} ==   ({path})")
        log(report.format_table(records))
        blocked = {r.get("domain") or r["dst_ip"] for r in records if r["verdict"] == "blocked"}
        reached = {r.get("domain") for r in records if r["verdict"] == "allowed" and r["kind"] != "dns"}
        ok = (blocked == {"auth.demo.test", "token.cdn.demo.test", "127.0.0.3"} and "mirror.demo.test" in reached
              and "break-glass" in res.stdout and "artefact v42" in res.stdout)
        log("demo: " + ("the circular dependency (auth.demo.test, and its CDN alias) failed fast and was reported"
                        if ok else "UNEXPECTED result"))
        return 0 if ok else 1
    finally:
        mirror.close()
        auth.close()
        for srv in dns:
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
