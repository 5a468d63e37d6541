"""safedeploy policies: load, validate and normalise them, and decide verdicts.

Loading
-------
``load_policy_file`` / ``load_policy_text`` accept JSON or YAML (version 1, see docs/policy.md). Structure
is checked by ``schemas/policy.schema.json``; the meaning of each value (policy name, domain names,
CIDRs, ports, resolver addresses, at most ``MAX_RULES`` rules) is checked here. Every problem is
reported as one line ``<source>: <json-path>: <message>`` (json-path like ``$.allow[2]``); a
``PolicyError`` carries all of them. Inputs larger than 1 MiB, not UTF-8, YAML anchors/aliases/merge
keys, duplicate keys and JSON NaN/Infinity are refused before anything is built from them.
``jsonschema`` and ``yaml`` are imported only when a document is validated, so importing this module
(for ``decide`` or ``display_ip``) stays cheap. The OCI hook caches policies in kernel form
(``compiler.compile_policy``) and does not import this module on its warm path.

Rules
-----
A rule is a shorthand string ``TARGET[:PORTS][/PROTO]`` or an object with exactly one of ``domain``
or ``cidr`` plus optional ``ports``, ``protocol`` and ``reason``. TARGET is a name (``debian.org``),
a wildcard (``*.debian.org``: names strictly below the base, never the base), an IPv4 address or
CIDR, a bare IPv6 address or CIDR (no port), or ``[IPv6 or CIDR]`` (needed with a port). PORTS is
``443`` or ``80,443``; PROTO is ``tcp`` or ``udp``. Names are lower-cased and lose one trailing dot.
Every address is kept as an IPv6 address: IPv4 ``a.b.c.d/n`` becomes ``::ffff:a.b.c.d/(96+n)``,
so an IPv6 rule whose network contains ``::ffff:0:0/96`` (``::/0`` for example) also covers IPv4.
CIDRs must not have host bits set. Rules are numbered (``Rule.index``) allow rules first, then deny.
``Rule.text`` is a shorthand as written, or for an object the canonical shorthand built from it
(``pkgs.internal:80,443/tcp``, ``10.1.0.0/16:5432``, ``[2001:db8::/32]:443``).

Normalised form
---------------
``Policy.to_json()`` is compact sorted-key JSON with every key present (``dns`` only when given;
``description`` is dropped). A rule appears as its ``text`` when it has no reason, else as an object;
either way it re-parses to an equal ``Rule``. ``Policy.digest`` is the sha256 of that JSON.

Deciding (``decide``) -- the kernel implements exactly this
---------------------------------------------------------
1. DNS resolvers first, and final: when the policy has ``dns.resolvers``, ``dest.port == 53`` and
   ``dest.ip`` is known, the verdict is allow if ``dest.ip`` is a listed resolver, else deny
   (rule text ``dns.resolvers``).
2. A rule *applies* to a destination when its protocol is unset or equals ``dest.proto``, its ports
   are unset or contain ``dest.port`` (a destination without a port meets only port-less rules),
   and: a CIDR rule's network contains ``dest.ip``; an exact name rule's base equals ``dest.name``;
   a wildcard rule's base is a proper label-aligned suffix of ``dest.name``.
3. Name winner, among applying name rules: the highest ``(labels in base, exact over wildcard)``;
   at equal rank deny over allow; then the lowest index.
4. CIDR winner, among applying CIDR rules: the longest prefix (of the mapped IPv6 network); at
   equal prefix deny over allow; then the lowest index.
5. Both winners: if their verdicts agree the name rule decides, otherwise the deny rule decides.
   One winner: it decides. None: ``policy.default`` (rule text ``default``).
6. ``effective``: allow -> ``allowed``; deny -> ``blocked`` (enforce) or ``would-block`` (audit).
"""

import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import caps, resources
from .addr import display_ip  # noqa: F401 — the policy's own address form, used by its callers too
from .events import UNLISTED_REASON
from .errors import SafedeployError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
JsonPath = tuple[str | int, ...]

