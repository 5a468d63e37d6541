"""Helpers for real-kernel tests: run code inside a policed cgroup, connect, listen."""
from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import socket
from pathlib import Path

from ocihook import cgroup, events, session
from ocihook.compiler import compile_policy
from ocihook.policy import load_policy_text


run_in = cgroup.run_in  # a real fork into a real cgroup


class Policed:
    """A transient cgroup with a policy applied; events collected at close()."""

    def __init__(self, policy_text: str, mode: str | None = None):
        self.policy = load_policy_text(policy_text, "<test>")
        if mode:
            self.policy = dataclasses.replace(self.policy, mode=mode)
        self.path = Path(cgroup.create(f"test-{os.getpid()}-{secrets.token_hex(4)}"))
        try:
            self.compiled = compile_policy(self.policy)
            self.att = session.apply(self.path, self.compiled)
        except BaseException:
            cgroup.remove(self.path)
            raise
        self.records: list[dict] | None = None

    @property
    def cgid(self) -> int:
        return self.att.cgid

    def run(self, fn, *args, sub: str | None = None):
        path = self.path
        if sub:
            path = self.path / sub
            path.mkdir(exist_ok=True)
        return run_in(path, fn, *args)

    def close(self) -> list[dict]:
        if self.records is None:
            try:
                cgroup.remove(self.path)
            finally:
                drained = self.drained = session.release(self.att, self.compiled)
            self.records = events.to_records(drained, self.compiled, self.path.name)
        return self.records


def connect(host: str, port: int, proto: str = "tcp", timeout: float = 2.0) -> str:
    """'ok', 'refused' or the errno name of a real connect() (sendto() for udp)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    typ = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(fam, typ) as s:
        s.settimeout(timeout)
        try:
            if proto == "tcp":
                s.connect((host, port))
            else:
                s.sendto(b"x", (host, port))
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def udp_connected_send(host: str, port: int) -> str:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
            s.send(b"x")
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


class Listener:
    """A real TCP listener on a loopback address, outside any policed cgroup."""

    def __init__(self, host: str = "127.0.0.1", proto: str = "tcp"):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        if proto == "tcp":
            self.sock.listen(64)
        self.host = host
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def refusers(cgid: int) -> list[int]:
    """Pids of the running refusers (ocihook/refuser.py) of cgroup cgid."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(b"ocihook.refuser" in a for a in argv) and str(cgid).encode() in argv:
            out.append(int(pid))
    return out
