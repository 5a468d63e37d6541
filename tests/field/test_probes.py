"""Issue 12 item 4: getaddrinfo() sorts its results (RFC 6724) by connecting a UDP socket to
each candidate address and sending nothing. That is no attempt to reach anyone: `run
--fail-on-violation` gates, and the report records, only what was sent."""
from __future__ import annotations

import subprocess
import sys

import pytest

import field
import resolvers
from ocihook import report

Z = resolvers.ZONE


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    r = resolvers.start("dnsmasq", tmp_path_factory.mktemp("probes"))
    yield r
    r.stop()


def _gate(tmp_path, dnsmasq, *cmd):
    (tmp_path / "p.yaml").write_text(field.policy_text(dnsmasq.ip))
    (tmp_path / "resolv.conf").write_text(field.resolv_conf(dnsmasq.ip))
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(tmp_path / "resolv.conf"),
                          sys.executable, "-m", "ocihook.cli", "run", "--fail-on-violation", "--policy",
                          str(tmp_path / "p.yaml"), "--report", str(tmp_path / "r.jsonl"), "--", *cmd],
                         capture_output=True, text=True, timeout=60, env=field._env(tmp_path), cwd=field.REPO)
    return res, report.load(tmp_path / "r.jsonl")


def test_lookup_of_an_allowed_name_passes_the_gate(tmp_path, dnsmasq):
    """What holds today: probes to addresses learned as allowed are allowed."""
    res, recs = _gate(tmp_path, dnsmasq, "getent", "ahosts", f"mirror.{Z}")
    assert res.returncode == 0, res.stderr
    assert "127.0.0.1" in res.stdout
    assert not [r for r in recs if r["verdict"] != "allowed"], recs


def test_address_selection_probes_are_not_violations(tmp_path, dnsmasq):
    """`getent ahosts` only looks up a name with 20 addresses (more than the kernel learns) and
    sorts them: nothing is sent to any of them, so nothing is a violation or a port-0 row."""
    res, recs = _gate(tmp_path, dnsmasq, "getent", "ahosts", f"many.{Z}")
    probes = [r for r in recs if r["dst_port"] == 0]
    assert res.returncode == 0 and not probes, (res.returncode, probes)
