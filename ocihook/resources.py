"""Where the package's data lives: the kernel sources, the policy schema, the hooks.d
templates and the example policies.

Installed (wheel, .deb) they are package data under ``ocihook/data/`` (pyproject.toml maps the
repository's top-level ``bpf/``, ``schemas/``, ``packaging/hooks.d/`` and ``examples/policies/``
there); in a checkout (editable install, PYTHONPATH) they are those top-level directories.
For a package on the file system, ``importlib.resources.files("ocihook")`` is this module's
directory, so plain ``os.path`` gives the same answer without importing importlib.resources:
the hook's hot path reads the kernel header through :data:`BPF_DIR`.
"""

import os

PKG_DIR = os.path.dirname(os.path.realpath(__file__))
PKG_ROOT = os.path.dirname(PKG_DIR)            # the directory that holds ``ocihook/`` (sys.path entry)
DATA = {"bpf": "bpf", "schemas": "schemas", "hooks_d": "packaging/hooks.d", "policies": "examples/policies"}


def path(name: str) -> str:
    """The directory of one kind of package data (see :data:`DATA`)."""
    installed = os.path.join(PKG_DIR, "data", name)
    return installed if os.path.isdir(installed) else os.path.join(PKG_ROOT, DATA[name])


def installed() -> bool:
    """True for a wheel/.deb install, False when running from a checkout."""
    return os.path.isdir(os.path.join(PKG_DIR, "data"))


BPF_DIR = os.environ.get("SAFEDEPLOY_BPF_SRC") or path("bpf")
