"""No way around the cgroup (issue 11 items 2 and 3), with real podman and runc:
privileged containers are refused unless the policy allows them, and containers created
from inside a policed `safedeploy run` (or any policed cgroup) are policed or refused."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ocihook import cgroup, hook as hookmod, report
from rtutil import IMAGE, make_bundle, podman, runc_run, wait_poststop

CLI = [sys.executable, "-m", "ocihook.cli"]
POLICY = "version: 1\nname: rollout\ndefault: allow\ndeny:\n  - {cidr: 127.0.0.2/32, reason: 'circular: auth service'}\n"
NC = "echo x | nc 127.0.0.2 80; echo a=$?"


def _name() -> str:
    return f"sdesc-{secrets.token_hex(4)}"


def _podman_run(hook, conf, *args, annotation="rollout", script="echo RAN"):
    ann = ["--annotation", f"safedeploy.policy={annotation}"] if annotation else []
    name = _name()
    res = podman("run", "--rm", "--name", name, "--network", "host", *ann, *args, IMAGE, "sh", "-c", script,
                 conf=conf, hooks_dir=hook.dir)
    podman("rm", "-f", name, conf=conf, hooks_dir=hook.dir)
    return res


@pytest.mark.parametrize("args, needle", [
    (["--cap-add", "SYS_ADMIN"], "has CAP_SYS_ADMIN: refused"),
    (["--privileged"], "is privileged (--privileged: every capability, CAP_SYS_ADMIN among them)"),
    (["--cap-add", "NET_ADMIN"], "has CAP_NET_ADMIN: refused"),
    (["--cap-add", "BPF"], "has CAP_BPF: refused"),
    (["--cap-add", "NET_RAW"], "has CAP_NET_RAW: refused, CAP_NET_RAW AF_PACKET sockets"),
    (["--cap-add", "SYS_PTRACE"], "has CAP_SYS_PTRACE: refused"),
    (["--cap-add", "DAC_READ_SEARCH"], "has CAP_DAC_READ_SEARCH: refused"),
    (["-v", "/sys/fs/cgroup:/sys/fs/cgroup"], "bind-mounts /sys/fs/cgroup (the cgroup filesystem"),
    (["-v", "/sys/fs/bpf:/bpf:ro"], "bind-mounts /sys/fs/bpf (the bpf filesystem /sys/fs/bpf) at /bpf"),
], ids=["sys_admin", "privileged", "net_admin", "bpf", "net_raw", "sys_ptrace", "dac_read_search",
        "cgroupfs_rw", "bpffs"])
def test_podman_privileged_containers_are_refused(hook, podman_image, args, needle):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    res = _podman_run(hook, podman_image, *args)
    assert res.returncode != 0 and "RAN" not in res.stdout, res.stdout
    assert "safedeploy: container " in res.stderr and needle in res.stderr, res.stderr
    assert "policy 'rollout' allows it only with" in res.stderr
    assert not list(hook.state_dir.glob("*.json"))


def test_podman_policy_allows_a_capability_and_the_report_says_so(hook, podman_image):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY + "capabilities: [NET_RAW]\n")
    res = _podman_run(hook, podman_image, "--cap-add", "NET_RAW", script=NC)
    assert res.returncode == 0 and "a=1" in res.stdout, res.stderr
    files = wait_poststop(hook.log_dir, hook.state_dir)
    summary = report.load_summary(files[0])
    assert summary["capabilities_allowed"] == ["CAP_NET_RAW"] and summary["privileged"] is False
    assert summary["blocked"] == 1


def test_podman_privileged_allowed_by_policy_runs_policed(hook, podman_image):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY + "privileged: true\n")
    res = _podman_run(hook, podman_image, "--privileged", script=NC)
    assert res.returncode == 0 and "a=1" in res.stdout, res.stderr
    summary = report.load_summary(wait_poststop(hook.log_dir, hook.state_dir)[0])
    assert summary["privileged"] is True and "CAP_SYS_ADMIN" in summary["capabilities_allowed"]


def test_unannotated_privileged_container_from_the_host_is_untouched(hook, podman_image):
    res = _podman_run(hook, podman_image, "--privileged", annotation=None)
    assert res.returncode == 0 and "RAN" in res.stdout, res.stderr
    assert not list(hook.log_dir.glob("*.jsonl")) and not list(hook.state_dir.glob("*.json"))


def test_runc_config_with_sys_admin_is_refused(tmp_path, rootfs, hook):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY)
    cid = f"sdesc{secrets.token_hex(4)}"
    bundle = make_bundle(tmp_path / "b", rootfs, "touch /ran", annotations={"safedeploy.policy": "rollout"},
                         hook_path=hook.path, hook_env=hook.env)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    (bundle / "config.json").write_text(json.dumps(cfg))
    res = runc_run(bundle, cid)
    subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    assert res.returncode != 0 and not (bundle / "rootfs" / "ran").exists()
    assert f"safedeploy: container {cid} has CAP_SYS_ADMIN: refused" in res.stderr, res.stderr


# -- containers started from inside a policed run ------------------------------------------------
def _safedeploy_run(tmp_path, cmd, *extra, env=None):
    pol = tmp_path / "run.yaml"
    pol.write_text(POLICY.replace("rollout", "deploy"))
    return subprocess.run([*CLI, "run", "--policy", str(pol), "--keep-cap", "SYS_ADMIN", *extra, "--", *cmd],
                          capture_output=True, text=True, timeout=180, env=env)


def _run_report(res) -> tuple[list[dict], dict]:
    path = Path(res.stderr.split("report: ")[1].split(" (")[0])
    return report.load(path), report.load_summary(path)


def _podman_cmd(hook, conf, *args):
    return ["env", f"CONTAINERS_CONF={conf}", "podman", "--runtime", "runc", "--hooks-dir", str(hook.dir), "run",
            "--rm", "--network", "host", *args, IMAGE, "sh", "-c", NC]


def test_podman_inside_a_run_is_policed_and_lands_in_the_runs_report(tmp_path, hook, podman_image):
    res = _safedeploy_run(tmp_path, _podman_cmd(hook, podman_image))
    assert res.returncode == 0, res.stderr
    assert "a=1" in res.stdout and "Operation not permitted" in res.stderr, (res.stdout, res.stderr)
    recs, summary = _run_report(res)
    assert [(r["dst_ip"], r["comm"], r["reason"]) for r in recs if r["verdict"] == "blocked"] == \
        [("127.0.0.2", "nc", "circular: auth service")]
    assert summary["capabilities_kept"] == ["CAP_SYS_ADMIN"]
    assert not list(hook.state_dir.glob("*.json"))


def test_podman_inside_a_run_with_another_policy_or_privileged_is_refused(tmp_path, hook, podman_image):
    (hook.policy_dir / "rollout.yaml").write_text(POLICY.replace("127.0.0.2", "127.0.0.3"))
    res = _safedeploy_run(tmp_path, _podman_cmd(hook, podman_image, "--annotation", "safedeploy.policy=rollout"))
    assert res.returncode != 0 and "a=" not in res.stdout
    assert "policed by policy 'deploy', but asks for policy 'rollout': refused" in res.stderr, res.stderr
    res = _safedeploy_run(tmp_path, _podman_cmd(hook, podman_image, "--privileged"))
    assert res.returncode != 0 and "a=" not in res.stdout
    assert "is privileged (--privileged" in res.stderr and "policy 'deploy'" in res.stderr, res.stderr


def test_runc_inside_a_run_without_any_hook_is_policed(tmp_path, rootfs, hook):
    """A bare runc bundle (no hooks at all) with an absolute cgroupsPath: the run's
    cgroup namespace and cgroup2 view put it below the run's cgroup anyway."""
    cid = f"sdesc{secrets.token_hex(4)}"
    bundle = make_bundle(tmp_path / "b", rootfs, NC)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = f"/escape-{cid}"
    (bundle / "config.json").write_text(json.dumps(cfg))
    res = _safedeploy_run(tmp_path, ["runc", "run", "--bundle", str(bundle), cid])
    assert res.returncode == 0, res.stderr
    assert "a=1" in res.stdout, (res.stdout, res.stderr)
    recs, _ = _run_report(res)
    assert [r["dst_ip"] for r in recs if r["verdict"] == "blocked"] == ["127.0.0.2"]
    assert not os.path.exists(os.path.join(cgroup.cgroup2_mount(), f"escape-{cid}"))


