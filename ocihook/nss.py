"""Local name-service daemons that would hide a ``run``'s lookups from the kernel.

glibc asks nscd (``/run/nscd/socket``) or systemd-resolved (nss-resolve, varlink at
``/run/systemd/resolve/io.systemd.Resolve``) over a unix socket when they run: then no DNS
packet leaves the policed cgroup, no answer is learned, and a connect to an allowed name is
judged without its name. ``safedeploy run`` therefore starts its command in a private mount
namespace where these sockets are covered by /dev/null: glibc finds them refusing
connections and falls back to DNS through resolv.conf (the systemd stub at 127.0.0.53, or the
listed nameservers), which the kernel sees. The host is not changed.
"""
from __future__ import annotations

import ctypes
import os
import socket

# (daemon, socket path): the paths glibc's nscd client and nss-resolve connect to
SOCKETS = (("nscd", "/run/nscd/socket"), ("nscd", "/var/run/nscd/socket"),
           ("systemd-resolved", "/run/systemd/resolve/io.systemd.Resolve"))

_CLONE_NEWNS, _MS_REC, _MS_SLAVE, _MS_BIND = 0x00020000, 0x4000, 0x80000, 0x1000


def live_sockets(sockets=SOCKETS) -> list[tuple[str, str]]:
    """(daemon, path) of each socket that exists and accepts a connection (one per real
    file: /var/run is usually a link to /run)."""
    out, seen = [], set()
    for daemon, path in sockets:
        try:
            real = os.path.realpath(path)
            if real in seen or not os.path.exists(real):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(real)
        except OSError:
            continue
        seen.add(real)
        out.append((daemon, real))
    return out


def hide_sockets(paths: list[str]) -> None:
    """Between fork and exec: a private mount namespace (mounts from the host still
    propagate in) where each path is covered by /dev/null. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rslave /")
    for path in paths:
        if libc.mount(b"/dev/null", path.encode(), None, _MS_BIND, None) != 0:
            err = ctypes.get_errno()
            if err != 2:  # ENOENT: the daemon went away meanwhile, nothing to hide
                raise OSError(err, f"bind /dev/null over {path}")
