"""A network namespace of a test process's own (pyroute2), and packet-shaping helpers."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

CLONE_NEWNET = 0x40000000


def setns_net(path: str) -> None:
    """Move the calling thread into the network namespace at path (a /run/netns/NAME)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def own_netns(addrs: tuple[str, ...] = (), ping: bool = False) -> None:
    """Move the calling (forked) process into a new network namespace: lo up, extra local
    addresses on it, and ICMP ping sockets allowed for every group when ping is set. The
    namespace dies with the process; the process stays in its (policed) cgroup."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=idx, state="up")
        for a in addrs:
            ipr.addr("add", index=idx, address=a, prefixlen=128 if ":" in a else 32)
    _wait_ipv6_ready([a for a in addrs if ":" in a])
    if ping:
        with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
            f.write("0 2147483647")


def _wait_ipv6_ready(addrs: list[str], timeout: float = 5.0) -> None:
    """Until every IPv6 address added is usable: the kernel adds it tentative and installs its
    local route only when duplicate-address detection is done (a workqueue, even on lo); a
    packet sent before then finds no route and is dropped before any egress hook, while
    sendto() reports success."""
    import ipaddress
    import time
    want = {ipaddress.ip_address(a).exploded.replace(":", "") for a in addrs}
    deadline = time.monotonic() + timeout
    while want:
        ready = set()
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, _, _, _, flags = line.split()[:5]
                if not int(flags, 16) & 0x40:  # IFA_F_TENTATIVE
                    ready.add(hexaddr)
        if want <= ready and _routable(addrs):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"IPv6 addresses {addrs} still not usable after {timeout} s")
        time.sleep(0.005)


def _routable(addrs: list[str]) -> bool:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        try:
            return all(ipr.route("get", dst=a) for a in addrs)
        except Exception:  # noqa: BLE001 — no route yet
            return False


def err(fn) -> str:
    """fn()'s result, or the errno name of the OSError it raised ('timeout' for a timeout)."""
    try:
        return fn()
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def srh(segments: list[str], nexthdr: int = 17) -> bytes:
    """An IPv6 segment routing header (routing type 4). segments[0] is the final
    destination; the packet first goes to segments[-1]."""
    n = len(segments)
    head = struct.pack("!BBBBBBH", nexthdr, 2 * n, 4, n - 1, n - 1, 0, 0)
    return head + b"".join(socket.inet_pton(socket.AF_INET6, a) for a in segments)


def rthdr2(hop: str, nexthdr: int = 17) -> bytes:
    """An IPv6 type 2 routing header (the only type the kernel takes as ancillary data)."""
    return struct.pack("!BBBB4x", nexthdr, 2, 2, 1) + socket.inet_pton(socket.AF_INET6, hop)


def lsrr(hops: list[str], strict: bool = False) -> bytes:
    """IPv4 options: a loose (or strict) source route through hops, padded with NOPs."""
    body = b"".join(socket.inet_aton(h) for h in hops)
    opt = bytes([0x89 if strict else 0x83, 3 + len(body), 4]) + body
    return opt + b"\x01" * (-len(opt) % 4)


def hopopts_pad(nexthdr: int = 17) -> bytes:
    """An IPv6 hop-by-hop (or destination) options header holding only padding."""
    return bytes([nexthdr, 0, 1, 4, 0, 0, 0, 0])


def unpoliced(fn, *args):
    """fn(*args) in a forked child that stays in the test's own (unpoliced) cgroup."""
    from ocihook import cgroup
    with open("/proc/self/cgroup") as f:
        rel = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    return cgroup.run_in(cgroup.cgroup2_mount().rstrip("/") + rel, fn, *args)
