"""A refused UDP query is answered REFUSED at once, in the resolver's name (ocihook/refuser.py):
BIND's dig, host and nslookup ignore a failed send and wait 10-15 s for an answer; with the
answer they fail within a second, and the report still names the policy."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from dnsutil import Server, Zone
from helpers import require
from kutil import refusers
from ocihook import refuser, report
from ocihook.abi import Refusal

SERVER = "127.0.0.158"
ZONE = {"mirror.refuse.test": [("A", "127.0.0.80", 60)], "auth.refuse.test": [("A", "127.0.0.81", 60)],
        "alias.refuse.test": [("CNAME", "auth.refuse.test", 60)]}
POLICY = f"""
version: 1
name: refuse-test
default: deny
allow:
  - mirror.refuse.test
  - alias.refuse.test
  - "{SERVER}:53"
  - "[::1]:53"
deny:
  - {{domain: auth.refuse.test, reason: "circular: the auth service"}}
"""


@pytest.fixture(scope="module")
def dns():
    srv, srv6 = Server(Zone(ZONE), SERVER), Server(Zone(ZONE), "::1")
    yield srv
    srv.stop()
    srv6.stop()


TIMED = ("import subprocess, sys, time\n"            # the client's own wall time, inside the run
         "t = time.monotonic(); rc = subprocess.run(sys.argv[1:]).returncode\n"
         "print(f'wall {time.monotonic() - t:.3f}', file=sys.stderr); sys.exit(rc)")


def _run(tmp_path, argv: list[str], mode: str | None = None) -> tuple[subprocess.CompletedProcess, float, list]:
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    out = tmp_path / "report.jsonl"
    cli = [sys.executable, "-m", "ocihook.cli", "run", "--policy", str(pol), "--report", str(out)]
    if mode == "audit":
        cli.append("--audit")
    t0 = time.monotonic()
    res = subprocess.run([*cli, "--", sys.executable, "-c", TIMED, *argv], capture_output=True, text=True,
                         timeout=60)
    wall = time.monotonic() - t0
    recs = report.load(out) if out.exists() else []
    return res, wall, recs


def _client_wall(res) -> float:
    return float(next(line for line in res.stderr.splitlines() if line.startswith("wall ")).split()[1])


@pytest.mark.parametrize("server", [SERVER, "::1"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("client", ["dig", "host", "nslookup"])
def test_bind9_tools_fail_fast_on_a_denied_name(tmp_path, dns, pins, client, server):
    require(shutil.which(client) is not None, f"{client} not installed (bind9-dnsutils)")
    argv = {"dig": ["dig", f"@{server}", "auth.refuse.test"],
            "host": ["host", "auth.refuse.test", server],
            "nslookup": ["nslookup", "auth.refuse.test", server]}[client]
    res, _, recs = _run(tmp_path, argv)
    assert _client_wall(res) < 1.0, res.stdout + res.stderr     # was 10-15 s ("no servers could be reached")
    assert "REFUSED" in res.stdout, res.stdout
    assert "no servers could be reached" not in res.stdout + res.stderr
    blocked = [r for r in recs if r["verdict"] == "blocked" and r["kind"] == "dns"]
    assert blocked and all(r.get("domain") == "auth.refuse.test" and r["reason"] == "circular: the auth service"
                           for r in blocked), recs


def test_an_allowed_name_still_resolves_and_nothing_answers_it_but_the_resolver(tmp_path, dns, pins):
    res, _, recs = _run(tmp_path, ["dig", f"@{SERVER}", "+short", "mirror.refuse.test"])
    assert res.stdout.split()[:1] == ["127.0.0.80"], res.stdout
    assert not [r for r in recs if r["verdict"] == "blocked"]


def test_in_audit_mode_the_query_goes_and_the_resolver_answers(tmp_path, dns, pins):
    res, _, recs = _run(tmp_path, ["dig", f"@{SERVER}", "+short", "auth.refuse.test"], mode="audit")
    assert res.stdout.split()[:1] == ["127.0.0.81"], res.stdout   # audit: nothing is refused, nothing answered
    assert [r["verdict"] for r in recs if r["kind"] == "dns"] == ["would-block"]


def test_a_refused_answer_teaches_nothing_and_the_address_stays_denied(tmp_path, dns, pins):
    script = (f"import socket, subprocess\n"
              f"subprocess.run(['dig', '@{SERVER}', 'auth.refuse.test'], capture_output=True)\n"
              f"s = socket.socket()\n"
              f"try:\n    s.connect(('127.0.0.81', 80)); print('connected')\n"
              f"except PermissionError:\n    print('EPERM')\n")
    res, _, _ = _run(tmp_path, [sys.executable, "-c", script])
    assert res.stdout.strip() == "EPERM", res.stdout + res.stderr


def test_the_answer_is_a_well_formed_refused_response():
    """The packet itself: the query's id, QR, opcode and RD kept, RA, RCODE 5, no sections;
    addresses and ports swapped; the IPv6 UDP checksum verifies."""
    import struct
    from dnslib import DNSRecord
    r = Refusal(cport=40000, rport=53, txid=0xBEEF, flags=0x01, family=6)
    r.client[3] = socket.htonl(1)                              # ::1
    ctypes_bytes = socket.inet_pton(socket.AF_INET6, "fd00::53")
    for i in range(4):
        r.resolver[i] = int.from_bytes(ctypes_bytes[4 * i:4 * i + 4], sys.byteorder)
    family, dst, pkt = refuser.answer(r)
    assert family == socket.AF_INET6 and dst == "::1"
    assert socket.inet_ntop(socket.AF_INET6, pkt[8:24]) == "fd00::53" and pkt[6] == 17
    sport, dport, ulen, _ = struct.unpack("!HHHH", pkt[40:48])
    assert (sport, dport, ulen) == (53, 40000, len(pkt) - 40)
    assert refuser._checksum(pkt[8:40] + struct.pack("!I3xB", ulen, 17) + pkt[40:]) == 0
    msg = DNSRecord.parse(pkt[48:])
    assert msg.header.id == 0xBEEF and msg.header.qr == 1 and msg.header.rd == 1 and msg.header.ra == 1
    assert msg.header.rcode == 5 and not msg.questions and not msg.rr
    r4 = Refusal(cport=5353, rport=53, txid=7, flags=0x00, family=4)
    r4.client[2] = r4.resolver[2] = socket.htonl(0xFFFF)
    r4.client[3] = int.from_bytes(socket.inet_aton("127.0.0.9"), sys.byteorder)
    r4.resolver[3] = int.from_bytes(socket.inet_aton("127.0.0.53"), sys.byteorder)
    family, dst, pkt = refuser.answer(r4)
    assert family == socket.AF_INET and dst == "127.0.0.9"
    assert pkt[12:16] == socket.inet_aton("127.0.0.53") and pkt[9] == 17
    assert DNSRecord.parse(pkt[28:]).header.rcode == 5


ASKER = r"""
import socket, struct, sys, time
sys.stdin.readline()                                  # "go": the process is in the policed cgroup
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x04auth\x06refuse\x04test\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.158", 53))               # the allowed resolver (none listens in here)
t = time.monotonic()
try:
    s.send(q)