MAX_POLICY_BYTES = 1 << 20
MAX_RULES = 65_000  # the kernel numbers rules in 16 bits and reserves the top few values
SCHEMA_PATH = Path(resources.path("schemas")) / "policy.schema.json"

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_MAPPED_BITS = int(_V4_MAPPED.network_address)
_PROTOCOLS = ("tcp", "udp")
_POLICY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_LABEL = re.compile(r"[a-z0-9_-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_PREFIX = re.compile(r"[0-9]{1,3}")
_IPV4_LIKE = re.compile(r"[0-9.]+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_KIND_NAMES: dict[type, str] = {dict: "a mapping", list: "a list"}
_TYPE_NAMES = {"string": "a string", "object": "a mapping", "array": "a list", "integer": "an integer",
               "boolean": "true or false"}


DEFAULT_MIN_TTL = 3600  # seconds: how long clients really reuse an address they resolved


class PolicyError(SafedeployError):
    """Invalid policy. ``errors`` holds every problem as ``<source>: <json-path>: <message>``."""

    def __init__(self, errors: Sequence[str]) -> None:
        if not errors:
            raise ValueError("PolicyError needs at least one error line")
        self.errors = list(errors)
        super().__init__(self.errors[0])

    def __str__(self) -> str:
        more = len(self.errors) - 1
        if not more:
            return self.errors[0]
        return f"{self.errors[0]} (and {more} more error{'s' if more > 1 else ''})"

    def lines(self) -> list[str]:
        return list(self.errors)


@dataclass(frozen=True)
class Rule:
    index: int
    verdict: str
    kind: str
    text: str
    name: str | None
    wildcard: bool
    network: ipaddress.IPv6Network | None
    ports: tuple[int, ...] | None
    proto: str | None
    reason: str | None


@dataclass(frozen=True)
class Policy:
    name: str
    mode: str
    default: str
    rules: tuple[Rule, ...]
    resolvers: tuple[ipaddress.IPv6Address, ...] | None
    source: str
    digest: str
    raw_sockets: str = "deny"
    min_ttl: int = DEFAULT_MIN_TTL
    unlisted: str = "resolve"
    capabilities: tuple[str, ...] = ()
    privileged: bool = False
    protocols: tuple[int, ...] = ()  # IP protocol numbers named in `protocols:`, sorted
    source_routes: str = "deny"
    serve_dns: str = "deny"
    connect_error: str = "EPERM"

    def to_json(self) -> str:
        """The canonical normalised document; ``digest`` is the sha256 of it."""
        document: dict[str, Any] = {
            "version": 1,
            "name": self.name,
            "mode": self.mode,
            "default": self.default,
            "allow": [_rule_document(r) for r in self.rules if r.verdict == "allow"],
            "deny": [_rule_document(r) for r in self.rules if r.verdict == "deny"],
        }
        if self.raw_sockets != "deny":
            document["raw_sockets"] = self.raw_sockets
        if self.capabilities:
            document["capabilities"] = list(self.capabilities)
        if self.privileged:
            document["privileged"] = True
        dns: dict[str, Any] = {}
        if self.protocols:
            document["protocols"] = [protocol_name(p) for p in self.protocols]
        if self.source_routes != "deny":
            document["source_routes"] = self.source_routes
        if self.serve_dns != "deny":
            document["serve_dns"] = self.serve_dns
        if self.connect_error != "EPERM":
            document["connect_error"] = self.connect_error
        if self.resolvers is not None:
            dns["resolvers"] = [display_ip(a) for a in self.resolvers]
        if self.min_ttl != DEFAULT_MIN_TTL:
            dns["min_ttl"] = self.min_ttl
        if self.unlisted != "resolve":
            dns["unlisted"] = self.unlisted
        if dns:
            document["dns"] = dns
        return json.dumps(document, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Dest:
    ip: ipaddress.IPv6Address | None
    port: int | None
    proto: str
    name: str | None


@dataclass(frozen=True)
class Decision:
    verdict: str
    rule: Rule | None
    rule_text: str
    reason: str | None
    effective: str


# --------------------------------------------------------------------------- loading


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    source = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_POLICY_BYTES + 1)
    except OSError as error:
        raise PolicyError([_line(source, (), f"cannot read: {error.strerror or error}")]) from None
    fmt = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(Path(source).suffix.lower())
    return load_policy_text(data, source, fmt)


def load_policy_text(text: str | bytes, source: str = "<policy>", fmt: str | None = None) -> Policy:
    """Parse (``fmt`` "json", "yaml" or None to sniff), validate and normalise a policy."""
    if fmt not in ("json", "yaml", None):
        raise ValueError(f"unknown policy format {fmt!r}")
    try:
        document = _parse_document(text, fmt)
        count = sum(len(document[k]) for k in ("allow", "deny") if isinstance(document.get(k), list))
        if count > MAX_RULES:
            raise _DocumentError(f"too many rules: {count} (at most {MAX_RULES})")
        problems = _schema_problems(document)
    except _DocumentError as error:
        raise PolicyError([_line(source, (), str(error))]) from None
    return _build(document, source, problems)


def validate_files(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Every error line for every file; [] when all are valid."""
    errors: list[str] = []
    for path in paths:
        try:
            load_policy_file(path)
        except PolicyError as error:
            errors.extend(error.errors)
    return errors


class _DocumentError(Exception):
    """The document as a whole is unusable (reported at ``$``)."""


def _parse_document(text: str | bytes, fmt: str | None) -> dict[str, Any]:
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise _DocumentError(f"policy is larger than 1 MiB ({size} bytes)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _DocumentError(f"not UTF-8 (invalid byte at offset {error.start})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise _DocumentError("empty policy")
    if fmt is None:
        fmt = "json" if text.lstrip().startswith("{") else "yaml"
    try:
        document = _parse_json(text) if fmt == "json" else _parse_yaml(text)
    except RecursionError:
        raise _DocumentError("policy is nested too deeply") from None
    if document is None:
        raise _DocumentError("empty policy")
    if not isinstance(document, dict):
        raise _DocumentError(f"the policy must be a mapping, got {_show(document)}")
    return document


def _parse_json(text: str) -> Any:
    def no_constant(name: str) -> Any:
        raise _DocumentError(f"{name} is not allowed in a policy")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        for key, value in pairs:
            if key in mapping:
                raise _DocumentError(f"duplicate key {_show(key)}")
            mapping[key] = value
        return mapping

    try:
        return json.loads(text, parse_constant=no_constant, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise _DocumentError(
            f"JSON syntax error at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except ValueError as error:  # e.g. an integer with too many digits
        raise _DocumentError(f"invalid JSON: {error}") from None


def _parse_yaml(text: str) -> Any:
    import yaml

    loader = _yaml_loader()
    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _DocumentError(f"YAML anchors and aliases are not allowed{_at_line(event.start_mark)}")
        return yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _DocumentError(f"invalid YAML{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise _DocumentError(f"YAML error: {str(error).splitlines()[0]}") from None
    except ValueError as error:  # a scalar the resolver accepted but cannot build, e.g. 2024-13-45
        raise _DocumentError(f"invalid YAML value: {error}") from None


@lru_cache(maxsize=1)
def _yaml_loader() -> type:
    import yaml

    class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        """SafeLoader that refuses merge keys, non-string keys and duplicate keys."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[str] = set()
            for key_node, _ in node.value:
                where = _at_line(key_node.start_mark)
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _DocumentError(f"YAML merge keys (<<) are not allowed{where}")
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise _DocumentError(f"keys must be strings, got {_show(key)}{where}")
                if key in seen:
                    raise _DocumentError(f"duplicate key {_show(key)}{where}")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _at_line(mark: Any) -> str:
    return f" (line {mark.line + 1})" if mark is not None else ""


# --------------------------------------------------------------------------- validation


def _schema_problems(document: dict[str, Any]) -> "_Problems":
    try:
        validator = _schema_validator()
    except OSError as error:
        raise _DocumentError(f"cannot read the policy schema {SCHEMA_PATH}: {error.strerror}") from None
    problems = _Problems()
    try:
        for issue in validator.iter_errors(document):
            problems.reject(tuple(issue.absolute_path), _schema_message(issue), _blamed_keys(issue))
    except RecursionError:  # jsonschema reprs the instance of every error
        raise _DocumentError("policy is nested too deeply") from None
    return problems


@lru_cache(maxsize=1)
def _schema_validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text("utf-8")))


def _blamed_keys(error: Any) -> list[str] | None:
    """The keys an error is about when it is about keys of a mapping rather than the mapping itself."""
    if error.validator == "additionalProperties":
        return [k for k in error.instance if k not in error.schema.get("properties", {})]
    if error.validator == "required":
        return [k for k in error.validator_value if k not in error.instance]
    return None


def _schema_message(error: Any) -> str:
    """One readable line for a jsonschema error (its own messages repr whole instances)."""
    kind, value, instance, schema = error.validator, error.validator_value, error.instance, error.schema
    if kind == "type":
        wanted = [value] if isinstance(value, str) else value
        return f"must be {' or '.join(_TYPE_NAMES[t] for t in wanted)}, got {_show(instance)}"
    if kind == "additionalProperties":
        known = list(schema.get("properties", {}))
        extra = ", ".join(_show(k) for k in instance if k not in known)
        return f"unknown key {extra} (allowed: {', '.join(known)})"
    if kind == "required":
        missing = ", ".join(_show(k) for k in value if k not in instance)
        return f"missing required key {missing}"
    if kind == "const":
        return f"must be {value!r}, got {_show(instance)}"
    if kind == "enum":
        return f"must be {' or '.join(repr(v) for v in value)}, got {_show(instance)}"
    if kind == "pattern":
        return f"must match {value}, got {_show(instance)}"
    if kind in ("minimum", "maximum"):
        return f"must be between {schema['minimum']} and {schema['maximum']}, got {_show(instance)}"
    if kind in ("minItems", "minLength"):
        return "must not be empty"
    if kind == "uniqueItems":
        return "must not contain duplicates"
    if kind == "oneOf" and isinstance(instance, dict):
        if "domain" in instance and "cidr" in instance:
            return "a rule takes either 'domain' or 'cidr', not both"
        return "a rule needs 'domain' or 'cidr'"
    return str(error.message)


class _Problems:
    """Collects (path, message) problems and remembers which values the schema rejected."""

    def __init__(self) -> None:
        self.items: list[tuple[JsonPath, str]] = []
        self._rejected: set[JsonPath] = set()
        self._touched: set[JsonPath] = set()  # rejected values and everything above them

    def add(self, path: JsonPath, message: str) -> None:
        self.items.append((path, message))

    def reject(self, path: JsonPath, message: str, keys: list[str] | None = None) -> None:
        """A schema problem at path: the value there is unusable, or only its ``keys`` are."""
        self.add(path, message)
        for rejected in [path] if keys is None else [path + (key,) for key in keys]:
            self._rejected.add(rejected)
            self._touched.update(rejected[:k] for k in range(len(rejected) + 1))

    def usable(self, path: JsonPath) -> bool:
        """True when the schema accepted the value at path as a whole (no problem at it or above)."""
        return not any(path[:k] in self._rejected for k in range(len(path) + 1))

    def clean(self, path: JsonPath) -> bool:
        """True when the schema found no problem at, above or below path."""
        return path not in self._touched and self.usable(path)

    def raise_if_any(self, source: str) -> None:
        if self.items:
            ordered = sorted(self.items, key=lambda item: [(isinstance(p, str), p) for p in item[0]])
            lines = [_line(source, path, message) for path, message in ordered]
            raise PolicyError(list(dict.fromkeys(lines)))


def _build(document: dict[str, Any], source: str, problems: _Problems) -> Policy:
    """Check the meaning of every value the schema accepted, and build the Policy."""
    name: Any = document.get("name")
    if problems.clean(("name",)) and not (isinstance(name, str) and _POLICY_NAME.fullmatch(name)):
        problems.add(("name",), f"must match [A-Za-z0-9_.-]{{1,64}}, got {_show(name)}")
    rules: list[Rule] = []
    index = 0
    for verdict in ("allow", "deny"):
        items = document.get(verdict, [])
        if not problems.usable((verdict,)):
            continue
        for position, item in enumerate(items):
            path: JsonPath = (verdict, position)
            if problems.clean(path):
                try:
                    rules.append(_parse_rule(item, index, verdict))
                except ValueError as error:
                    problems.add(path, str(error))
            index += 1
    resolvers: tuple[ipaddress.IPv6Address, ...] | None = None
    if "dns" in document and "resolvers" in document["dns"] and problems.usable(("dns", "resolvers")):
        found: set[ipaddress.IPv6Address] = set()
        for position, text in enumerate(document["dns"]["resolvers"]):
            path = ("dns", "resolvers", position)
            if problems.clean(path):
                try:
                    found.add(to_mapped(text))
                except ValueError as error:
                    problems.add(path, f"{error} (a resolver is a plain IP address)")
        resolvers = tuple(sorted(found))
    capabilities: list[str] = []
    if problems.usable(("capabilities",)):
        for position, text in enumerate(document.get("capabilities", [])):
            if problems.clean(("capabilities", position)):
                try:
                    cap = caps.normalize(text)
                except caps.CapError as error:
                    problems.add(("capabilities", position), str(error))
                    continue
                if cap not in caps.DANGEROUS:
                    problems.add(("capabilities", position), f"{cap} is never refused or dropped; list only "
                                 f"{', '.join(c[4:] for c in caps.DANGEROUS)}")
                elif cap not in capabilities:
                    capabilities.append(cap)
    protocols: set[int] = set()
    if "protocols" in document and problems.usable(("protocols",)):
        for position, item in enumerate(document["protocols"]):
            path = ("protocols", position)
            if problems.clean(path):
                try:
                    protocols.add(parse_protocol(item))
                except ValueError as error:
                    problems.add(path, str(error))
    problems.raise_if_any(source)
    policy = Policy(
        name=name,
        mode=document.get("mode", "enforce"),
        default=document.get("default", "deny"),
        raw_sockets=document.get("raw_sockets", "deny"),
        min_ttl=document.get("dns", {}).get("min_ttl", DEFAULT_MIN_TTL),
        unlisted=document.get("dns", {}).get("unlisted", "resolve"),
        capabilities=tuple(c for c in caps.DANGEROUS if c in capabilities),
        privileged=document.get("privileged", False) is True,
        protocols=tuple(sorted(protocols)),
        source_routes=document.get("source_routes", "deny"),
        serve_dns=document.get("serve_dns", "deny"),
        connect_error=document.get("connect_error", "EPERM"),
        rules=tuple(rules),
        resolvers=resolvers,
        source=source,
        digest="",
    )
    return replace(policy, digest=hashlib.sha256(policy.to_json().encode()).hexdigest())


# --------------------------------------------------------------------------- protocols

# IP protocols a policy may name in `protocols:` (IANA numbers); tcp and udp are judged by the rules
IP_PROTOCOLS = {"icmp": 1, "igmp": 2, "ipip": 4, "egp": 8, "pup": 12, "idp": 22, "tp": 29, "dccp": 33, "ipv6": 41,
                "rsvp": 46, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58, "mtp": 92, "beetph": 94, "encap": 98,
                "pim": 103, "comp": 108, "l2tp": 115, "sctp": 132, "mpls": 137, "ethernet": 143}
_PROTOCOL_NAMES = {number: name for name, number in IP_PROTOCOLS.items()}
_JUDGED_AS = {"tcp": "tcp", "udp": "udp", "udplite": "udp", "mptcp": "tcp", 6: "tcp", 17: "udp", 136: "udp", 262: "tcp"}


def parse_protocol(item: str | int) -> int:
    """An IP protocol number from a name or number of `protocols:`; ValueError when invalid."""
    if isinstance(item, bool):
        raise ValueError(f"invalid protocol {_show(item)}")
    judged = _JUDGED_AS.get(item.lower() if isinstance(item, str) else item)
    if judged is not None:
        raise ValueError(f"{_show(item)} is judged as {judged} by the rules: do not list it in protocols")
    if isinstance(item, int):
        if not 0 <= item <= 255:
            raise ValueError(f"invalid protocol number {item} (expected 0-255)")
        return item
    number = IP_PROTOCOLS.get(item.lower())
    if number is None:
        raise ValueError(f"unknown protocol {_show(item)} (known: {', '.join(sorted(IP_PROTOCOLS))}, or a number)")
    return number


def protocol_name(number: int) -> str | int:
    """The name of an IP protocol number as `protocols:` writes it (the number when unnamed)."""
    return _PROTOCOL_NAMES.get(number, number)


# --------------------------------------------------------------------------- rules


def _parse_rule(item: str | dict[str, Any], index: int, verdict: str) -> Rule:
    if isinstance(item, str):
        return _shorthand_rule(item, index, verdict)
    return _object_rule(item, index, verdict)


def _shorthand_rule(text: str, index: int, verdict: str) -> Rule:
    body, proto = _split_proto(text)
    target, ports, bracketed = _split_ports(body)
    if bracketed or _is_address_like(target):
        return Rule(index, verdict, "cidr", text, None, False, _parse_network(target), ports, proto, None)
    name, wildcard = _parse_name_pattern(target)
    return Rule(index, verdict, "name", text, name, wildcard, None, ports, proto, None)


def _object_rule(item: dict[str, Any], index: int, verdict: str) -> Rule:
    ports = tuple(sorted(int(p) for p in item["ports"])) if "ports" in item else None
    proto = item.get("protocol")
    reason = item.get("reason")
    if reason is not None and not reason.isprintable():
        raise ValueError("reason must be one line of printable text")
    if "domain" in item:
        if _IPV4_LIKE.fullmatch(item["domain"]):
            raise ValueError(f"domain {_show(item['domain'])} is an address: use cidr")
        name, wildcard = _parse_name_pattern(item["domain"])
        text = _rule_text("name", name, wildcard, None, ports, proto)
        return Rule(index, verdict, "name", text, name, wildcard, None, ports, proto, reason)
    network = _parse_network(item["cidr"])
    text = _rule_text("cidr", None, False, network, ports, proto)
    return Rule(index, verdict, "cidr", text, None, False, network, ports, proto, reason)


def _split_proto(text: str) -> tuple[str, str | None]:
    head, slash, tail = text.rpartition("/")
    return (head, tail) if slash and tail in _PROTOCOLS else (text, None)


def _split_ports(text: str) -> tuple[str, tuple[int, ...] | None, bool]:
    """(target, ports, bracketed) from ``target``, ``target:ports`` or ``[target]:ports``."""
    if text.startswith("["):
        target, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"missing ']' in {_show(text)}")
        if not rest:
            return target, None, True
        if not rest.startswith(":"):
            raise ValueError(f"expected ':PORT' after ']' in {_show(text)}")
        return target, _parse_ports(rest[1:]), True
    if text.count(":") > 1:  # a bare IPv6 address or CIDR; with a port it must be bracketed
        return text, None, False
    target, colon, port_text = text.partition(":")
    return target, _parse_ports(port_text) if colon else None, False


