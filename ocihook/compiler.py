"""Policy -> kernel form: the entries of a cgroup's rule maps and its policy header.

What the hook caches (``compile_policy``) is JSON: the warm path loads it without this
module's caller, the policy module. Nothing here touches the kernel.
"""

import errno

from . import cdata
from .abi import SD_PROTO_OTHER
from .abi import SD_ALLOW, SD_CIDR_FIXED_BITS, SD_DENY, SD_MODE_AUDIT, SD_MODE_ENFORCE, SD_NAME_FIXED_BITS, \
    SD_NAME_KEY, SD_NAME_MAX
from .abi import Addr as AddrKey
from .abi import Cgroup as SdCgroup
from .abi import CidrKey, CidrVal, NameKey, NameVal

# connect_error: the errno the sock_addr programs return for a refused connect/sendmsg (0: EPERM)
CONNECT_ERRNOS = {"EPERM": 0, "EHOSTUNREACH": errno.EHOSTUNREACH, "ECONNREFUSED": errno.ECONNREFUSED,
                  "ENETUNREACH": errno.ENETUNREACH}

TYPE_CHECKING = False  # typing is not imported on the hook's hot path
if TYPE_CHECKING:  # pragma: no cover
    from .policy import Policy

IPPROTO = {"tcp": 6, "udp": 17}
U8 = cdata.c_uint8


def compile_policy(policy: "Policy") -> dict:
    """A policy in kernel form, JSON-serialisable: what the hook caches and what state
    files keep, so the warm path needs neither the policy module nor a re-parse."""
    return {
        "name": policy.name, "mode": policy.mode, "default": policy.default,
        "has_resolvers": policy.resolvers is not None,
        "rules": [[r.text, r.reason] for r in policy.rules],
        "cidrs": [[bytes(k).hex(), bytes(v).hex()] for k, v in cidr_entries(policy)],
        "names": [[bytes(k).hex(), bytes(v).hex()] for k, v in name_entries(policy)],
        "resolvers": [a.packed.hex() for a in policy.resolvers or ()],
        "name_denies": any(r.kind == "name" and r.verdict == "deny" for r in policy.rules),
        "allow_raw": policy.raw_sockets == "allow",
        "min_ttl": policy.min_ttl,
        "unlisted": policy.unlisted == "resolve",
        "allow_srcroute": policy.source_routes == "allow",
        "serve_dns": policy.serve_dns == "allow",
        "connect_errno": CONNECT_ERRNOS[policy.connect_error],
        # a connect the default refuses to an address only an unlisted name (no rule covers
        # it) resolved to: "no route to host", which GNU wget does not retry (EPERM: 20 tries)
        "unlisted_errno": CONNECT_ERRNOS[policy.connect_error] or errno.EHOSTUNREACH,
        "protocols": list(policy.protocols),
    }


def name_key_bytes(name: str, wildcard: bool) -> bytes:
    """The names-trie key of a rule's name, as the kernel builds it from a query: the
    lower-case name reversed, then a 0 byte (exact) or a dot (``*.name``: names below it)."""
    raw = name.lower().rstrip(".").encode()[::-1] + (b"." if wildcard else b"\0")
    if len(raw) > SD_NAME_KEY:
        raise ValueError(f"name {name} is longer than {SD_NAME_MAX} characters")
    return raw


def name_entries(policy: "Policy") -> list[tuple[NameKey, NameVal]]:
    """Name rules by (proto, port, name). proto 0 holds the DNS query verdict
    (decide_query): allow rules (any ports) and port-less deny rules."""
    merged: dict[tuple, tuple[int, int]] = {}

    def put(slot, verdict, index):
        old = merged.get(slot)
        if old is None or (verdict, -index) > (old[0], -old[1]):
            merged[slot] = (verdict, index)
    for rule in policy.rules:
        if rule.kind != "name":
            continue
        verdict = SD_DENY if rule.verdict == "deny" else SD_ALLOW
        key = name_key_bytes(rule.name, rule.wildcard)
        for proto in [rule.proto] if rule.proto else ["tcp", "udp"]:
            for port in rule.ports or (0,):
                put((IPPROTO[proto], port, key), verdict, rule.index)
        if rule.verdict == "allow" or (rule.ports is None and rule.proto is None):
            put((0, 0, key), verdict, rule.index)
        if policy.protocols and rule.ports is None and rule.proto is None:  # other IP protocols
            put((SD_PROTO_OTHER, 0, key), verdict, rule.index)
    out = []
    for (proto, port, key), (verdict, index) in merged.items():
        k = NameKey(prefixlen=SD_NAME_FIXED_BITS + 8 * len(key), proto=proto, port=port)
        cdata.memmove(k.name, key, len(key))
        out.append((k, NameVal(rule=index, verdict=verdict, nlen=len(key))))
    return out