except PermissionError:
    pass                                              # refused at egress, as dig's send is
s.settimeout(3)
try:
    a = s.recv(512)
    print("answer", hex(struct.unpack("!H", a[:2])[0]), a[3] & 15, round(time.monotonic() - t, 3))
except socket.timeout:
    print("timeout")
"""


def test_a_container_refuser_answers_in_the_containers_network_namespace_and_ends_with_its_policy(policed, pins):
    """The container path (refuser.spawn, as the prestart hook does): a process in a network
    namespace of its own, with only loopback, gets the REFUSED answer there; the refuser ends
    once the policy is released."""
    ns = f"sdref{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        p = policed(POLICY)
        asker = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ASKER], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            (p.path / "cgroup.procs").write_text(str(asker.pid))
            refuser.spawn(pins, p.cgid, asker.pid)
            deadline = time.monotonic() + 3
            while not refusers(p.cgid) and time.monotonic() < deadline:   # (it execs a moment later)
                time.sleep(0.05)
            assert refusers(p.cgid)
            out, _ = asker.communicate("go\n", timeout=10)
        finally:
            asker.kill()
        words = out.split()
        assert words[:3] == ["answer", "0x1234", "5"] and float(words[3]) < 1.0, out   # REFUSED, at once
        recs = p.close()
        assert [(r["verdict"], r["domain"]) for r in recs if r["kind"] == "dns"] == [("blocked", "auth.refuse.test")], recs
        deadline = time.monotonic() + 3
        while refusers(p.cgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not refusers(p.cgid)                            # ended with the policy
    finally:
        subprocess.run(["ip", "netns", "del", ns])


FLOOD = r"""
import socket, struct, time
q = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x04auth\x06refuse\x04test\x00\x00\x01\x00\x01"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.158", 53))
s.setblocking(False)
sent = answers = 0
end = time.monotonic() + 1.0
while time.monotonic() < end:
    try:
        s.send(q)
    except OSError:
        pass
    sent += 1
    try:
        while s.recv(512):
            answers += 1
    except BlockingIOError:
        pass
