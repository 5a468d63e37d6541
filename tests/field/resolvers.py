"""Real resolvers on loopback addresses the test picks, serving one test zone.

- ``dnsmasq``: authoritative for the zone itself (--host-record / --cname / an addn-hosts file);
- ``unbound``: a recursive resolver forwarding the zone to a dnslib authority on loopback;
- ``bind9``: ``named`` authoritative for the zone from a zone file.

Every server listens on port 53 of its own 127.x.y.z address (glibc's resolv.conf cannot name a
port) and is started and killed by the test; the host's resolv.conf and daemons are untouched.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernel"))
from dnsutil import Server, Zone  # noqa: E402  — the dnslib authority of the kernel tests

ZONE = "field.test"
MIRROR_IP = "127.0.0.1"        # the allowed mirror: an HTTP listener of the test
AUTH_IP = "127.0.0.2"          # the circular dependency (denied by name)
OTHER_IP = "127.0.0.3"         # unlisted
TTL_IP = "127.0.0.4"           # allowed, TTL 1
V6_IP = "::1"                  # AAAA-only allowed name
MANY = [f"127.0.1.{i}" for i in range(1, 21)]   # 20 A records: more than the kernel reads (16)

# name -> [(type, value, ttl)]
RECORDS: dict[str, list[tuple[str, str, int]]] = {
    f"mirror.{ZONE}": [("A", MIRROR_IP, 300)],
    f"auth.{ZONE}": [("A", AUTH_IP, 300)],
    f"other.{ZONE}": [("A", OTHER_IP, 300)],
    f"ttl.{ZONE}": [("A", TTL_IP, 1)],
    f"v6.{ZONE}": [("AAAA", V6_IP, 300)],
    f"many.{ZONE}": [("A", ip, 300) for ip in MANY],
    f"alias.{ZONE}": [("CNAME", f"auth.{ZONE}", 300)],     # allowed -> denied
    f"back.{ZONE}": [("CNAME", f"mirror.{ZONE}", 300)],    # denied -> allowed
    # the search-list case: svc.corp.test and corp.test are searched before the FQDN
    f"mirror.{ZONE}.svc.corp.test": [],
}


def free_loopback(n: int, port: int = 53) -> list[str]:
    """n random 127.a.b.c addresses whose port is free over UDP and TCP (other test runs on
    this host use their own)."""
    out: list[str] = []
    while len(out) < n:
        ip = f"127.{random.randint(60, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"
        ok = True
        for typ in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, typ) as s:
                try:
                    s.bind((ip, port))
                except OSError:
                    ok = False
        if ok and ip not in out:
            out.append(ip)
    return out


def _wait_port(ip: str, port: int = 53, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"resolver exited with {proc.returncode}: {_tail(proc)}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {ip}:{port} after {timeout}s")


def _wait_answers(ip: str, name: str, timeout: float = 15.0) -> None:
    """Until the resolver answers NOERROR for name over UDP and over TCP: a port that
    accepts connections may belong to a server still loading its zones (SERVFAIL)."""
    import struct
    from dnslib import DNSRecord, RCODE
    q = DNSRecord.question(name, "A").pack()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(0.5)
                u.sendto(q, (ip, 53))
                udp = DNSRecord.parse(u.recvfrom(4096)[0])
            with socket.create_connection((ip, 53), timeout=0.5) as t:
                t.sendall(struct.pack("!H", len(q)) + q)
                n = struct.unpack("!H", t.recv(2))[0]
                data = b""
                while len(data) < n:
                    chunk = t.recv(n - len(data))
                    if not chunk:
                        break
                    data += chunk
                tcp = DNSRecord.parse(data)
            if udp.header.rcode == RCODE.NOERROR and tcp.header.rcode == RCODE.NOERROR and udp.rr and tcp.rr:
                return
        except Exception:  # noqa: BLE001 — any failure means: not ready yet
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{ip} did not answer {name} over UDP and TCP within {timeout}s")


def _tail(proc: subprocess.Popen) -> str:
    try:
        return (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")[-500:]
    except Exception:  # noqa: BLE001
        return ""


@dataclass
class Resolver:
    kind: str
    ip: str
    procs: list = field(default_factory=list)
    authority: Server | None = None
    lo_addr: str | None = None
    log: Path | None = None

    def queried(self) -> list[str]:
        """The names dnsmasq was asked for (its --log-queries lines), in order."""
        text = self.log.read_text() if self.log and self.log.exists() else ""
        return [line.split("] ", 1)[1].split(" from ")[0] for line in text.splitlines() if " query[" in line]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.authority:
            self.authority.stop()
        if self.lo_addr:
            subprocess.run(["ip", "addr", "del", f"{self.lo_addr}/32", "dev", "lo"], capture_output=True)


def start_dnsmasq(ip: str, work: Path) -> Resolver:
    work.mkdir(parents=True, exist_ok=True)
    hosts = work / "hosts"
    lines, args = [], []
    for name, recs in RECORDS.items():
        for typ, value, ttl in recs:
            if typ in ("A", "AAAA"):
                lines.append(f"{value} {name}")
            elif typ == "CNAME":
                args.append(f"--cname={name},{value}")
    hosts.write_text("\n".join(lines) + "\n")
    cmd = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
           f"--addn-hosts={hosts}", f"--listen-address={ip}", "--bind-dynamic", "--port=53",
           "--local-ttl=300", "--user=root", "--group=root", "--pid-file=",
           f"--local=/{ZONE}/", f"--log-facility={work / 'dnsmasq.log'}", "--log-queries", *args]
    # dnsmasq answers TCP only on interface addresses: this one is added to lo for the test's life
    res = _on_lo(Resolver("dnsmasq", ip, log=work / "dnsmasq.log"))
    res.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        _wait_port(ip, proc=res.procs[0])
    except BaseException:
        res.stop()
        raise
    return res


def _on_lo(res: Resolver) -> Resolver:
    subprocess.run(["ip", "addr", "add", f"{res.ip}/32", "dev", "lo"], check=True, capture_output=True)
    res.lo_addr = res.ip
    return res


def start_unbound(ip: str, auth_ip: str, work: Path) -> Resolver:
    work.mkdir(parents=True, exist_ok=True)
    zone = Zone({k: v for k, v in RECORDS.items() if v})
    authority = Server(zone, address=auth_ip, port=5300)
    conf = work / "unbound.conf"
    conf.write_text(f"""server:
  interface: {ip}
  port: 53
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{work}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  verbosity: 0
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "iterator"
  local-zone: "test." nodefault
  domain-insecure: "test."
  do-ip6: no
  num-threads: 1