def _parse_ports(text: str) -> tuple[int, ...]:
    ports = []
    for part in text.split(","):
        if not _PORT.fullmatch(part) or not 1 <= int(part) <= 65535:
            raise ValueError(f"invalid port {_show(part)} (expected 1-65535)")
        ports.append(int(part))
    if len(set(ports)) != len(ports):
        raise ValueError(f"duplicate port in {_show(text)}")
    return tuple(sorted(ports))


def _is_address_like(target: str) -> bool:
    return ":" in target or "/" in target or _IPV4_LIKE.fullmatch(target) is not None


def _parse_name_pattern(text: str) -> tuple[str, bool]:
    """(base, wildcard) from ``name`` or ``*.name``."""
    if text.startswith("*."):
        return normalize_name(text[2:]), True
    return normalize_name(text), False


def _parse_address(text: str) -> IPAddress:
    if "%" in text:
        raise ValueError(f"invalid IP address {_show(text)}: zone ids are not allowed")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"invalid IP address {_show(text)}") from None


def _parse_network(text: str) -> ipaddress.IPv6Network:
    address_text, slash, prefix_text = text.partition("/")
    try:
        address = _parse_address(address_text)
    except ValueError:
        raise ValueError(f"invalid IP address or CIDR {_show(text)}") from None
    width: int = address.max_prefixlen
    if not slash:
        prefix = width
    elif _PREFIX.fullmatch(prefix_text) and int(prefix_text) <= width:
        prefix = int(prefix_text)
    else:
        raise ValueError(f"invalid prefix length in {_show(text)} (expected /0 to /{width})")
    try:
        network = ipaddress.ip_network((address, prefix))
    except ValueError:
        suggestion = ipaddress.ip_network((address, prefix), strict=False)
        raise ValueError(f"{_show(text)} has host bits set (did you mean {suggestion}?)") from None
    if isinstance(network, ipaddress.IPv4Network):
        return ipaddress.IPv6Network((_V4_MAPPED_BITS | int(network.network_address), 96 + prefix))
    return network