def cgroup_entry(compiled: dict) -> SdCgroup:
    entry = SdCgroup(mode=SD_MODE_AUDIT if compiled["mode"] == "audit" else SD_MODE_ENFORCE,
                    dflt=SD_DENY if compiled["default"] == "deny" else SD_ALLOW,
                    has_resolvers=1 if compiled["has_resolvers"] else 0,
                    name_denies=1 if compiled.get("name_denies") else 0,
                    allow_raw=1 if compiled.get("allow_raw") else 0,
                    unlisted=1 if compiled.get("unlisted") else 0, min_ttl=compiled.get("min_ttl", 0),
                    allow_srcroute=1 if compiled.get("allow_srcroute") else 0,
                    serve_dns=1 if compiled.get("serve_dns") else 0,
                    connect_errno=compiled.get("connect_errno", 0),
                    unlisted_errno=compiled.get("unlisted_errno", 0))
    for proto in compiled.get("protocols", ()):
        entry.protos[proto >> 3] |= 1 << (proto & 7)
    return entry


def cidr_entries(policy: "Policy") -> list[tuple[CidrKey, CidrVal]]:
    """LPM entries for the CIDR rules. Rules that land on the same key are merged as
    decide() breaks ties: deny beats allow, then the lowest index."""
    merged: dict[tuple, tuple[int, int]] = {}
    for rule in policy.rules:
        if rule.kind != "cidr":
            continue
        verdict = SD_DENY if rule.verdict == "deny" else SD_ALLOW
        protos = [IPPROTO[rule.proto]] if rule.proto else [IPPROTO["tcp"], IPPROTO["udp"]]
        if policy.protocols and rule.proto is None and rule.ports is None:
            protos.append(SD_PROTO_OTHER)  # other IP protocols meet the port-less rules
        for proto in protos:
            for port in rule.ports or (0,):
                slot = (proto, port, rule.network.network_address.packed, rule.network.prefixlen)
                old = merged.get(slot)
                if old is None or (verdict, -rule.index) > (old[0], -old[1]):
                    merged[slot] = (verdict, rule.index)
    out = []
    for (proto, port, addr, plen), (verdict, index) in merged.items():
        key = CidrKey(prefixlen=SD_CIDR_FIXED_BITS + plen, proto=proto, port=port)
        cdata.memmove(key.addr, addr, 16)
        out.append((key, CidrVal(rule=index, verdict=verdict, plen=plen)))
    return out


def compiled_entries(compiled: dict):
    """(inner map name, key, value) of every rule entry of a compiled policy."""
    for k, v in compiled["cidrs"]:
        yield "cidrs", CidrKey.from_buffer_copy(bytes.fromhex(k)), CidrVal.from_buffer_copy(bytes.fromhex(v))
    for k, v in compiled.get("names", ()):
        yield "names", NameKey.from_buffer_copy(bytes.fromhex(k)), NameVal.from_buffer_copy(bytes.fromhex(v))
    for a in compiled["resolvers"]:
        key = AddrKey()
        cdata.memmove(key.addr, bytes.fromhex(a), 16)
        yield "resolvers", key, U8(1)


def rule_counts(compiled: dict) -> dict[str, int]:
    """Entries each rule map of a compiled policy needs."""
    return {"cidrs": len(compiled["cidrs"]), "names": len(compiled.get("names", ())),
            "resolvers": len(compiled["resolvers"])}
