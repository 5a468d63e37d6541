"""Address helpers shared by the policy engine and the views: the kernel keeps IPv4 as
v4-mapped IPv6 (::ffff:a.b.c.d) in 16 network-order bytes."""
from __future__ import annotations

import ipaddress


def addr_of(raw) -> ipaddress.IPv6Address:
    """An IPv6Address (v4 as ::ffff:a.b.c.d) from a map's 16 address bytes."""
    return ipaddress.IPv6Address(bytes(raw))


def display_ip(addr: ipaddress.IPv6Address) -> str:
    """a.b.c.d for a v4-mapped address, the compressed IPv6 form otherwise."""
    v4 = addr.ipv4_mapped
    return str(v4) if v4 is not None else addr.compressed
