"""Where safedeploy keeps things; every location can be moved by an environment variable."""
from __future__ import annotations

import os
from pathlib import Path


def _path(var: str, default: str) -> Path:
    return Path(os.environ.get(var) or default)


def policy_dir() -> Path:
    return _path("SAFEDEPLOY_POLICY_DIR", "/etc/safedeploy/policies")


def log_dir() -> Path:
    return _path("SAFEDEPLOY_LOG_DIR", "/var/log/safedeploy")


def state_dir() -> Path:
    return _path("SAFEDEPLOY_STATE_DIR", "/run/safedeploy")


def bpffs_root() -> Path:
    return _path("SAFEDEPLOY_BPFFS", "/sys/fs/bpf/safedeploy")

