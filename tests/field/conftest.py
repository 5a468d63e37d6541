"""Field tests: real resolvers (dnsmasq, unbound, BIND 9) and real clients under real policies.
Under CI=true a missing resolver or client FAILS (packaging/setup-host.sh installs them)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "kernel", HERE.parent / "runtime"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from helpers import kernel_prereqs, require  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "field" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.field)


@pytest.fixture(autouse=True)
def _field_prereqs():
    kernel_prereqs()
    for tool in ("dnsmasq", "unbound", "named", "dig", "curl", "wget", "git", "busybox", "unshare", "nscd"):
        require(shutil.which(tool) is not None or Path("/usr/sbin", tool).exists(),
                f"{tool} not installed (packaging/setup-host.sh installs it)")


def pytest_terminal_summary(terminalreporter):
    import field
    for path, rows in field.TIMES:
        slow = sorted((r for r in rows if r["wall"] >= 1.0), key=lambda r: -r["wall"])
        terminalreporter.write_line(f"field: {len(rows)} client runs timed, {len(slow)} took >= 1 s; all in {path}")
        for r in slow[:12]:
            terminalreporter.write_line(f"  {r['wall']:6.2f} s{' (killed)' if r['killed'] else ''}  {r['test']}")
