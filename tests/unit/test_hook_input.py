"""The hook's input handling: OCI state, annotations, policy references (no kernel needed)."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ocihook import hook
from ocihook.hook import HookError

GOOD = '{"version": 1, "name": "inl", "default": "allow", "deny": ["127.0.0.2"]}'


@pytest.mark.parametrize("raw, needle", [
    (b"", "not JSON"), (b"garbage", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1,2]", "not a JSON object"),
    (b"{}", "no valid container id"), (b'{"id": "../etc"}', "no valid container id"),
    (b'{"id": 5}', "no valid container id"), (b"{" * 100000, "not JSON"),
])
def test_bad_state_is_one_clear_error(raw, needle):
    with pytest.raises(HookError, match=needle) as e:
        hook.read_state(raw)
    assert "\n" not in str(e.value)


def test_state_is_parsed_loosely():
    st = hook.read_state(b'{"ociVersion":"1.0","id":"abc","status":"creating","pid":42,"root":"/x","extra":[1]}')
    assert st["id"] == "abc" and st["pid"] == 42


def test_annotations_from_state_else_bundle_config(tmp_path):
    assert hook.annotations_of({"annotations": {"safedeploy.policy": "a"}}) == {"safedeploy.policy": "a"}
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"safedeploy.policy": "b"}}))
    assert hook.annotations_of({"annotations": {}, "bundle": str(tmp_path)}) == {"safedeploy.policy": "b"}
    assert hook.annotations_of({"bundle": str(tmp_path / "missing")}) == {}
    (tmp_path / "config.json").write_text("not json")
    assert hook.annotations_of({"bundle": str(tmp_path)}) == {}


def test_stage_from_argv_or_status():
    assert hook.stage_of(["prestart"], {}) == "start"
    assert hook.stage_of(["createRuntime"], {}) == "start"
    assert hook.stage_of(["poststop"], {"status": "creating"}) == "stop"
    assert hook.stage_of([], {"status": "stopped"}) == "stop"
    assert hook.stage_of([], {"status": "creating"}) == "start"
    with pytest.raises(HookError, match="unknown hook stage"):
        hook.stage_of(["poststart"], {})


def test_policy_references(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEDEPLOY_FILE_DIRS", str(tmp_path))
    (tmp_path / "web.yaml").write_text(GOOD)
    (tmp_path / "db.json").write_text(GOOD)
    assert hook.policy_source("web", tmp_path) == (str(tmp_path / "web.yaml"), GOOD.encode())
    assert hook.policy_source("db", tmp_path)[0] == str(tmp_path / "db.json")
    assert hook.policy_source(f"file:{tmp_path / 'web.yaml'}", tmp_path)[1] == GOOD.encode()
    assert hook.policy_source(GOOD, tmp_path)[1] == GOOD.encode()
    b64 = "base64:" + base64.b64encode(GOOD.encode()).decode()
    assert hook.policy_source(b64, tmp_path)[1] == GOOD.encode()


@pytest.mark.parametrize("value, needle", [
    ("", "is empty"), ("nope", "unknown policy 'nope'"), ("../etc/passwd", "not a policy name"),
    ("a/b", "not a policy name"), ("file:relative.yaml", "absolute path"), ("base64:%%%", "invalid base64"),
    ("file:/nonexistent/p.yaml", "cannot read policy"),
])
def test_bad_policy_references(tmp_path, monkeypatch, value, needle):
    monkeypatch.setenv("SAFEDEPLOY_FILE_DIRS", "/nonexistent")
    with pytest.raises(HookError, match=needle):
        hook.policy_source(value, tmp_path)


def test_file_policies_only_from_listed_directories_and_never_quoted(tmp_path, monkeypatch):
    allowed = tmp_path / "policies"
    allowed.mkdir()
    (allowed / "ok.yaml").write_text(GOOD)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:hunter2:19000:0:99999:7:::\n")
    monkeypatch.delenv("SAFEDEPLOY_FILE_DIRS", raising=False)
    with pytest.raises(HookError, match="file: policies are off"):
        hook.policy_source(f"file:{allowed / 'ok.yaml'}", tmp_path)
    monkeypatch.setenv("SAFEDEPLOY_FILE_DIRS", f"{allowed}:/nonexistent")
    assert hook.policy_source(f"file:{allowed / 'ok.yaml'}", tmp_path)[1] == GOOD.encode()
    for path in (secret, "/etc/shadow", f"{allowed}/../secret.txt", f"{allowed}x/ok.yaml"):
        with pytest.raises(HookError, match="is outside the directories SAFEDEPLOY_FILE_DIRS lists") as e:
            hook.policy_source(f"file:{path}", tmp_path)
        assert "hunter2" not in str(e.value)
    (allowed / "link.yaml").symlink_to(secret)                   # a symlink out of the directory
    with pytest.raises(HookError, match="outside the directories"):
        hook.policy_source(f"file:{allowed / 'link.yaml'}", tmp_path)
    (allowed / "bad.yaml").write_text("password: hunter2\nversion: 1\nname: [hunter2]\n")
    with pytest.raises(HookError) as e:                          # invalid: where, never what
        hook.resolve_policy(f"file:{allowed / 'bad.yaml'}", None, tmp_path)
    assert "hunter2" not in str(e.value) and "is not a valid safedeploy policy" in str(e.value)
    assert str(allowed / "bad.yaml") in str(e.value) and "contents not shown" in str(e.value)


def test_resolve_policy_validates_once_then_uses_cache(tmp_path):
    (tmp_path / "p.yaml").write_text(GOOD)
    first = hook.resolve_policy("p", None, tmp_path)
    cached = list((Path(hook.settings.state_dir()) / "policy-cache").glob("*.json"))
    assert len(cached) == 1
    again = hook.resolve_policy("p", "audit", tmp_path)
    assert again["mode"] == "audit" and again["rules"] == first["rules"] and first["mode"] == "enforce"
    with pytest.raises(HookError, match="audit or enforce"):
        hook.resolve_policy("p", "loud", tmp_path)


def test_bad_policy_content_is_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("version: 1\nname: x\nallow: ['10.0.0.1/8']\n")
    from ocihook.policy import PolicyError
    with pytest.raises(PolicyError) as e:
        hook.resolve_policy("bad", None, tmp_path)
    assert "$.allow[0]" in str(e.value) and "\n" not in str(e.value)


def _hook(stdin: bytes, *args: str):
    return subprocess.run([sys.executable, "-m", "ocihook.hook", *args], input=stdin, capture_output=True,
                          timeout=60)


def test_hook_process_garbage_stdin_fails_with_one_line():
    res = _hook(b"\x00garbage", "prestart")
    assert res.returncode == 1
    assert res.stderr.decode().startswith("safedeploy: OCI state on stdin is not JSON")
    assert len(res.stderr.splitlines()) == 1 and res.stdout == b""


def test_hook_process_without_annotation_exits_0_and_touches_nothing(tmp_path):
    state = {"id": "plain", "pid": 1, "status": "creating", "bundle": str(tmp_path)}
    res = _hook(json.dumps(state).encode(), "prestart")
    assert res.returncode == 0 and res.stderr == b""
    sd = Path(hook.settings.state_dir())
    assert not sd.exists() or not any(sd.iterdir())


def test_hook_process_poststop_of_unknown_container_is_fine():
    res = _hook(b'{"id": "never-seen", "status": "stopped"}', "poststop")
    assert res.returncode == 0 and res.stderr == b""


def test_hook_hot_path_imports_no_bcc_typer_jsonschema(tmp_path):
    """The lean entry point: a no-annotation container costs only the interpreter."""
    code = ("import sys, io; sys.stdin = io.TextIOWrapper(io.BytesIO(b'{\"id\":\"x\",\"pid\":1}'));"
            "from ocihook import hook\n"
            "hook.run(['prestart'], b'{\"id\":\"x\",\"pid\":1}')\n"
            "bad = [m for m in ('bcc', 'typer', 'jsonschema', 'yaml', 'rich') if m in sys.modules]\n"
            "print(','.join(bad) or 'clean')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "clean", res.stdout + res.stderr


def test_poststop_modules_import_no_policy_engine():
    """Poststop (hook.stop: release, drain, events, report, spool) needs the kernel's records
    and the cached compiled policy, never the policy language (jsonschema, yaml)."""
    code = ("import sys\n"
            "from ocihook import hook, session, events, report, loader, pinned, origin\n"
            "bad = [m for m in ('ocihook.policy', 'jsonschema', 'yaml', 'bcc', 'typer') if m in sys.modules]\n"
            "print(','.join(bad) or 'clean')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "clean", res.stdout + res.stderr
