"""Answer refused DNS queries at once: REFUSED, in the resolver's name.

The egress program drops a UDP query the policy refuses (the client's send fails with EPERM)
and queues who asked whom (client and resolver address and port, the query's id and flags) in
the cgroup's `refusals` queue (bpf/dns_skb.c, sd_queue_refusal). Clients that ignore a failed
send — dig, host and nslookup from BIND wait 10-15 s for an answer that never comes, then say
"no servers could be reached", which reads like a dead resolver — get a REFUSED answer from
here within milliseconds instead. It is sent over a raw socket, with the resolver's address and
port as its source, in the network namespace the query came from: the `run` process's own, or a
container's (entered with setns). The answer has no records: it teaches the kernel nothing,
and the report still says *policy* (docs/policy.md, "Fail fast").

Used by `safedeploy run` (a thread while the command runs). `spawn` starts one for a
container (a small process in the container's network namespace that ends when the cgroup's
policy is gone); the OCI hook does not call it yet: with it, `podman run` took ~200 ms longer
(+74-94 % in bench/container.py, measured 2026-12-01) for a reason not found yet, so
containers keep the EPERM-only behaviour (dig, host and nslookup wait for their timeout).
"""
from __future__ import annotations

import os
import sys
import time

from . import bpfsys
from .abi import Refusal

POLL_S = 0.01       # how often the queue is looked at
PER_POLL = 8        # answers per look at most (800/s): a flood of refused queries costs the host
                    # (outside the cgroup's own CPU limits) little; the kernel keeps the newest 64
CHECK_S = 0.5       # how often a container's refuser checks that its policy is still there
RCODE_REFUSED = 5
_CLONE_NEWNET = 0x40000000


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def answer(r: Refusal) -> tuple[int, str, bytes]:
    """(address family, destination address, the whole IP packet) answering refusal r: a DNS
    header with the query's id, QR, its opcode and RD, RA, RCODE REFUSED, and no sections."""
    import socket  # noqa: PLC0415
    import struct  # noqa: PLC0415
    dns = struct.pack("!HBBHHHH", r.txid, 0x80 | (r.flags & 0x79), 0x80 | RCODE_REFUSED, 0, 0, 0, 0)
    ulen = 8 + len(dns)
    if r.family == 4:
        src, dst = bytes(r.resolver)[12:], bytes(r.client)[12:]
        udp = struct.pack("!HHHH", r.rport, r.cport, ulen, 0) + dns   # no UDP checksum (IPv4 allows it)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, src, dst)
        return socket.AF_INET, socket.inet_ntop(socket.AF_INET, dst), ip + udp
    src, dst = bytes(r.resolver), bytes(r.client)
    pseudo = src + dst + struct.pack("!I3xB", ulen, 17)
    csum = _checksum(pseudo + struct.pack("!HHHH", r.rport, r.cport, ulen, 0) + dns) or 0xFFFF
    udp = struct.pack("!HHHH", r.rport, r.cport, ulen, csum) + dns
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, ulen, 17, 64, src, dst)
    return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, dst), ip6 + udp


class Refuser:
    """Answers what one cgroup's refusals queue holds (queue_fd: the caller's, kept open)."""

    def __init__(self, queue_fd: int):
        self.fd = queue_fd
        self.socks: dict[int, object] = {}
        self.answered = 0
        self.failed = 0

    def _sock(self, family: int):
        import socket  # noqa: PLC0415
        if family not in self.socks:  # IPPROTO_RAW: the packet carries its own IP header
            self.socks[family] = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        return self.socks[family]

    def drain(self, limit: int = PER_POLL) -> int:
        """Answer up to `limit` queued refusals; returns how many were taken."""
        n = 0
        r = Refusal()
        while n < limit and bpfsys.map_pop(self.fd, r):
            n += 1
            try:
                family, dst, packet = answer(r)
                self._sock(family).sendto(packet, (dst, 0))
                self.answered += 1
            except OSError:
                self.failed += 1  # the client's namespace or address is gone: it waits, as without us
        return n

    def serve(self, stop) -> None:
        """Drain until stop() is true (it is asked between polls)."""
        while not stop():
            self.drain()
            time.sleep(POLL_S)
        self.drain()

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        self.socks = {}


class Thread:
    """`safedeploy run`: a refuser thread for the command's cgroup, in this network namespace."""

    def __init__(self, pin_dir, cgid: int):
        import threading  # noqa: PLC0415
        from .pinned import PinnedMaps  # noqa: PLC0415
        with PinnedMaps.open(pin_dir) as maps:
            self.fd = maps.inner(cgid, "refusals")
        self.refuser = Refuser(self.fd) if self.fd is not None else None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.refuser.serve, args=(self.done.is_set,), daemon=True,
                                       name="safedeploy-refuser") if self.refuser else None
        if self.thread:
            self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread:
            self.thread.join(timeout=2)
            self.refuser.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def spawn(pin_dir, cgid: int, pid: int) -> None:
    """Start a container's refuser: a detached process (new session) in the network namespace
    of the container's process pid (opened here, while pid is surely the container's)."""
    netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from ocihook.refuser import main; main()"
        child = os.fork()
        if child == 0:  # pragma: no cover — the child only execs
            try:
                os.setsid()
                if os.fork():
                    os._exit(0)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                if netns != 3:
                    os.dup2(netns, 3)
                os.set_inheritable(3, True)  # and nothing else: a pipe of the runtime's kept
                os.closerange(4, 1 << 20)    # open would make the runtime wait for this process
                os.execv(sys.executable, [sys.executable, "-S", "-E", "-c", code, os.fspath(pin_dir), str(cgid), "3"])
            finally:
                os._exit(127)
        os.waitpid(child, 0)
    finally:
        os.close(netns)


def _setns(fd: int) -> None:
    import ctypes  # noqa: PLC0415
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main(argv: list[str] | None = None) -> int:
    """The container's refuser: argv = [pin_dir, cgid, netns fd]. Ends when the cgroup's
    policy is released (or its table set replaced)."""
    from .pinned import PinnedMaps  # noqa: PLC0415
    pin_dir, cgid, netns = (argv if argv is not None else sys.argv[1:])[:3]
    cgid = int(cgid)
    _setns(int(netns))
    os.close(int(netns))
    with PinnedMaps.open(pin_dir) as maps:
        header = maps.policy_of(cgid)
        fd = maps.inner(cgid, "refusals")
        if header is None or fd is None:
            return 0
        tables = header.tables
        refuser = Refuser(fd)
        last = [time.monotonic()]

        def released() -> bool:
            now = time.monotonic()
            if now - last[0] < CHECK_S:
                return False
            last[0] = now
            h = maps.policy_of(cgid)
            return h is None or h.tables != tables

        try:
            refuser.serve(released)
        finally:
            refuser.close()
            os.close(fd)
    return 0
