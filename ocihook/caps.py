"""Linux capabilities: names, numbers, and the ones that take a process out of its cgroup
or around the programs (docs/security.md, "Leaving the cgroup").

Light on purpose: the hook's warm path imports it (no re, no json)."""

from .errors import SafedeployError

# include/uapi/linux/capability.h
NUMBERS = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}
NAMES = {n: name for name, n in NUMBERS.items()}

# What `safedeploy run` drops and the hook refuses in a container, unless the policy's
# `capabilities:` (or `privileged: true`) allows it. Each one is a way out:
DANGEROUS = {
    "CAP_SYS_ADMIN": "mounts cgroupfs, setns() into the host's cgroup namespace, loads and detaches BPF programs",
    "CAP_NET_ADMIN": "detaches the cgroup's BPF programs (with CAP_BPF), reconfigures routing and netfilter",
    "CAP_BPF": "loads BPF programs and rewrites safedeploy's maps",
    "CAP_NET_RAW": "AF_PACKET sockets send frames below the IP stack, where no cgroup program sees them",
    "CAP_SYS_MODULE": "loads kernel modules",
    "CAP_SYS_PTRACE": "reaches other processes' namespaces and root directories (/proc/PID/root, setns, ptrace)",
    "CAP_DAC_READ_SEARCH": "open_by_handle_at() opens any file, the host's cgroupfs among them",
    "CAP_SYS_RAWIO": "writes kernel memory (/dev/mem, /dev/kmem, ioperm)",
    "CAP_PERFMON": "with CAP_BPF: tracing programs that read and write any process's memory",
}


class CapError(SafedeployError, ValueError):
    """An unknown capability name; str() is one line."""


def normalize(name: str) -> str:
    """'net_raw', 'NET_RAW' or 'CAP_NET_RAW' -> 'CAP_NET_RAW'."""
    text = str(name).strip().upper()
    full = text if text.startswith("CAP_") else f"CAP_{text}"
    if full not in NUMBERS:
        raise CapError(f"unknown capability {str(name)[:40]!r} (e.g. NET_RAW, SYS_PTRACE)")
    return full


def dangerous_in(names, allowed=()) -> list[str]:
    """The dangerous capabilities among names that are not allowed, in DANGEROUS order."""
    have = {str(n).upper() for n in names}
    allow = set(allowed)
    return [c for c in DANGEROUS if c in have and c not in allow]
