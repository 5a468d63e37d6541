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

Only a query whose source is a local address of that namespace is answered (`is_local`): a
policed process may send from an address that is not its own (IPV6_FREEBIND needs no
capability), and answering "to the query's source" would then deliver packets with its chosen
DNS ids to a host the policy denies it. Those refusals are skipped (counted in `skipped`); the
query was refused all the same and the report says so.

Used by `safedeploy run` (a thread while the command runs) and by the OCI hook (prestart
starts one small process per container, `spawn`, in the container's network namespace; it
ends with the container's process, or when the cgroup's policy is gone).
"""
import os
import sys
import time

from . import bpfsys
from .abi import Refusal

POLL_S = 0.01       # how often the queue is looked at
PER_POLL = 8        # answers per look at most (800/s): a flood of refused queries costs the host
                    # (outside the cgroup's own CPU limits) little; the kernel keeps the newest 64
CHECK_S = 0.5       # how often a container's refuser checks that its policy is still there
START_S = 0.25      # a container's refuser starts Python this long after the hook (unless the
                    # container is gone by then): its start-up (~12 ms of CPU) stays out of the
                    # runtime's way; refusals queued meanwhile are answered then
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
    header with the query's id, QR, its opcode and RD, RA, RCODE REFUSED, and no records; the
    question repeated when the refusal carries it (a dropped answer: glibc ignores an answer
    whose question is not its query's)."""
    import socket  # noqa: PLC0415
    import struct  # noqa: PLC0415
    question = bytes(r.q[:r.qlen]) if 0 < r.qlen <= len(r.q) else b""  # an answer the kernel dropped
    dns = struct.pack("!HBBHHHH", r.txid, 0x80 | (r.flags & 0x79), 0x80 | RCODE_REFUSED, 1 if question else 0,
                      0, 0, 0) + question
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


_NONLOCAL_BIND = {4: "/proc/sys/net/ipv4/ip_nonlocal_bind", 6: "/proc/sys/net/ipv6/ip_nonlocal_bind"}


def _nonlocal_bind(family: int) -> bool:
    """Whether this (the calling thread's) network namespace lets any socket bind a non-local
    address (unreadable counts as yes)."""
    try:
        with open(_NONLOCAL_BIND[family], "rb") as f:
            return f.read().strip() != b"0"
    except OSError:
        return True


def _if_inet6() -> set[bytes]:
    """The IPv6 addresses of the calling thread's network namespace's interfaces."""
    with open("/proc/thread-self/net/if_inet6") as f:
        return {bytes.fromhex(line.split()[0]) for line in f if line.strip()}