def _network_text(network: ipaddress.IPv6Network) -> str:
    """CIDR text, in IPv4 form for a network inside ::ffff:0:0/96."""
    v4 = network.network_address.ipv4_mapped
    if network.prefixlen >= 96 and v4 is not None:
        return f"{v4}/{network.prefixlen - 96}"
    return network.compressed


def _rule_text(
    kind: str,
    name: str | None,
    wildcard: bool,
    network: ipaddress.IPv6Network | None,
    ports: tuple[int, ...] | None,
    proto: str | None,
) -> str:
    """Compact canonical shorthand of an object rule, e.g. ``pkgs.internal:80,443/tcp``."""
    if kind == "name":
        text = f"*.{name}" if wildcard else str(name)
    else:
        assert network is not None
        text = _network_text(network)
        if ports is not None and ":" in text:
            text = f"[{text}]"
    if ports is not None:
        text += ":" + ",".join(map(str, ports))
    if proto is not None:
        text += "/" + proto
    return text


def _rule_document(rule: Rule) -> str | dict[str, Any]:
    """A rule in the normalised document: its text (which re-parses to the same Rule) or an object."""
    if rule.reason is None:
        return rule.text
    document: dict[str, Any]
    if rule.kind == "name":
        document = {"domain": f"*.{rule.name}" if rule.wildcard else rule.name}
    else:
        assert rule.network is not None
        document = {"cidr": _network_text(rule.network)}
    if rule.ports is not None:
        document["ports"] = list(rule.ports)
    if rule.proto is not None:
        document["protocol"] = rule.proto
    document["reason"] = rule.reason
    return document


