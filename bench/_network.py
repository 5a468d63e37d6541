"""The network comparisons (connect, throughput; apply and dns borrow pieces): the targets,
policies of N deny rules, the iptables peer, the variants (unpoliced / safedeploy /
iptables cgroups, each proven to be what it claims), and the netfilter state.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
from pathlib import Path

from ocihook import cgroup, loader
from _measure import progress
from _sandbox import Sandbox, run_in
from _workers import close_all


def netfilter_state() -> dict:
    """The nftables tables present and the conntrack entry count: a nat table (podman's
    netavark makes one) puts conntrack on every loopback packet, for every variant alike."""
    try:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        tables = [ln.removeprefix("table ").strip() for ln in out.splitlines() if ln.startswith("table ")]
    except OSError:
        tables = []
    try:
        conntrack = int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
    except (OSError, ValueError):
        conntrack = None
    return {"tables": tables, "conntrack_entries": conntrack}


def describe_netfilter(before: dict, after: dict) -> str:
    def one(st: dict) -> str:
        ct = "conntrack not loaded" if st["conntrack_entries"] is None else \
            f"conntrack loaded ({st['conntrack_entries']} entries)"
        return f"tables: {', '.join(st['tables']) or 'none'}; {ct}"
    return f"netfilter at start: {one(before)}" + ("" if before == after else f" | at end: {one(after)}")


HOST, DENIED_HOST = "127.0.0.1", "127.0.0.2"


def try_connect(host: str, port: int, timeout: float = 2.0) -> str:
    """'ok' or the errno name of one TCP connect()."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except socket.timeout:
            return "timeout"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def checks(port: int, denied_port: int) -> dict:
    return {"allowed": try_connect(HOST, port), "denied": try_connect(DENIED_HOST, denied_port)}


def deny_cidrs(n: int) -> list[str]:
    """127.0.0.2/32, then distinct /24s in 10.0.0.0/8: none of them holds 127.0.0.1."""
    return ["127.0.0.2/32"] + [f"10.{i >> 8}.{i & 255}.0/24" for i in range(n - 1)]


def policy_text(n: int) -> str:
    """Default allow, n CIDR deny rules (deny_cidrs): 2n map entries (tcp and udp)."""
    return json.dumps({"version": 1, "name": f"bench-{n}", "mode": "enforce", "default": "allow",
                       "deny": deny_cidrs(n)})


def rules(n) -> str:
    return f"{int(n):,} rule" + ("" if int(n) == 1 else "s")


class Iptables:
    """The iptables peer: chains SDB<pid>_<n> of ``-d <cidr> -j REJECT``, entered from OUTPUT
    through ``-m cgroup --path <cgroup relative to the cgroup2 mount>`` only inside
    ``active()``. close() deletes the chains (and the filter table when this run created
    it and left it empty)."""

    def __init__(self):
        self.chains: list[str] = []
        self.jumps: list[list[str]] = []
        self.version = ""
        self.error = ""
        self.table_existed = False
        try:
            self.version = self._run(["iptables", "--version"]).strip()
            self.table_existed = subprocess.run(["nft", "list", "table", "ip", "filter"],
                                                capture_output=True).returncode == 0
        except (OSError, RuntimeError) as e:
            self.error = f"iptables unusable: {e}"

    @staticmethod
    def _run(args: list[str], stdin: str | None = None) -> str:
        proc = subprocess.run(args, input=stdin, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:6])}: {proc.stderr.strip()[-300:]}")
        return proc.stdout

    def add_chain(self, n: int) -> str:
        chain = f"SDB{os.getpid()}_{n}"
        lines = ["*filter", f":{chain} - [0:0]"]
        lines += [f"-A {chain} -d {cidr} -j REJECT" for cidr in deny_cidrs(n)]
        lines.append("COMMIT")
        self.chains.append(chain)
        self._run(["iptables-restore", "--noflush"], "\n".join(lines) + "\n")
        return chain

    @staticmethod
    def cgroup_match(path: Path) -> str:
        return str(Path(path).relative_to(cgroup.cgroup2_mount()))

    @contextlib.contextmanager
    def active(self, chain: str, path: Path):
        rule = ["OUTPUT", "-m", "cgroup", "--path", self.cgroup_match(path), "-j", chain]
        self._run(["iptables", "-I", rule[0], "1", *rule[1:]])
        self.jumps.append(rule)
        try:
            yield
        finally:
            self.jumps.remove(rule)
            self._run(["iptables", "-D", *rule])

    def close(self) -> None:
        for rule in list(self.jumps):
            with contextlib.suppress(RuntimeError):
                self._run(["iptables", "-D", *rule])
        for chain in self.chains:
            with contextlib.suppress(RuntimeError):
                self._run(["iptables", "-F", chain])
                self._run(["iptables", "-X", chain])
        if self.chains and not self.table_existed:
            with contextlib.suppress(RuntimeError, OSError):
                left = [ln for ln in self._run(["iptables", "-S"]).splitlines() if not ln.startswith("-P ")]
                if not left:
                    self._run(["nft", "delete", "table", "ip", "filter"])
        progress(f"removed the iptables chains {', '.join(self.chains) or '(none)'}")
        self.chains = []