def is_local(af: int, host: str) -> bool:
    """Whether host (socket.AF_INET or AF_INET6, as answer() gives it) is an address of the
    calling thread's network namespace: the one an answer to it is sent in. A UDP socket bound
    to (host, 0) without IP_FREEBIND, IPV6_FREEBIND or IP_TRANSPARENT: the kernel takes only a
    local address (EADDRINUSE says local too; EADDRNOTAVAIL, or EINVAL for a link-local address
    without a scope, not). That holds while net.ipv4.ip_nonlocal_bind / net.ipv6.ip_nonlocal_bind
    are 0, which a policed process cannot change without CAP_NET_ADMIN over the namespace; where
    one is not 0, IPv6 is looked up in if_inet6 and IPv4 is not answered at all. Multicast,
    broadcast and unspecified addresses are never anyone's own."""
    import errno  # noqa: PLC0415
    import socket  # noqa: PLC0415
    addr = socket.inet_pton(af, host)
    if af == socket.AF_INET:
        if addr[0] >= 224 or addr == b"\0\0\0\0":  # multicast, class E, broadcast, unspecified
            return False
        family = 4
    else:
        if addr[0] == 0xFF or addr == bytes(16) or addr[:12] == bytes(10) + b"\xff\xff":
            return False                             # multicast, unspecified, IPv4-mapped
        family = 6
    if _nonlocal_bind(family):
        return family == 6 and addr in _if_inet6()
    try:
        s = socket.socket(af, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        s.bind((host, 0))
        return True
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    finally:
        s.close()


class Refuser:
    """Answers what one cgroup's refusals queue holds (queue_fd: the caller's, kept open)."""

    def __init__(self, queue_fd: int):
        self.fd = queue_fd
        self.socks: dict[int, object] = {}
        self.answered = 0
        self.failed = 0
        self.skipped = 0     # not answered: the query's source is not an address of this namespace

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
                if not is_local(family, dst):               # here: in the namespace the answer goes out in
                    self.skipped += 1
                    continue
                self._sock(family).sendto(packet, (dst, 0))
                self.answered += 1
            except OSError:
                self.failed += 1  # the client's namespace or address is gone: it waits, as without us
        return n

    def serve(self, stop, wake: int | None = None) -> None:
        """Drain until stop() is true (it is asked between polls) or, given a `wake` fd (a
        pidfd), until that fd is readable: the wait between polls ends on it at once."""
        import select  # noqa: PLC0415
        while not stop():
            self.drain()
            if wake is None:
                time.sleep(POLL_S)
            elif select.select([wake], [], [], POLL_S)[0]:
                break
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
    of the container's process pid (opened here, while pid is surely the container's), that
    ends when that process does (a pidfd, also opened here).

    It must not outlive the container's process: orphaned, it is reparented to the nearest
    child subreaper, under podman that is conmon, and conmon, once the container has exited,
    runs its exit command and then waits (a blocking wait4(-1)) for all its children before
    it exits; `podman run` waits for conmon's exit (a ppoll on its pidfd, 250 ms timeout).
    A refuser that lived until the policy's release (the detached poststop) cost every
    `podman run` that timeout: ~+200 ms. The caller is expected to exit soon (the hook): the
    child is not waited for here."""
    netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pidfd = os.pidfd_open(pid)
    except BaseException:
        os.close(netns)
        raise
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = f"import sys; sys.path.insert(0, {root!r}); from ocihook.refuser import main; main()"
        # posix_spawn (vfork: the hook pays no fork of its own memory, nor the copy-on-write
        # faults a fork costs it afterwards) of a shell that waits START_S, then starts Python
        # only if the container's process still runs. The code travels in the environment:
        # nothing named ocihook.refuser exists before Python does.
        wait = f"sleep {START_S}; kill -0 {int(pid)} 2>/dev/null && exec \"$0\" -S -E -c \"$SD_REFUSER\" \"$@\""
        # the two descriptors the refuser needs go across by number; stdio is /dev/null, and
        # nothing else: a pipe of the runtime's kept open would make the runtime wait
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0), (os.POSIX_SPAWN_DUP2, 0, 1),
                   (os.POSIX_SPAWN_DUP2, 0, 2)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 2]
        os.set_inheritable(netns, True)
        os.set_inheritable(pidfd, True)
        env = {"SD_REFUSER": code, "PATH": os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin"}
        os.posix_spawn("/bin/sh", ["sh", "-c", wait, sys.executable, os.fspath(pin_dir), str(cgid), str(netns),
                                   str(pidfd)], env, file_actions=actions, setsid=True)
        # not waited for: the hook exits next, and whoever adopts the child reaps it
    finally:
        os.close(netns)
        os.close(pidfd)


def _inheritable_fds() -> list[int]:
    """This process's descriptors that an exec would keep (not close-on-exec)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                out.append(int(name))
        except OSError:
            pass  # the listdir's own descriptor, closed by now
    return out


def _setns(fd: int) -> None:
    import ctypes  # noqa: PLC0415
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def main(argv: list[str] | None = None) -> int:
    """The container's refuser: argv = [pin_dir, cgid, netns fd, pidfd of the container's
    process]. Ends when that process has exited (at once: see spawn), or when the cgroup's
    policy is released (or its table set replaced)."""
    import select  # noqa: PLC0415
    from .pinned import PinnedMaps  # noqa: PLC0415
    args = argv if argv is not None else sys.argv[1:]
    pin_dir, cgid, netns = args[:3]
    cgid = int(cgid)
    pidfd = int(args[3]) if len(args) > 3 else None
    if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
        return 0  # the container is gone already (a short one): nothing will ask
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
            refuser.serve(released, pidfd)
        finally:
            refuser.close()
            os.close(fd)
    return 0