# --------------------------------------------------------------------------- names, addresses, destinations


def normalize_name(name: str) -> str:
    """Lower-case, drop one trailing dot; ValueError unless every label is [a-z0-9_-]{1,63}."""
    if not name.isascii():
        raise ValueError(f"invalid name {_show(name)}: only ASCII letters, digits, '-' and '_'")
    folded = _fold(name)
    if not folded:
        raise ValueError("invalid name: empty")
    if len(folded) > 253:
        raise ValueError(f"invalid name {_show(name)}: longer than 253 characters")
    for label in folded.split("."):
        if not label:
            raise ValueError(f"invalid name {_show(name)}: empty label")
        if "*" in label:
            raise ValueError(f"invalid name {_show(name)}: '*' is allowed only as a leading '*.' in a rule")
        if len(label) > 63:
            raise ValueError(f"invalid name {_show(name)}: label longer than 63 characters")
        if not _LABEL.fullmatch(label):
            raise ValueError(f"invalid name {_show(name)}: only letters, digits, '-' and '_' in labels")
    return folded


def _fold(name: str) -> str:
    folded = name.lower() if name.isascii() else name
    return folded[:-1] if folded.endswith(".") else folded


def to_mapped(addr: str | IPAddress) -> ipaddress.IPv6Address:
    """IPv6 form of an address: IPv4 a.b.c.d becomes ::ffff:a.b.c.d."""
    if isinstance(addr, str):
        addr = _parse_address(addr)
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(_V4_MAPPED_BITS | int(addr))
    return ipaddress.IPv6Address(int(addr))