forward-zone:
  name: "test."
  forward-addr: {auth_ip}@5300
""")
    p = subprocess.Popen(["unbound", "-d", "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_port(ip, proc=p)
    except BaseException:
        p.kill()
        authority.stop()
        raise
    return Resolver("unbound", ip, [p], authority)


def start_bind9(ip: str, work: Path) -> Resolver:
    work.mkdir(parents=True, exist_ok=True)
    rr = [f"$TTL 300\n@ IN SOA ns.{ZONE}. admin.{ZONE}. 1 3600 600 86400 1\n@ IN NS ns.{ZONE}.\n"
          f"ns IN A {ip}\n"]
    for name, recs in RECORDS.items():
        if not name.endswith("." + ZONE):
            continue
        for typ, value, ttl in recs:
            val = value + "." if typ == "CNAME" else value
            rr.append(f"{name}. {ttl} IN {typ} {val}\n")
    (work / "zone").write_text("".join(rr))
    conf = work / "named.conf"
    conf.write_text(f"""options {{
  directory "{work}";
  pid-file none;
  listen-on port 53 {{ {ip}; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
  allow-query {{ any; }};
}};
controls {{ }};
zone "{ZONE}" {{ type primary; file "{work}/zone"; }};
""")
    # named listens only on interface addresses: this one is added to lo for the test's life
    res = _on_lo(Resolver("bind9", ip))
    res.procs.append(subprocess.Popen(["named", "-g", "-c", str(conf)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    try:
        _wait_port(ip, proc=res.procs[0], timeout=30)
    except BaseException:
        res.stop()
        raise
    return res


def start(kind: str, work: Path) -> Resolver:
    for tool in {"dnsmasq": ["dnsmasq"], "unbound": ["unbound"], "bind9": ["named"]}[kind]:
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise FileNotFoundError(f"{tool} not installed (packaging/setup-host.sh installs it)")
    ip, aux = free_loopback(2)
    if kind == "dnsmasq":
        res = start_dnsmasq(ip, work / kind)
    elif kind == "unbound":
        res = start_unbound(ip, aux, work / kind)
    else:
        res = start_bind9(ip, work / kind)
    try:
        _wait_answers(ip, f"mirror.{ZONE}")
    except BaseException:
        res.stop()
        raise
    return res