def test_runtime_in_a_policed_cgroup_placing_its_container_elsewhere_gets_the_same_policy(tmp_path, rootfs, hook):
    """Without the run's namespaces (e.g. a policed container allowed SYS_ADMIN running
    runc): the container lands outside, unannotated; the hook sees that the runtime
    came from a policed cgroup and applies that policy, with a report linked by parent."""
    from ocihook import compiler as maps, policy
    compiled = maps.compile_policy(policy.load_policy_text(POLICY.replace("rollout", "outer"), "t"))
    outer = cgroup.create(f"outer-{secrets.token_hex(3)}")
    rid = f"outer-{secrets.token_hex(3)}"
    hookmod.register_and_apply({"id": rid, "pid": os.getpid(), "compiled": compiled, "cgroup": outer,
                                "cgid": cgroup.cgroup_id(outer), "attachment": None})
    cid = f"sdesc{secrets.token_hex(4)}"
    bundle = make_bundle(tmp_path / "b", rootfs, NC, hook_path=hook.path, hook_env=hook.env)
    try:
        res = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], capture_output=True, text=True,
                             timeout=60, preexec_fn=lambda: cgroup.move_self(outer))
        assert res.returncode == 0, res.stderr
        assert "a=1" in res.stdout and "Operation not permitted" in res.stderr, (res.stdout, res.stderr)
        files = wait_poststop(hook.log_dir, hook.state_dir, cid)
        assert files, "no report for the container"
        summary = report.load_summary(files[0])
        assert summary["parent"] == rid and summary["policy"] == "outer" and summary["blocked"] == 1
    finally:
        cgroup.remove(outer)
        hookmod.stop({"id": rid})