time.sleep(0.2)
try:
    while s.recv(512):
        answers += 1
except BlockingIOError:
    pass
print(sent, answers)
"""


def test_a_flood_of_refused_queries_gets_a_bounded_number_of_answers(tmp_path, dns, pins):
    """The refuser runs outside the cgroup (its CPU is the host's): a process that floods
    refused queries gets at most PER_POLL answers per poll, the rest only EPERM."""
    res, _, recs = _run(tmp_path, [sys.executable, "-c", FLOOD])
    sent, answers = map(int, res.stdout.split())
    assert sent > 5000, res.stdout
    assert 0 < answers <= 1.3 * refuser.PER_POLL / refuser.POLL_S + refuser.PER_POLL, res.stdout
    assert sum(r["count"] for r in recs if r["verdict"] == "blocked") == sent   # every one still counted


def test_a_spawned_refuser_keeps_none_of_its_starters_descriptors(policed, pins):
    """refuser.spawn's process outlives its starter: a pipe the starter holds (a runtime hands
    hooks some) must reach EOF when the starter exits, not when the policy goes."""
    import select
    p = policed(POLICY)
    sleeper = subprocess.Popen(["sleep", "60"])
    r, w = os.pipe()
    try:
        (p.path / "cgroup.procs").write_text(str(sleeper.pid))
        code = f"import sys; from ocihook import refuser; refuser.spawn({str(pins)!r}, {p.cgid}, {sleeper.pid})"
        starter = subprocess.run([sys.executable, "-c", code], capture_output=True, pass_fds=(w,), timeout=60)
        os.close(w)
        assert starter.returncode == 0, starter.stderr
        deadline = time.monotonic() + 3
        while not refusers(p.cgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refusers(p.cgid)                                     # it runs...
        readable, _, _ = select.select([r], [], [], 2.0)
        assert readable and os.read(r, 1) == b""                      # ...without the starter's pipe
        assert refusers(p.cgid)                                     # and it still runs
    finally:
        os.close(r)
        sleeper.kill()
        sleeper.wait()


def _holds_bpf_maps(pid: int) -> bool:
    fds = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(f"{fds}/{fd}") == "anon_inode:bpf-map" for fd in os.listdir(fds))
    except OSError:
        return False


def test_a_spawned_refuser_ends_with_the_containers_process_not_with_its_policy(policed, pins):
    """Orphaned, the refuser is reparented to the nearest child subreaper: under podman,
    conmon, which after the container's exit waits for all its children before it exits, and
    `podman run` waits for conmon (a 250 ms poll): a refuser alive until the policy's release
    cost every podman run ~200 ms. It must end as soon as the container's process does, while
    the policy is still there; until START_S it is only a fork of the hook that waits (no
    Python started, no map open), and one whose container ends by then never starts one."""
    from ocihook.pinned import PinnedMaps
    p = policed(POLICY)
    for lifetime in (3 * refuser.START_S, 0.0):
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            (p.path / "cgroup.procs").write_text(str(sleeper.pid))
            refuser.spawn(pins, p.cgid, sleeper.pid)
            if lifetime:
                time.sleep(refuser.START_S / 2)
                assert not refusers(p.cgid)                         # deferred by START_S...
                time.sleep(lifetime - refuser.START_S / 2)
                started = refusers(p.cgid)
                assert started and all(map(_holds_bpf_maps, started))  # ...then serving
        finally:
            sleeper.kill()
            sleeper.wait()
        deadline = time.monotonic() + 0.5
        while refusers(p.cgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not refusers(p.cgid)                                 # gone with the process...
        with PinnedMaps.open(pins) as maps:
            assert maps.policy_of(p.cgid) is not None                # ...before the policy


# The refuser answers "to the query's source": a policed process that sends a refused query from
# an address that is not its own (IPV6_FREEBIND needs no capability) must not make it deliver
# packets (16 chosen bits each, the DNS id) to that address, a host the policy denies.
# Namespace A (the client's): fd77::1, 10.77.0.1 on a veth; B (the denied host): fd77::2,
# 10.77.0.2; the resolver fd77::3 / 10.77.0.3 is only a neighbour entry (nothing answers).
EXFIL_POLICY = """
version: 1
name: refuse-exfil
default: deny
allow:
  - "[fd77::3]:53"
  - "10.77.0.3:53"
