"""podman --runtime runc with the packaged hooks.d files (installed into a test-local dir)."""
from __future__ import annotations

import base64
import secrets

from ocihook import report
from rtutil import IMAGE, podman, wait_poststop

POLICY = """
version: 1
name: rollout
default: allow
deny:
  - {cidr: 127.0.0.2/32, reason: "circular: auth service"}
"""


def _name() -> str:
    return f"sdtest-{secrets.token_hex(4)}"


def _run(hook, conf, name, *args, annotation=None):
    ann = ["--annotation", f"safedeploy.policy={annotation}"] if annotation else []
    return podman("run", "--rm", "--name", name, "--network", "host", *ann, *args, IMAGE, "sh", "-c",
                  "echo x | nc 127.0.0.2 80; echo a=$?", conf=conf, hooks_dir=hook.dir)


def _report(hook, name, conf):
    files = wait_poststop(hook.log_dir, hook.state_dir)
    assert len(files) == 1, files
    return report.load(files[0])


def test_podman_annotation_enforces_and_reports(hook, podman_image):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    name = _name()
    res = _run(hook, podman_image, name, annotation="rollout")
    assert res.returncode == 0, res.stderr
    assert "a=1" in res.stdout and "Operation not permitted" in res.stderr
    recs = _report(hook, name, podman_image)
    blocked = [r for r in recs if r["verdict"] == "blocked"]
    assert [(r["dst_ip"], r["dst_port"], r["comm"], r["reason"]) for r in blocked] == \
        [("127.0.0.2", 80, "nc", "circular: auth service")]
    assert not list(hook.state_dir.glob("*.json")), "poststop left a state file"


def test_podman_base64_policy_and_audit_override(hook, podman_image):
    doc = base64.b64encode(POLICY.encode()).decode()
    name = _name()
    res = podman("run", "--rm", "--name", name, "--network", "host",
                 "--annotation", f"safedeploy.policy=base64:{doc}", "--annotation", "safedeploy.mode=audit",
                 IMAGE, "sh", "-c", "echo x | nc 127.0.0.2 80; echo a=$?", conf=podman_image, hooks_dir=hook.dir)
    assert res.returncode == 0, res.stderr
    assert "Connection refused" in res.stderr          # audit: nothing blocked
    assert [r["verdict"] for r in _report(hook, name, podman_image)] == ["would-block"]


def test_podman_unknown_policy_fails_closed(hook, podman_image):
    name = _name()
    res = podman("run", "--rm", "--name", name, "--network", "host", "--annotation", "safedeploy.policy=nope",
                 IMAGE, "sh", "-c", "echo RAN", conf=podman_image, hooks_dir=hook.dir)
    assert res.returncode != 0
    assert "RAN" not in res.stdout
    assert "safedeploy: unknown policy 'nope'" in res.stderr, res.stderr
    podman("rm", "-f", name, conf=podman_image, hooks_dir=hook.dir)


def test_podman_without_annotation_is_untouched(hook, podman_image):
    res = _run(hook, podman_image, _name())
    assert res.returncode == 0, res.stderr
    assert "Connection refused" in res.stderr
    assert not list(hook.log_dir.glob("*.jsonl")) and not list(hook.state_dir.glob("*.json"))


def test_report_by_podman_container_name(hook, podman_image):
    """`safedeploy report NAME` finds the report of a --rm container by its podman name."""
    import subprocess
    import sys
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    name = _name()
    res = _run(hook, podman_image, name, annotation="rollout")
    assert res.returncode == 0, res.stderr
    _report(hook, name, podman_image)
    out = subprocess.run([sys.executable, "-m", "ocihook.cli", "report", name], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "BLOCKED (1 attempts)" in out.stdout and "127.0.0.2:80/tcp" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "ocihook.cli", "report", name + "-nope"], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 1 and "no report" in missing.stderr and "Traceback" not in missing.stderr


def test_podman_container_cannot_slip_past_the_packet_judgement(hook, podman_image):
    """Issue 10 in a container with podman's default capabilities: an unspecified
    destination is judged as the local address it becomes, port 53 cannot be bound, ICMP
    needs the policy's consent, and every record names the real executable."""
    (hook.policy_dir / "rollout.yaml").write_text(POLICY + '  - {cidr: 127.0.0.1/32, reason: "local admin"}\n')
    script = ("echo x | nc 127.0.0.2 80; echo a=$?; "
              "echo x | nc 0.0.0.0 9; echo b=$?; "
              "busybox timeout 2 nc -l -p 53; echo c=$?; "
              "busybox ping -c 1 -W 1 127.0.0.3; echo d=$?")
    name = _name()
    res = podman("run", "--rm", "--name", name, "--network", "host", "--annotation", "safedeploy.policy=rollout",
                 IMAGE, "sh", "-c", script, conf=podman_image, hooks_dir=hook.dir)
    assert res.returncode == 0, res.stderr
    for want in ("a=1", "b=1", "c=1"):
        assert want in res.stdout, (res.stdout, res.stderr)
    assert "d=0" not in res.stdout
    recs = [r for r in _report(hook, name, podman_image) if r["verdict"] == "blocked"]
    got = {(r["kind"], r["dst_ip"], r["rule"]) for r in recs}
    assert ("connect", "127.0.0.2", "127.0.0.2/32") in got
    assert ("connect", "127.0.0.1", "127.0.0.1/32") in got          # 0.0.0.0 is really 127.0.0.1
    assert any(kind == "bind" and rule == "serve_dns" for kind, _, rule in got), got
    # ping: without CAP_NET_RAW (the hook refuses containers that have it) the kernel refuses the
    # raw socket before any program runs; an ICMP datagram socket would be refused by sock_create
    assert all(rule in ("raw_sockets", "protocols") for kind, _, rule in got if kind == "socket"), got
    assert {r["exe"] for r in recs if r["comm"] == "nc"} == {"/bin/busybox"}