def test_runc_file_annotation_outside_the_listed_dirs_is_refused_without_quoting(tmp_path, rootfs, hook):
    secret = tmp_path / "secret.yaml"
    secret.write_text("api_token: hunter2\n")
    cid = f"sdesc{secrets.token_hex(4)}"
    bundle = make_bundle(tmp_path / "b", rootfs, "touch /ran", annotations={"safedeploy.policy": f"file:{secret}"},
                         hook_path=hook.path, hook_env=hook.env)
    res = runc_run(bundle, cid)
    subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    assert res.returncode != 0 and not (bundle / "rootfs" / "ran").exists()
    assert "safedeploy: annotation safedeploy.policy: file: policies are off" in res.stderr, res.stderr
    env = [e for e in hook.env if not e.startswith("SAFEDEPLOY_FILE_DIRS=")] + [f"SAFEDEPLOY_FILE_DIRS={tmp_path}"]
    bundle = make_bundle(tmp_path / "b", rootfs, "touch /ran", annotations={"safedeploy.policy": f"file:{secret}"},
                         hook_path=hook.path, hook_env=env)
    res = runc_run(bundle, cid)
    subprocess.run(["runc", "delete", "-f", cid], capture_output=True)
    assert res.returncode != 0 and not (bundle / "rootfs" / "ran").exists()
    assert f"safedeploy: policy {secret} is not a valid safedeploy policy" in res.stderr, res.stderr
    assert "hunter2" not in res.stderr and "api_token" not in res.stderr


def test_podman_inside_a_run_asking_for_the_runs_own_policy_runs_under_it(tmp_path, hook, podman_image):
    import base64
    same = base64.b64encode(POLICY.replace("rollout", "deploy").encode()).decode()
    res = _safedeploy_run(tmp_path, _podman_cmd(hook, podman_image, "--annotation", f"safedeploy.policy=base64:{same}"))
    assert res.returncode == 0 and "a=1" in res.stdout, (res.stdout, res.stderr)
    recs, _ = _run_report(res)
    assert [r["dst_ip"] for r in recs if r["verdict"] == "blocked"] == ["127.0.0.2"]