deny:
  - {domain: auth.refuse.test, reason: "denied name"}
  - {cidr: "fd77::2/128", reason: "the denied host"}
  - {cidr: "10.77.0.2/32", reason: "the denied host"}
dns:
  resolvers: ["fd77::3", "10.77.0.3"]
"""

DENIED_HOST = r"""
import select, socket, sys, time
socks = [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
socks[0].bind(("fd77::2", 7777)); socks[1].bind(("10.77.0.2", 7777))
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for s in select.select(socks, [], [], 0.1)[0]:
        d, a = s.recvfrom(2048)
        print("got", a[0], d[:2].hex(), flush=True)
"""

EXFIL_ASKER = r"""
import socket, struct, sys, time
if sys.argv[1:] == ["wait"]:
    sys.stdin.readline()                              # "go": the process is in the policed cgroup
name = b"\x04auth\x06refuse\x04test\x00\x00\x01\x00\x01"
def query(txid): return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + name
def send(s, q, dst):
    try:
        s.sendto(q, dst)
    except OSError:
        pass                                          # refused at egress (EPERM), or not routable
for txid, (fam, level, opt, src, res) in enumerate([   # IPV6_FREEBIND, IP_FREEBIND: no capability needed
        (socket.AF_INET6, socket.IPPROTO_IPV6, 78, "fd77::2", "fd77::3"),
        (socket.AF_INET, socket.IPPROTO_IP, 15, "10.77.0.2", "10.77.0.3")], 0x4558):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(level, opt, 1)
    s.bind((src, 7777))                               # the denied host's address as the source
    send(s, query(txid), (res, 53))
    s.close()
# the same source by other paths: a connected socket's send(), and per-message ancillary data
# (IPV6_PKTINFO naming the denied host's address on a wildcard-bound FREEBIND socket)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 78, 1)
s.bind(("fd77::2", 7777))
try:
    s.connect(("fd77::3", 53))
    s.send(query(0x4560))
except OSError:
    pass
s.close()
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, 78, 1)
s.bind(("::", 7777))
try:
    s.sendmsg([query(0x4561)], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                 socket.inet_pton(socket.AF_INET6, "fd77::2") + struct.pack("I", 0))], 0, ("fd77::3", 53))
except OSError:
    pass
s.close()
for fam, src, res, txid in [(socket.AF_INET6, "fd77::1", "fd77::3", 0x1236), (socket.AF_INET, "10.77.0.1", "10.77.0.3", 0x1234)]:
    s = socket.socket(fam, socket.SOCK_DGRAM)         # an ordinary query from our own address
    s.bind((src, 0))
    send(s, query(txid), (res, 53))
    s.settimeout(2)
    try:
        a = s.recv(512)
        print("answer", hex(struct.unpack("!H", a[:2])[0]), a[3] & 15)
    except socket.timeout:
        print("timeout", hex(txid))