def parse_dest(text: str, proto: str = "tcp") -> Dest:
    """``name``, ``name:port``, ``ip``, ``ip:port``, ``v6``, ``[v6]:port``; ValueError when invalid."""
    if proto in ("udplite", "mptcp"):
        proto = _JUDGED_AS[proto]
    if proto not in _PROTOCOLS and proto not in IP_PROTOCOLS:
        raise ValueError(f"invalid protocol {_show(proto)} (expected tcp, udp or an IP protocol name)")
    target, ports, bracketed = _split_ports(text)
    if ports is not None and len(ports) != 1:
        raise ValueError(f"a destination has one port, got {_show(text)}")
    port = ports[0] if ports else None
    if bracketed or _is_address_like(target):
        if "/" in target:
            raise ValueError(f"a destination is one address, not a network: {_show(text)}")
        return Dest(ip=to_mapped(_parse_address(target)), port=port, proto=proto, name=None)
    return Dest(ip=None, port=port, proto=proto, name=normalize_name(target))


# --------------------------------------------------------------------------- deciding


def name_matches(rule: Rule, name: str) -> bool:
    """Exact rule: name equals the base. Wildcard rule: name ends with '.' + base."""
    if rule.kind != "name":
        return False
    folded = _fold(name)
    return folded.endswith(f".{rule.name}") if rule.wildcard else folded == rule.name


