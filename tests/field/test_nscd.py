"""Issue 12 item 7: a host whose glibc resolves through nscd. Debian's nscd runs in a private
mount namespace of the test (its socket at the standard path there only, its cache on a
tmpfs), with a private resolv.conf naming dnsmasq: the host is never touched."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import field
import resolvers

NSCD_CONF = """debug-level 0
paranoia no
enable-cache hosts yes
positive-time-to-live hosts 600
negative-time-to-live hosts 20
persistent hosts no
shared hosts yes
check-files hosts yes
enable-cache passwd no
enable-cache group no
enable-cache services no
enable-cache netgroup no
"""

SCRIPT = r"""
set -e
mount -t tmpfs tmpfs /run/nscd
mount -t tmpfs tmpfs /var/cache/nscd
mount --bind "$RESOLV" /etc/resolv.conf
/usr/sbin/nscd -F -f "$NSCD_CONF" & echo "nscd-pid $!"
trap 'kill $! 2>/dev/null' EXIT
for i in $(seq 100); do [ -S /run/nscd/socket ] && break; sleep 0.05; done
getent hosts mirror.field.test                       # cached by nscd from now on
"$PY" -m ocihook.cli doctor | grep 'name service' || true
echo "--- run"
"$PY" -m ocihook.cli run --policy "$POLICY" --report "$REPORT" -- /usr/bin/python3 -c "$CLIENT" \
    mirror.field.test "$PORT" /nscd/ || echo "run-exit $?"
"""


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    r = resolvers.start("dnsmasq", tmp_path_factory.mktemp("nscd"))
    yield r
    r.stop()


def test_run_works_on_a_host_resolving_through_nscd(tmp_path, dnsmasq):
    lst = field.Listener()
    try:
        (tmp_path / "resolv.conf").write_text(field.resolv_conf(dnsmasq.ip))
        (tmp_path / "nscd.conf").write_text(NSCD_CONF)
        (tmp_path / "p.yaml").write_text(field.policy_text(dnsmasq.ip))
        from clients import CLIENTS
        env = dict(field._env(tmp_path), RESOLV=str(tmp_path / "resolv.conf"), NSCD_CONF=str(tmp_path / "nscd.conf"),
                   PY=sys.executable, POLICY=str(tmp_path / "p.yaml"), REPORT=str(tmp_path / "r.jsonl"),
                   CLIENT=CLIENTS["python"][1][2], PORT=str(lst.port))
        res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", SCRIPT], env=env,
                             capture_output=True, text=True, timeout=120, cwd=field.REPO)
        out = res.stdout
        assert "127.0.0.1" in out.split("--- run")[0], res.stdout + res.stderr     # nscd answered getent
        assert "nscd" in out and "/run/nscd/socket" in out, out                     # doctor says what it found
        assert "connected b'HTTP/1.0 200'" in out, out + res.stderr                 # the allowed name connects
        assert lst.reached("nscd") == ["127.0.0.1"]
        from ocihook import report
        recs = report.load(tmp_path / "r.jsonl")
        # the kernel saw the lookup itself (not nscd's) and learned the name for the connect
        assert any(r["kind"] == "dns" and r["domain"] == field.MIRROR and r["verdict"] == "allowed" for r in recs), recs
        assert any(r["kind"] == "connect" and r["domain"] == field.MIRROR and r["dst_port"] == lst.port
                   and r["verdict"] == "allowed" for r in recs), json.dumps(recs)
    finally:
        lst.close()


RESOLVED_SCRIPT = r"""
set -e
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/resolve
"$PY" -c "$FAKE" &
trap 'kill $! 2>/dev/null' EXIT
for i in $(seq 100); do [ -S /run/systemd/resolve/io.systemd.Resolve ] && break; sleep 0.05; done
"$PY" -m ocihook.cli doctor | grep 'name service' || true
"$PY" -c "$PROBE" outside
"$PY" -m ocihook.cli run --policy "$POLICY" -- "$PY" -c "$PROBE" inside
"""
# a stand-in for systemd-resolved's varlink socket: accepts, says nothing
FAKE = ("import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.bind('/run/systemd/resolve/io.systemd.Resolve')\n"
        "s.listen(8)\nwhile True: s.accept()\n")
PROBE = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
         "try: s.connect('/run/systemd/resolve/io.systemd.Resolve'); print(sys.argv[1], 'connected')\n"
         "except OSError as e: print(sys.argv[1], type(e).__name__)\n")


def test_run_hides_the_systemd_resolved_socket(tmp_path, dnsmasq):
    """nss-resolve talks varlink to systemd-resolved: inside `run` the socket refuses, so glibc's
    `resolve [!UNAVAIL=return]` falls through to dns. (A stand-in socket at the real path, in a
    private mount namespace: this host has no systemd.)"""
    (tmp_path / "p.yaml").write_text(field.policy_text(dnsmasq.ip))
    env = dict(field._env(tmp_path), PY=sys.executable, POLICY=str(tmp_path / "p.yaml"), FAKE=FAKE, PROBE=PROBE)
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", RESOLVED_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=120, cwd=field.REPO)
    assert "outside connected" in res.stdout, res.stdout + res.stderr
    assert "inside ConnectionRefusedError" in res.stdout, res.stdout + res.stderr
    assert "systemd-resolved at /run/systemd/resolve/io.systemd.Resolve" in res.stdout, res.stdout