"""


@pytest.fixture
def exfil_ns():
    """(client namespace, denied host namespace) joined by a veth pair."""
    a, b = f"sdrxa{os.getpid() % 100000}", f"sdrxb{os.getpid() % 100000}"
    ip = ["ip"]
    for ns in (a, b):
        subprocess.run([*ip, "netns", "add", ns], check=True)
    try:
        subprocess.run([*ip, "link", "add", "sdrxa", "netns", a, "type", "veth", "peer", "name", "sdrxb",
                        "netns", b], check=True)
        for ns, dev, n in ((a, "sdrxa", 1), (b, "sdrxb", 2)):
            for cmd in (["addr", "add", f"fd77::{n}/64", "dev", dev, "nodad"], ["addr", "add", f"10.77.0.{n}/24", "dev", dev],
                        ["link", "set", dev, "up"], ["link", "set", "lo", "up"]):
                subprocess.run([*ip, "-n", ns, *cmd], check=True)
        subprocess.run([*ip, "-n", a, "-6", "neigh", "add", "fd77::3", "lladdr", "02:00:00:00:00:03", "dev", "sdrxa"], check=True)
        subprocess.run([*ip, "-n", a, "neigh", "add", "10.77.0.3", "lladdr", "02:00:00:00:00:03", "dev", "sdrxa"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run([*ip, "netns", "del", ns])


def _denied_host(ns: str, seconds: float) -> subprocess.Popen:
    host = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", DENIED_HOST, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert host.stdout.readline().strip() == "ready"
    return host


@pytest.mark.parametrize("path", ["container", "run"])
def test_a_query_from_a_non_local_source_is_not_answered_to_the_denied_host(tmp_path, pins, policed, exfil_ns, path):
    """Queries sent from the denied host's address (IPV6_FREEBIND: sendto on a bound socket,
    send on a connected one, sendmsg with IPV6_PKTINFO; IPv4 tried the same way) are refused
    and reported, and the denied host gets nothing; an ordinary query from the client's
    own address is still answered REFUSED at once, in both families. Both refusers: the
    container's (spawn, after setns) and `safedeploy run`'s thread."""
    a, b = exfil_ns
    host = _denied_host(b, 4.0)
    try:
        if path == "container":
            p = policed(EXFIL_POLICY)
            asker = subprocess.Popen(["nsenter", f"--net=/run/netns/{a}", sys.executable, "-c", EXFIL_ASKER, "wait"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                (p.path / "cgroup.procs").write_text(str(asker.pid))
                refuser.spawn(pins, p.cgid, asker.pid)
                deadline = time.monotonic() + 3
                while not refusers(p.cgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                out, _ = asker.communicate("go\n", timeout=10)
            finally:
                asker.kill()
            recs = p.close()
        else:
            pol = tmp_path / "p.yaml"
            pol.write_text(EXFIL_POLICY)
            rep = tmp_path / "report.jsonl"
            res = subprocess.run(["nsenter", f"--net=/run/netns/{a}", sys.executable, "-m", "ocihook.cli", "run", "--policy",
                                  str(pol), "--report", str(rep), "--", sys.executable, "-c", EXFIL_ASKER],
                                 capture_output=True, text=True, timeout=60)
            out, recs = res.stdout, report.load(rep)
        got, _ = host.communicate(timeout=10)
    finally:
        host.kill()
    assert out.split("\n")[:2] == ["answer 0x1236 5", "answer 0x1234 5"], out      # our own address: REFUSED
    assert got == "", got                                                          # the denied host: nothing
    blocked = {(r["domain"], r["dst_ip"]) for r in recs
               if r["verdict"] == "blocked" and r["kind"] == "dns"}
    assert ("auth.refuse.test", "fd77::3") in blocked and ("auth.refuse.test", "10.77.0.3") in blocked, recs


FORGER = r"""
import json, sys
from ocihook.abi import Refusal
from ocihook.pinned import PinnedMaps
from ocihook import refuser
with PinnedMaps.open(sys.argv[1]) as maps:
    fd = maps.inner(int(sys.argv[2]), "refusals")