def decide_query(policy: Policy, name: str) -> Decision:
    """The verdict for a DNS query of ``name`` (the kernel drops denied queries).

    A query asks for a name, not a port: allow rules count whatever their ports or
    protocol (the name is needed to reach them), deny rules only when they have neither
    (a port-narrowed deny narrows connections, not lookups). Among those the most
    specific wins, deny beating allow at equal rank, then the lowest index; none gives
    ``policy.default``. ``name`` must be normalisable (ValueError otherwise); the kernel
    gives an unparseable query the safe verdict instead: deny when the policy has default
    deny or any name deny rule.
    """
    folded = normalize_name(name)
    labels = folded.split(".")
    if len(labels) > 2 and labels[0].startswith("_") and labels[1].startswith("_"):
        folded = ".".join(labels[2:])   # _service._proto.NAME (RFC 2782) is a lookup of NAME
    applying = [r for r in policy.rules if r.kind == "name" and name_matches(r, folded)
                and (r.verdict == "allow" or (r.ports is None and r.proto is None))]
    winner = max(applying, key=_name_rank, default=None)
    if winner is None:
        if policy.default == "deny" and policy.unlisted == "resolve":
            return _decision(policy, "allow", None, "dns.unlisted", UNLISTED_REASON)
        return _decision(policy, policy.default, None, "default", None)
    return _decision(policy, winner.verdict, winner, winner.text, winner.reason)


