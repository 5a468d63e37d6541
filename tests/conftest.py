"""Shared fixtures. Kernel and runtime tests need the real thing: under CI=true a missing
prerequisite FAILS the test (never a silent skip); on a developer box it skips with why."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own policy/log/state dirs; bpffs pins are shared (that's the design)."""
    monkeypatch.setenv("SAFEDEPLOY_LOG_DIR", str(tmp_path / "log"))
    monkeypatch.setenv("SAFEDEPLOY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SAFEDEPLOY_POLICY_DIR", str(tmp_path / "policies"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "kernel" in parts:
            item.add_marker(pytest.mark.kernel)
        if "runtime" in parts:
            item.add_marker(pytest.mark.runtime)