r = refuser.Refuser(fd)
r.drain(100)
print(json.dumps({"answered": r.answered, "skipped": r.skipped, "failed": r.failed}))
"""


def test_forged_refusals_to_non_local_clients_are_skipped_in_both_families(pins, policed, exfil_ns):
    """The check itself, for both families (the kernel does not route IPv4 from a non-local
    source without IP_TRANSPARENT, so IPv4 cannot be queued the way IPv6 is above): refusals
    pushed into the cgroup's queue by hand, drained by a Refuser in the client's namespace.
    Those to the denied host's addresses (and to multicast) are skipped, those to the client's
    own answered."""
    import json
    from ocihook import bpfsys
    from ocihook.pinned import PinnedMaps
    a, b = exfil_ns
    p = policed(EXFIL_POLICY)
    with PinnedMaps.open(pins) as maps:
        fd = maps.inner(p.cgid, "refusals")
    assert fd is not None, "no refusals queue for the policed cgroup"
    try:
        for client, resolver in [("fd77::2", "fd77::3"), ("10.77.0.2", "10.77.0.3"), ("ff02::1", "fd77::3"),
                                 ("224.0.0.1", "10.77.0.3"), ("fd77::1", "fd77::3"), ("10.77.0.1", "10.77.0.3")]:
            v6 = ":" in client
            r = Refusal(cport=7777, rport=53, txid=0x4558, flags=0x01, family=6 if v6 else 4)
            for field, addr in (("client", client), ("resolver", resolver)):
                raw = socket.inet_pton(socket.AF_INET6, addr if v6 else "::ffff:" + addr)
                for i in range(4):
                    getattr(r, field)[i] = int.from_bytes(raw[4 * i:4 * i + 4], sys.byteorder)
            bpfsys.map_update(fd, None, r)
    finally:
        os.close(fd)
    host = _denied_host(b, 1.5)
    try:
        res = subprocess.run(["nsenter", f"--net=/run/netns/{a}", sys.executable, "-c", FORGER, str(pins), str(p.cgid)],
                             capture_output=True, text=True, timeout=30)
        got, _ = host.communicate(timeout=10)
    finally:
        host.kill()
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"answered": 2, "skipped": 4, "failed": 0}, res.stdout
    assert got == "", got


KERNEL_TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("server", [SERVER, "::1"], ids=["ipv4", "ipv6"])
def test_a_cname_to_a_denied_name_fails_the_lookup_at_once(tmp_path, dns, pins, server):
    """alias.refuse.test is allowed but a CNAME of the denied auth.refuse.test: its UDP answer
    is dropped and the client answered REFUSED, with its question (glibc ignores an answer
    whose question is not its query's), so glibc's getaddrinfo (GNU wget, curl, python) fails
    at once instead of resolving to addresses every connect to is refused (GNU wget retried
    those 20 times). The report names both names."""
    require(shutil.which("unshare") is not None, "unshare not installed (util-linux)")
    conf = tmp_path / "resolv.conf"
    conf.write_text(f"nameserver {server}\noptions timeout:2 attempts:1\n")
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    out = tmp_path / "report.jsonl"
    lookup = ("import socket, time\nt = time.monotonic()\n"
              "try:\n    socket.getaddrinfo('alias.refuse.test', 80, type=socket.SOCK_STREAM); print('resolved')\n"
              "except socket.gaierror as e:\n    print('error', e)\n"
              "print(f'{time.monotonic() - t:.3f}')\n")
    cli = f"{sys.executable} -m ocihook.cli run --policy {pol} --report {out} -- {sys.executable} -c \"$L\""
    # glibc reads /etc/resolv.conf: a private one, bound in a mount namespace around the run
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f"mount --bind {conf} /etc/resolv.conf && {cli}"], env={**os.environ, "L": lookup},
                         capture_output=True, text=True, timeout=60)
    lines = res.stdout.split("\n")
    assert lines[0].startswith("error") and float(lines[1]) < 1.0, res.stdout + res.stderr
    recs = report.load(out)
    blocked = [r for r in recs if r["verdict"] == "blocked" and r["kind"] == "dns"]
    assert blocked and all((r["domain"], r.get("target"), r["reason"]) ==
                           ("alias.refuse.test", "auth.refuse.test", "circular: the auth service")
                           for r in blocked), recs
    if shutil.which("dig"):
        res, _, _ = _run(tmp_path, ["dig", f"@{server}", "alias.refuse.test"])
        assert _client_wall(res) < 1.0 and "status: REFUSED" in res.stdout, res.stdout
        assert "WARNING" not in res.stdout and "QUERY: 1," in res.stdout and ";alias.refuse.test." in res.stdout, \
            res.stdout


def test_in_audit_mode_a_cname_to_a_denied_name_resolves_and_is_reported(tmp_path, dns, pins):
    res, _, recs = _run(tmp_path, ["dig", f"@{SERVER}", "+short", "alias.refuse.test"], mode="audit")
    assert "127.0.0.81" in res.stdout.split(), res.stdout
    rows = [(r["verdict"], r["domain"], r.get("target")) for r in recs if r["kind"] == "dns"]
    assert ("would-block", "alias.refuse.test", "auth.refuse.test") in rows, rows
