"""Real runtimes: runc bundles and podman containers with the installed hook."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import runtime_prereqs
from ocihook import install, loader
from rtutil import IMAGE, containers_conf, import_image, make_rootfs


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory):
    runtime_prereqs("runc")
    return make_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def hook(tmp_path):
    """The hook installed into a test-local hooks.d, with this test's SAFEDEPLOY_* dirs baked in."""
    runtime_prereqs("runc")
    hooks_dir = tmp_path / "hooks.d"
    hook_path = tmp_path / "bin" / "safedeploy-hook"
    install.install(hooks_dir, hook_path, preload=True, log=lambda *_: None)

    class Hook:
        path = hook_path
        dir = hooks_dir
        env = install.hook_env()
        state_dir = Path(os.environ["SAFEDEPLOY_STATE_DIR"])
        log_dir = Path(os.environ["SAFEDEPLOY_LOG_DIR"])
        policy_dir = Path(os.environ["SAFEDEPLOY_POLICY_DIR"])
        pins = Path(loader.pin_dir())
    return Hook


@pytest.fixture(scope="session")
def podman_image(rootfs, tmp_path_factory):
    runtime_prereqs("runc", "podman")
    conf = containers_conf(tmp_path_factory.mktemp("podman") / "containers.conf")
    import_image(rootfs, IMAGE, dict(os.environ, CONTAINERS_CONF=str(conf)))
    return conf