class Variants(dict):
    """name -> {"path", "kind", "rules", ...} for the network benchmarks: "unpoliced" (an empty
    cgroup), "safedeploy, N rules" (policy_text(N) applied) and, when iptables works,
    "iptables, N rules" (an unpoliced cgroup and a chain of the same CIDRs)."""

    EXPECT = {"unpoliced": "ok", "safedeploy": "EPERM", "iptables": "ECONNREFUSED"}

    def __init__(self, sandbox: Sandbox, ipt: Iptables, rule_counts: tuple[int, ...]):
        super().__init__()
        self.sandbox, self.ipt = sandbox, ipt
        self["unpoliced"] = {"path": sandbox.cgroup("plain")[0], "kind": "unpoliced", "rules": 0}
        for n in rule_counts:
            progress(f"safedeploy, {rules(n)}: parse, compile, apply")
            path, _, compiled = sandbox.cgroup(f"sd{n}", policy_text(n))
            self[f"safedeploy, {rules(n)}"] = {"path": path, "kind": "safedeploy", "rules": n,
                                               "map_entries": len(compiled["cidrs"])}
        if not ipt.error:
            try:
                for n in rule_counts:
                    chain = ipt.add_chain(n)
                    self[f"iptables, {rules(n)}"] = {"path": sandbox.cgroup(f"ipt{n}")[0], "kind": "iptables",
                                                     "rules": n, "chain": chain}
            except RuntimeError as e:
                ipt.error = f"iptables peer not set up: {e}"
        if ipt.error:
            progress(f"{ipt.error}: the iptables rows are reported as unavailable")
            for name in [k for k, v in self.items() if v["kind"] == "iptables"]:
                del self[name]

    @property
    def pins(self) -> Path:
        return self.sandbox.pins

    def of_kind(self, kind: str) -> list[str]:
        return [name for name, v in self.items() if v["kind"] == kind]

    def turn(self, name: str, worker):
        """worker.turn() for variant `name`, with its iptables jump in place if it has one."""
        with self.entered(name):
            return worker.turn()

    @contextlib.contextmanager
    def entered(self, name: str):
        """Around a turn of `name`: its iptables jump, if it is an iptables variant."""
        v = self[name]
        if v["kind"] == "iptables":
            with self.ipt.active(v["chain"], v["path"]):
                yield
        else:
            yield

    def prove(self, port: int, denied_port: int, script: str) -> None:
        """Each variant is what it claims: HOST:port connects; DENIED_HOST:denied_port (a
        listener is there) gets EPERM under safedeploy, ECONNREFUSED under iptables and
        connects unpoliced; the programs are attached to the safedeploy cgroups only."""
        for name, v in self.items():
            with self.entered(name):
                got = run_in(v["path"], checks, port, denied_port)
            attached = self.sandbox.attached(v["path"])
            want_attached = len(loader.PROGRAMS) if v["kind"] == "safedeploy" else 0
            if got != {"allowed": "ok", "denied": self.EXPECT[v["kind"]]} or attached != want_attached:
                raise SystemExit(f"bench/{script}: variant {name!r} is not what it claims: {got}, "
                                 f"{attached} programs attached")
            v["check"] = f"{DENIED_HOST}: {got['denied']}"
            progress(f"check {name}: {HOST} ok, {DENIED_HOST} {got['denied']}, {attached} programs attached")

    def to_json(self) -> dict:
        return {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()} for k, v in self.items()}


@contextlib.contextmanager
def network_variants(tag: str, rule_counts: tuple[int, ...], port: int, denied_port: int, script: str):
    """A Sandbox, the iptables peer and their Variants, each proven (Variants.prove) before
    it is yielded; the chains, cgroups, pins and state dir are removed on the way out."""
    sandbox = ipt = None
    try:
        sandbox = Sandbox(tag)
        ipt = Iptables()
        variants = Variants(sandbox, ipt, rule_counts)
        variants.prove(port, denied_port, script)
        yield variants
    finally:
        close_all(ipt, sandbox)
