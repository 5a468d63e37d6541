"""``safedeploy policy suggest``: from audit reports, the smallest policy that would have let
the run pass — names rather than addresses wherever the kernel knew the name."""
from __future__ import annotations

import difflib
import ipaddress
import json
from pathlib import Path

from .policy import Dest, Policy, decide, decide_query, load_policy_text, normalize_name, to_mapped


def _needed(records: list[dict], base: Policy | None) -> list[dict]:
    """What the policy must allow: without a base, everything the run did; with one, what
    the base refused."""
    if base is None:
        return records
    return [r for r in records if r["verdict"] != "allowed"]


def _dest_of(rec: dict) -> Dest:
    return Dest(ip=to_mapped(rec["dst_ip"]), port=rec["dst_port"], proto=rec["proto"], name=rec.get("domain"))


def _rule_name(name: str | None) -> str | None:
    """The name as a policy can say it, or None (the kernel reports what was asked, which
    may be no valid rule name: an address, a '*' label, a space...)."""
    if not name or name.replace(".", "").isdigit():
        return None
    try:
        return normalize_name(name)
    except ValueError:
        return None


def _probe(rec: dict) -> bool:
    """A connect to port 0: getaddrinfo()'s address-selection probe (RFC 6724) on a UDP socket
    that sends nothing, or a TCP connect that cannot reach anyone. No rule can name port 0."""
    return rec["kind"] != "dns" and rec["dst_port"] == 0 and rec["proto"] in ("tcp", "udp", "udplite")


def suggest(records: list[dict], base: Policy | None = None, name: str = "suggested") -> tuple[dict, list[str]]:
    """(policy document, problems). Never undoes a deny rule of the base: what one of them
    refused, and raw sockets, become problems for a human to decide instead of rules."""
    doc: dict = json.loads(base.to_json()) if base else {"version": 1, "name": name, "mode": "enforce",
                                                          "default": "deny", "allow": [], "deny": []}
    doc["mode"] = "enforce"
    doc.setdefault("allow", [])
    ports: dict[tuple[str, str, str], set[int]] = {}   # (kind, target, proto) -> ports
    names: set[str] = set()
    resolvers: list[str] = list(doc.get("dns", {}).get("resolvers", []))
    base_denies = {r.text: r for r in base.rules if r.verdict == "deny"} if base else {}
    problems = []
    needed = []
    protocols: list = list(doc.get("protocols", []))
    for rec in _needed(records, base):
        if rec["rule"] == "answer-cut":
            continue  # not a refusal: a note about a large DNS answer
        if rec["rule"] in _KEY_PROBLEMS:
            problems.append(_KEY_PROBLEMS[rec["rule"]].format(**rec))
            continue
        if rec["kind"] != "socket" and _probe(rec):
            continue
        if rec["kind"] == "socket":
            problems.append(f"raw sockets were used (pid {rec['pid']} {rec['comm']}): add `raw_sockets: allow` "
                            "only if the deploy really needs them")
        elif rec["rule"] in base_denies:
            why = base_denies[rec["rule"]].reason
            problems.append(f"{rec.get('domain') or rec['dst_ip']}:{rec['dst_port']}/{rec['proto']} was refused by "
                            f"the base's deny rule {rec['rule']}" + (f" ({why})" if why else "") + ": not overridden")
        else:
            needed.append(rec)
    for rec in needed:
        if rec["rule"] == "dns.resolvers":
            if rec["dst_ip"] not in resolvers:
                resolvers.append(rec["dst_ip"])
            continue
        name = _rule_name(rec.get("domain"))
        if rec.get("domain") and not name:
            problems.append(f"{rec['domain']!r} is not a name a policy can hold: "
                            + ("its lookup is not allowed" if rec["kind"] == "dns" else f"allowing {rec['dst_ip']} instead"))
        if rec["kind"] == "dns":
            if name:
                names.add(name)
            continue
        target = ("domain", name) if name else ("cidr", _host_cidr(rec["dst_ip"]))
        proto = "udp" if rec["proto"] == "udplite" else rec["proto"]
        if proto not in ("tcp", "udp"):  # a named protocol: port-less rules judge it
            if proto not in protocols:
                protocols.append(proto)
            if target[1] not in [r if isinstance(r, str) else r.get(target[0]) for r in doc["allow"]]:
                doc["allow"].append({target[0]: target[1]})
            continue
        ports.setdefault((*target, proto), set()).add(rec["dst_port"])
    covered = {t for (kind, t, _proto) in ports if kind == "domain"}
    for (kind, target, proto), ps in sorted(ports.items()):
        doc["allow"].append({kind: target, "ports": sorted(ps), "protocol": proto})
    for n in sorted(names - covered):
        doc["allow"].append(n)
    if resolvers:
        doc.setdefault("dns", {})["resolvers"] = resolvers
    if protocols:
        doc["protocols"] = protocols
    policy = load_policy_text(json.dumps(doc), "suggested")
    for rec in needed if base else records:
        if (rec["kind"] != "dns" and _probe(rec)) or (rec.get("domain") and not _rule_name(rec["domain"])):
            continue
        if rec["rule"] in _KEY_PROBLEMS or rec["rule"] == "answer-cut" or rec["kind"] == "socket":
            continue
        if rec["kind"] == "dns" and rec.get("domain"):
            dec = decide_query(policy, rec["domain"])
        else:
            dec = decide(policy, _dest_of(rec))
        if dec.verdict != "allow":
            problems.append(f"{rec.get('domain') or rec['dst_ip']}:{rec['dst_port']}/{rec['proto']} is still "
                            f"denied by rule {dec.rule_text}")
    return doc, problems


# refusals by a policy key, not by a destination: a human decides (docs/policy.md)
_KEY_PROBLEMS = {
    "protocols": "IP protocol {proto} was used (pid {pid} {comm}): name it in `protocols:` only if the deploy "
                 "really needs it",
    "source_routes": "a source route was set or sent (pid {pid} {comm}, hop {dst_ip}): add `source_routes: allow` "
                     "only if the deploy really needs it",
    "serve_dns": "DNS was served from port 53 (pid {pid} {comm}): add `serve_dns: allow` only for a DNS server",
    "zerocopy": "data was sent by reference (SO_ZEROCOPY, or DNS by splice/sendfile; pid {pid} {comm}): refused "
                "in policed cgroups whatever the policy (the sender could change what was judged); the deploy "
                "must send without it",
}


def _host_cidr(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def to_yaml(doc: dict) -> str:
    import yaml  # noqa: PLC0415
    order = ["version", "name", "description", "mode", "default", "allow", "deny", "dns", "protocols",
             "raw_sockets", "source_routes", "serve_dns"]
    ordered = {k: doc[k] for k in order if k in doc and doc[k] != []}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None, width=120)


def diff(base_path: Path, new_text: str) -> str:
    old = base_path.read_text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new_text.splitlines(keepends=True), str(base_path), "suggested"))