def decide(policy: Policy, dest: Dest) -> Decision:
    """The verdict for a destination; the rules are in the module docstring."""
    ip = None if dest.ip is None else to_mapped(dest.ip)
    if dest.proto in ("udplite", "mptcp"):  # judged as udp / tcp
        dest = Dest(ip=dest.ip, port=dest.port, proto=_JUDGED_AS[dest.proto], name=dest.name)
    if dest.proto not in _PROTOCOLS:  # another IP protocol: named in `protocols:`, or denied
        if IP_PROTOCOLS.get(dest.proto) not in policy.protocols:
            return _decision(policy, "deny", None, "protocols",
                             f"protocols: {dest.proto} is not named (IP protocols other than tcp and udp are denied)")
        dest = Dest(ip=dest.ip, port=None, proto=dest.proto, name=dest.name)  # judged by port-less rules only
    if policy.resolvers is not None and dest.port == 53 and ip is not None:
        if ip in policy.resolvers:
            return _decision(policy, "allow", None, "dns.resolvers", None)
        return _decision(policy, "deny", None, "dns.resolvers", "dns.resolvers: not a listed resolver")
    applying = [r for r in policy.rules if _applies(r, dest, ip)]
    by_name = max((r for r in applying if r.kind == "name"), key=_name_rank, default=None)
    by_cidr = max((r for r in applying if r.kind == "cidr"), key=_cidr_rank, default=None)
    if by_name is None or by_cidr is None:
        winner = by_name or by_cidr
    elif by_name.verdict == by_cidr.verdict or by_name.verdict == "deny":
        winner = by_name
    else:
        winner = by_cidr
    if winner is None:
        return _decision(policy, policy.default, None, "default", None)
    return _decision(policy, winner.verdict, winner, winner.text, winner.reason)


def _applies(rule: Rule, dest: Dest, ip: ipaddress.IPv6Address | None) -> bool:
    if rule.proto is not None and rule.proto != dest.proto:
        return False
    if rule.ports is not None and dest.port not in rule.ports:
        return False
    if rule.kind == "cidr":
        return ip is not None and rule.network is not None and ip in rule.network
    return dest.name is not None and name_matches(rule, dest.name)


def _name_rank(rule: Rule) -> tuple[int, bool, bool, int]:
    assert rule.name is not None
    return (rule.name.count(".") + 1, not rule.wildcard, rule.verdict == "deny", -rule.index)


def _cidr_rank(rule: Rule) -> tuple[int, bool, int]:
    assert rule.network is not None
    return (rule.network.prefixlen, rule.verdict == "deny", -rule.index)


def _decision(policy: Policy, verdict: str, rule: Rule | None, rule_text: str, reason: str | None) -> Decision:
    if verdict == "allow":
        effective = "allowed"
    else:
        effective = "would-block" if policy.mode == "audit" else "blocked"
    return Decision(verdict=verdict, rule=rule, rule_text=rule_text, reason=reason, effective=effective)


# --------------------------------------------------------------------------- messages


def _line(source: str, path: JsonPath, message: str) -> str:
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], f"{source}: {where}: {message}")


def _show(value: Any) -> str:
    """A short one-line rendering of a document value for messages."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int) and value.bit_length() > 64:
        return "a huge integer"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return _KIND_NAMES.get(type(value), f"a {type(value).__name__}")
