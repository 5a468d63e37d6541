"""Where safedeploy keeps things; every location can be moved by an environment variable.

Paths are plain strings: the hook's hot path does not import pathlib (whose imports, `re`
and `urllib.parse` among them, cost more than the hook's work)."""

import os


def _path(var: str, default: str) -> str:
    return os.environ.get(var) or default


def policy_dir() -> str:
    return _path("SAFEDEPLOY_POLICY_DIR", "/etc/safedeploy/policies")


def log_dir() -> str:
    return _path("SAFEDEPLOY_LOG_DIR", "/var/log/safedeploy")


def state_dir() -> str:
    return _path("SAFEDEPLOY_STATE_DIR", "/run/safedeploy")


def bpffs_root() -> str:
    return _path("SAFEDEPLOY_BPFFS", "/sys/fs/bpf/safedeploy")


def syslog_socket() -> str:
    return _path("SAFEDEPLOY_SYSLOG", "/dev/log")


def file_dirs() -> list[str]:
    """The directories `file:` annotations may read (SAFEDEPLOY_FILE_DIRS, colon-separated
    absolute paths). None listed: `file:` is refused (docs/hook.md)."""
    raw = os.environ.get("SAFEDEPLOY_FILE_DIRS") or ""
    return [d for d in raw.split(":") if d and os.path.isabs(d)]
