"""gc beside starting containers (issue 11 item 8), made deterministic: a container that
registers while gc is busy releasing a stale one (the slow part) keeps its policy, and
its events stay its own."""
from __future__ import annotations

import secrets
from pathlib import Path

from kutil import connect, run_in
from ocihook import cgroup, hook, install, report
from ocihook.maps import PinnedMaps, compile_policy
from ocihook.policy import load_policy_text

COMPILED = compile_policy(load_policy_text("version: 1\nname: race\ndefault: allow\ndeny: ['127.0.0.2']\n", "t"))


def _register(name: str) -> tuple[str, dict]:
    path = cgroup.create(f"{name}-{secrets.token_hex(3)}")
    rec = hook.register_and_apply({"id": f"{name}{secrets.token_hex(3)}", "pid": 1, "compiled": COMPILED,
                                   "cgroup": path, "cgid": cgroup.cgroup_id(path), "attachment": None})
    return path, rec


def test_a_container_registered_while_gc_releases_a_stale_one_stays_policed(pins, monkeypatch):
    stale_path, stale = _register("stale")
    assert run_in(stale_path, connect, "127.0.0.2", 9) == "EPERM"
    cgroup.remove(stale_path)                        # its runtime died: no poststop
    born: list = []
    real_stop = hook.stop

    def slow_stop(state):                            # while gc releases the stale one ...
        if not born:
            born.append(_register("born"))           # ... a container starts
        return real_stop(state)

    monkeypatch.setattr(hook, "stop", slow_stop)
    try:
        install.gc(log=lambda *_: None)
        (path, rec), = born
        with PinnedMaps.open(pins) as maps:
            assert rec["cgid"] in maps.policed_cgroups(), "gc unpoliced a container that started meanwhile"
        assert run_in(path, connect, "127.0.0.2", 9) == "EPERM"
        assert not (Path(hook.settings.state_dir()) / f"{stale['id']}.json").exists()
        cgroup.remove(path)                          # the new container ends normally
        out = real_stop({"id": rec["id"]})
        assert report.load_summary(out)["blocked"] == 1          # its own attempt, in its own report
        assert report.load_summary(Path(hook.settings.log_dir()) / f"{stale['id']}.jsonl")["blocked"] == 1
    finally:
        for p, _r in born:
            cgroup.remove(p)
