"""Tests for ocihook.policy: loading, validation, normalisation and decide()."""

import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocihook import resources
from ocihook.policy import (
    MAX_POLICY_BYTES,
    MAX_RULES,
    SCHEMA_PATH,
    Decision,
    Dest,
    Policy,
    PolicyError,
    Rule,
    decide,
    display_ip,
    load_policy_file,
    load_policy_text,
    name_matches,
    normalize_name,
    parse_dest,
    to_mapped,
    validate_files,
)

POLICIES = Path(resources.path("policies"))    # examples/policies, or the installed package's copy
EXAMPLES = sorted(POLICIES.glob("*.yaml"))


def policy(*allow, deny=(), mode="enforce", default="deny", resolvers=None) -> Policy:
    document = {"version": 1, "name": "t", "mode": mode, "default": default,
                "allow": list(allow), "deny": list(deny)}
    if resolvers is not None:
        document["dns"] = {"resolvers": resolvers}
    return load_policy_text(json.dumps(document), "t.json")


def errors_of(text, fmt=None, source="t.yaml") -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, source, fmt)
    error = caught.value
    assert "\n" not in str(error) and str(error).startswith(error.errors[0])
    for line in error.errors:
        assert line.isprintable(), line
        assert line.startswith(f"{source}: $"), line
    return error.errors


def assert_error(text, path, fragment, fmt=None, source="t.yaml") -> None:
    lines = errors_of(text, fmt, source)
    prefix = f"{source}: {path}: "
    assert any(line.startswith(prefix) and fragment in line for line in lines), lines


def rule_of(text_or_object, verdict="allow") -> Rule:
    return policy(text_or_object).rules[0] if verdict == "allow" else policy(deny=[text_or_object]).rules[0]


def mapped_net(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


# --------------------------------------------------------------------------- schema, examples, imports


def test_schema_is_valid_2020_12():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    import yaml

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(path.read_text()))
    assert validate_files([path]) == []
    loaded = load_policy_file(path)
    for rule in loaded.rules:
        assert rule.kind == "name" or rule.network.is_loopback or _documentation(rule.network), rule


def _documentation(network: ipaddress.IPv6Network) -> bool:
    ranges = ["::ffff:192.0.2.0/120", "::ffff:198.51.100.0/120", "::ffff:203.0.113.0/120",
              "::ffff:127.0.0.0/104", "2001:db8::/32"]
    return any(network.subnet_of(ipaddress.IPv6Network(r)) for r in ranges)


def test_examples_present():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "mysql-rollout.yaml", "audit.yaml"}


def test_demo_example_semantics():
    demo = load_policy_file(POLICIES / "demo.yaml")
    assert (demo.mode, demo.default) == ("enforce", "deny")
    assert decide(demo, parse_dest("127.0.0.1:8080")).effective == "allowed"
    blocked = decide(demo, parse_dest("127.0.0.2:443"))
    assert blocked.effective == "blocked"
    assert blocked.reason == "circular: auth service down in this outage"
    assert decide(demo, parse_dest("127.0.0.1:22")).rule_text == "default"


def test_audit_example_is_audit():
    audit = load_policy_file(POLICIES / "audit.yaml")
    assert audit.mode == "audit"
    assert decide(audit, parse_dest("auth.example.com:443")).effective == "would-block"


def test_module_imports_stay_light():
    code = (
        "import json, sys\n"
        "import ocihook.policy as p\n"
        "p.display_ip(p.to_mapped('10.0.0.1')); p.parse_dest('a.com:443')\n"
        "heavy = {'jsonschema', 'yaml', 'bcc', 'typer', 'rich'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": resources.PKG_ROOT}
    subprocess.run([sys.executable, "-c", code], cwd=resources.PKG_ROOT, env=env, check=True)


# --------------------------------------------------------------------------- shorthand and object rules

V4_8 = "::ffff:a00:0/104"  # 10.0.0.0/8


@pytest.mark.parametrize(
    "text, kind, name, wildcard, network, ports, proto",
    [
        ("debian.org", "name", "debian.org", False, None, None, None),
        ("*.debian.org", "name", "debian.org", True, None, None, None),
        ("*.com", "name", "com", True, None, None, None),
        ("Debian.ORG.", "name", "debian.org", False, None, None, None),
        ("mirror.internal:443", "name", "mirror.internal", False, None, (443,), None),
        ("mirror.internal:443,80", "name", "mirror.internal", False, None, (80, 443), None),
        ("_srv.example-1.com/udp", "name", "_srv.example-1.com", False, None, None, "udp"),
        ("pkgs.internal:80,443/tcp", "name", "pkgs.internal", False, None, (80, 443), "tcp"),
        ("localhost", "name", "localhost", False, None, None, None),
        ("127.0.0.0/8", "cidr", None, False, "::ffff:7f00:0/104", None, None),
        ("10.0.0.0/8", "cidr", None, False, V4_8, None, None),
        ("0.0.0.0/0", "cidr", None, False, "::ffff:0:0/96", None, None),
        ("10.0.0.1", "cidr", None, False, "::ffff:a00:1/128", None, None),
        ("10.0.0.1:80", "cidr", None, False, "::ffff:a00:1/128", (80,), None),
        ("10.1.0.0/16:5432", "cidr", None, False, "::ffff:a01:0/112", (5432,), None),
        ("10.1.0.0/16:5432/tcp", "cidr", None, False, "::ffff:a01:0/112", (5432,), "tcp"),
        ("2001:db8::/32", "cidr", None, False, "2001:db8::/32", None, None),
        ("2001:db8::1", "cidr", None, False, "2001:db8::1/128", None, None),
        ("2001:db8::1/udp", "cidr", None, False, "2001:db8::1/128", None, "udp"),
        ("[2001:db8::1]:443", "cidr", None, False, "2001:db8::1/128", (443,), None),
        ("[2001:db8::1]", "cidr", None, False, "2001:db8::1/128", None, None),
        ("[2001:db8::/32]:443", "cidr", None, False, "2001:db8::/32", (443,), None),
        ("[10.0.0.0/8]:53/udp", "cidr", None, False, V4_8, (53,), "udp"),
        ("::ffff:10.0.0.0/104", "cidr", None, False, V4_8, None, None),
        ("::1", "cidr", None, False, "::1/128", None, None),
        ("::/0", "cidr", None, False, "::/0", None, None),
    ],
)
def test_shorthand(text, kind, name, wildcard, network, ports, proto):
    rule = rule_of(text)
    expected_network = None if network is None else mapped_net(network)
    assert (rule.kind, rule.name, rule.wildcard, rule.network, rule.ports, rule.proto) == (
        kind, name, wildcard, expected_network, ports, proto)
    assert rule.text == text and rule.reason is None and rule.verdict == "allow" and rule.index == 0
    assert rule.network is None or isinstance(rule.network, ipaddress.IPv6Network)


@pytest.mark.parametrize(
    "obj, kind, name, wildcard, network, ports, proto, text",
    [
        ({"domain": "pkgs.internal", "ports": [443, 80], "protocol": "tcp"},
         "name", "pkgs.internal", False, None, (80, 443), "tcp", "pkgs.internal:80,443/tcp"),
        ({"domain": "*.GitHub.com."}, "name", "github.com", True, None, None, None, "*.github.com"),
        ({"domain": "a.b", "protocol": "udp"}, "name", "a.b", False, None, None, "udp", "a.b/udp"),
        ({"cidr": "10.1.0.0/16", "ports": [5432]}, "cidr", None, False, "::ffff:a01:0/112", (5432,), None,
         "10.1.0.0/16:5432"),
        ({"cidr": "10.0.0.1"}, "cidr", None, False, "::ffff:a00:1/128", None, None, "10.0.0.1/32"),
        ({"cidr": "2001:db8::/32", "ports": [443]}, "cidr", None, False, "2001:db8::/32", (443,), None,
         "[2001:db8::/32]:443"),
        ({"cidr": "2001:DB8::1", "protocol": "tcp"}, "cidr", None, False, "2001:db8::1/128", None, "tcp",
         "2001:db8::1/128/tcp"),
        ({"cidr": "::ffff:10.0.0.0/104"}, "cidr", None, False, V4_8, None, None, "10.0.0.0/8"),
    ],
)
def test_object_rule(obj, kind, name, wildcard, network, ports, proto, text):
    rule = rule_of({**obj, "reason": "why"}, verdict="deny")
    expected_network = None if network is None else mapped_net(network)
    assert (rule.kind, rule.name, rule.wildcard, rule.network, rule.ports, rule.proto) == (
        kind, name, wildcard, expected_network, ports, proto)
    assert (rule.text, rule.reason, rule.verdict) == (text, "why", "deny")
    reparsed = rule_of(text)  # the canonical text is itself a valid shorthand for the same rule
    assert (reparsed.kind, reparsed.name, reparsed.wildcard, reparsed.network, reparsed.ports,
            reparsed.proto) == (rule.kind, rule.name, rule.wildcard, rule.network, rule.ports, rule.proto)


def test_rule_indices_allow_then_deny():
    p = policy("a.com", "b.com", deny=["c.com", "10.0.0.0/8"])
    assert [(r.index, r.verdict, r.text) for r in p.rules] == [
        (0, "allow", "a.com"), (1, "allow", "b.com"), (2, "deny", "c.com"), (3, "deny", "10.0.0.0/8")]


def test_defaults_and_optional_sections():
    p = load_policy_text("version: 1\nname: minimal\n")
    assert (p.name, p.mode, p.default, p.rules, p.resolvers, p.source) == (
        "minimal", "enforce", "deny", (), None, "<policy>")


def test_resolvers_are_mapped_sorted_and_unique():
    p = policy(resolvers=["::1", "127.0.0.53", "::ffff:127.0.0.53", "2001:db8::53"])
    assert p.resolvers == (ipaddress.IPv6Address("::1"), ipaddress.IPv6Address("::ffff:127.0.0.53"),
                           ipaddress.IPv6Address("2001:db8::53"))
    assert policy(resolvers=[]).resolvers == ()


def test_json_and_yaml_give_the_same_policy():
    yaml_text = "version: 1\nname: t\nallow: [a.com, {cidr: 10.0.0.0/8, ports: [22]}]\n"
    json_text = '{"version": 1, "name": "t", "allow": ["a.com", {"cidr": "10.0.0.0/8", "ports": [22]}]}'
    assert load_policy_text(yaml_text) == load_policy_text(json_text) == load_policy_text(json_text, fmt="yaml")
    assert load_policy_text(b"\xef\xbb\xbf" + json_text.encode()) == load_policy_text(json_text)


# --------------------------------------------------------------------------- errors

DOC = "version: 1\nname: t\n"


@pytest.mark.parametrize(
    "text, path, fragment",
    [
        # unknown keys, everywhere
        (DOC + "colour: red\n", "$", "unknown key 'colour'"),
        (DOC + "allow: [{domain: a.com, prots: [1]}]\n", "$.allow[0]", "unknown key 'prots'"),
        (DOC + "dns: {resolvers: [], timeout: 1}\n", "$.dns", "unknown key 'timeout'"),
        # version, name, mode, default, description
        ("name: t\n", "$", "missing required key 'version'"),
        ("version: 1\n", "$", "missing required key 'name'"),
        ("version: 2\nname: t\n", "$.version", "must be 1"),
        ("version: '1'\nname: t\n", "$.version", "must be 1"),
        ("version: true\nname: t\n", "$.version", "must be 1"),
        ("version: 1\nname: bad name\n", "$.name", "must match"),
        ("version: 1\nname: " + "n" * 65 + "\n", "$.name", "must match"),
        ('{"version": 1, "name": "x\\n"}', "$.name", "must match"),
        ("version: 1\nname: 5\n", "$.name", "must be a string"),
        ("version: 1\nname: ''\n", "$.name", "must match"),
        (DOC + "mode: block\n", "$.mode", "must be 'enforce' or 'audit'"),
        (DOC + "mode: on\n", "$.mode", "got True"),
        (DOC + "default: maybe\n", "$.default", "must be 'deny' or 'allow'"),
        (DOC + "description: 5\n", "$.description", "must be a string"),
        (DOC + "allow: a.com\n", "$.allow", "must be a list"),
        (DOC + "deny: {a: 1}\n", "$.deny", "must be a list"),
        # rule structure
        (DOC + "allow: [5]\n", "$.allow[0]", "must be a string or a mapping"),
        (DOC + "allow: ['']\n", "$.allow[0]", "must not be empty"),
        (DOC + "allow: [{domain: a.com, cidr: 10.0.0.0/8}]\n", "$.allow[0]", "not both"),
        (DOC + "allow: [{ports: [80]}]\n", "$.allow[0]", "needs 'domain' or 'cidr'"),
        (DOC + "allow: [{domain: ''}]\n", "$.allow[0].domain", "must not be empty"),
        (DOC + "allow: [{domain: a.com, protocol: sctp}]\n", "$.allow[0].protocol", "'tcp' or 'udp'"),
        (DOC + "allow: [{domain: a.com, reason: 5}]\n", "$.allow[0].reason", "must be a string"),
        (DOC + 'deny: [{domain: a.com, reason: "two\\nlines"}]\n', "$.deny[0]", "one line"),
        # ports
        (DOC + "allow: [{domain: a.com, ports: []}]\n", "$.allow[0].ports", "must not be empty"),
        (DOC + "allow: [{domain: a.com, ports: [0]}]\n", "$.allow[0].ports[0]", "between 1 and 65535"),
        (DOC + "allow: [{domain: a.com, ports: [65536]}]\n", "$.allow[0].ports[0]", "between 1 and 65535"),
        (DOC + "allow: [{domain: a.com, ports: [80, 80]}]\n", "$.allow[0].ports", "duplicates"),
        (DOC + "allow: [{domain: a.com, ports: ['80']}]\n", "$.allow[0].ports[0]", "must be an integer"),
        (DOC + "allow: [{domain: a.com, ports: [true]}]\n", "$.allow[0].ports[0]", "must be an integer"),
        (DOC + "allow: [{domain: a.com, ports: 80}]\n", "$.allow[0].ports", "must be a list"),
        (DOC + "allow: ['a.com:0']\n", "$.allow[0]", "invalid port '0'"),
        (DOC + "allow: ['a.com:65536']\n", "$.allow[0]", "invalid port '65536'"),
        (DOC + "allow: ['a.com:']\n", "$.allow[0]", "invalid port ''"),
        (DOC + "allow: ['a.com:+80']\n", "$.allow[0]", "invalid port '+80'"),
        (DOC + "allow: ['a.com:80,80']\n", "$.allow[0]", "duplicate port"),
        (DOC + "allow: ['[::1]x']\n", "$.allow[0]", "expected ':PORT'"),
        (DOC + "allow: ['[::1:80']\n", "$.allow[0]", "missing ']'"),
        # CIDRs and addresses
        (DOC + "allow: ['10.0.0.1/8']\n", "$.allow[0]", "host bits set (did you mean 10.0.0.0/8?)"),
        (DOC + "allow: ['2001:db8::1/32']\n", "$.allow[0]", "host bits set"),
        (DOC + "allow: ['10.0.0.0/33']\n", "$.allow[0]", "invalid prefix length"),
        (DOC + "allow: ['2001:db8::/129']\n", "$.allow[0]", "invalid prefix length"),
        (DOC + "allow: ['10.0.0.0/255.0.0.0']\n", "$.allow[0]", "invalid prefix length"),
        (DOC + "allow: ['10.0.0.0/']\n", "$.allow[0]", "invalid prefix length"),
        (DOC + "allow: ['10.0.0.256']\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: ['10.0.0']\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: ['010.0.0.1']\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: ['2001:db8::g']\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: ['fe80::1%eth0']\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: ['a.com/sctp']\n", "$.allow[0]", "invalid IP address or CIDR"),
        (DOC + "allow: ['[a.com]:80']\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: [{cidr: a.com}]\n", "$.allow[0]", "invalid IP address"),
        (DOC + "allow: [{cidr: '10.0.0.0/8:80'}]\n", "$.allow[0]", "invalid prefix length"),
        (DOC + "allow: [{domain: 10.0.0.1}]\n", "$.allow[0]", "use cidr"),
        # names
        (DOC + "allow: ['foo*.com']\n", "$.allow[0]", "'*' is allowed only"),
        (DOC + "allow: ['a.*.com']\n", "$.allow[0]", "'*' is allowed only"),
        (DOC + "allow: ['*']\n", "$.allow[0]", "'*' is allowed only"),
        (DOC + "allow: ['*.']\n", "$.allow[0]", "empty"),
        (DOC + "allow: ['*.*.com']\n", "$.allow[0]", "'*' is allowed only"),
        (DOC + "allow: [{domain: '*'}]\n", "$.allow[0]", "'*' is allowed only"),
        (DOC + "allow: ['a..com']\n", "$.allow[0]", "empty label"),
        (DOC + "allow: ['.a.com']\n", "$.allow[0]", "empty label"),
        (DOC + "allow: ['a.com..']\n", "$.allow[0]", "empty label"),
        (DOC + "allow: ['" + "l" * 64 + ".com']\n", "$.allow[0]", "longer than 63"),
        (DOC + "allow: ['" + ".".join(["a" * 50] * 6) + "']\n", "$.allow[0]", "longer than 253"),
        (DOC + "allow: ['exa mple.com']\n", "$.allow[0]", "only letters"),
        (DOC + "allow: ['ex@mple.com']\n", "$.allow[0]", "only letters"),
        (DOC + "allow: ['bücher.de']\n", "$.allow[0]", "only ASCII"),
        (DOC + "allow: ['\u212aey.com']\n", "$.allow[0]", "only ASCII"),
        # dns
        (DOC + "dns: [1.2.3.4]\n", "$.dns", "must be a mapping"),
        (DOC + "dns: {min_ttl: -1}\n", "$.dns.min_ttl", "-1"),
        (DOC + "dns: {unlisted: maybe}\n", "$.dns.unlisted", "maybe"),
        (DOC + "dns: {resolvers: 127.0.0.53}\n", "$.dns.resolvers", "must be a list"),
        (DOC + "dns: {resolvers: ['127.0.0.53', '1.2.3.4:53']}\n", "$.dns.resolvers[1]", "plain IP address"),
        (DOC + "dns: {resolvers: ['[::1]:53']}\n", "$.dns.resolvers[0]", "invalid IP address"),
        (DOC + "dns: {resolvers: ['10.0.0.0/8']}\n", "$.dns.resolvers[0]", "invalid IP address"),
        (DOC + "dns: {resolvers: [resolver.local]}\n", "$.dns.resolvers[0]", "invalid IP address"),
        (DOC + "dns: {resolvers: ['fe80::1%eth0']}\n", "$.dns.resolvers[0]", "zone ids"),
        (DOC + "dns: {resolvers: [53]}\n", "$.dns.resolvers[0]", "must be a string"),
        # whole document
        ("", "$", "empty policy"),
        ("  \n\t\n", "$", "empty policy"),
        ("# only a comment\n", "$", "empty policy"),
        ("---\n", "$", "empty policy"),
        ("~\n", "$", "empty policy"),
        ("- a\n- b\n", "$", "must be a mapping, got a list"),
        ("hello\n", "$", "must be a mapping, got 'hello'"),
        ("[1, 2]", "$", "must be a mapping"),
        ("version: 1\nname: [t\n", "$", "invalid YAML at line 3"),
        ("version: 1\n  name: t\n", "$", "invalid YAML at line 2"),
        ("version: 1\nname: t\n---\nversion: 1\n", "$", "invalid YAML at line 3"),
        ("version: 1\nname: &n t\n", "$", "YAML anchors and aliases are not allowed (line 2)"),
        ("version: 1\nname: t\nallow: &a [a.com]\ndeny: *a\n", "$", "YAML anchors and aliases are not allowed"),
        (DOC + "<<: {mode: audit}\n", "$", "merge keys"),
        (DOC + "name: u\n", "$", "duplicate key 'name' (line 3)"),
        (DOC + "allow: [{domain: a.com, domain: b.com}]\n", "$", "duplicate key 'domain' (line 3)"),
        (DOC + "1: x\n", "$", "keys must be strings"),
        (DOC + "on: x\n", "$", "keys must be strings, got True"),
        (DOC + "description: !!python/object/apply:os.system [true]\n", "$", "could not determine a constructor"),
        (DOC + "description: !!binary aGVsbG8=\n", "$.description", "must be a string, got a bytes"),
        ("version: 1\nname: 2024-01-01\n", "$.name", "must be a string, got a date"),
        ("version: 1\nname: 2024-13-45\n", "$", "invalid YAML value"),
        (DOC + "description: x\x07\n", "$", "YAML error"),
        ('{"version": 1, "name": "t", "description": NaN}', "$", "NaN is not allowed"),
        ('{"version": 1, "name": "t", "description": Infinity}', "$", "Infinity is not allowed"),
        ('{"version": 1, "name": "t", "description": -Infinity}', "$", "-Infinity is not allowed"),
        ('{"version": 1, "name": "t", "name": "u"}', "$", "duplicate key 'name'"),
        ('{"version": 1,\n "name": }', "$", "JSON syntax error at line 2"),
        ('  {"version": 1, "name": "t",}', "$", "JSON syntax error"),
        ('{"version": 1, "name": "t", "description": ' + "[" * 100000 + "]" * 100000 + "}", "$",
         "nested too deeply"),
        (DOC + "description: " + "[" * 5000 + "]" * 5000 + "\n", "$", "nested too deeply"),
        ('{"version": 1, "name": "t", "allow": [' + ",".join(['"a.com"'] * (MAX_RULES + 1)) + "]}", "$",
         f"too many rules: {MAX_RULES + 1} (at most {MAX_RULES})"),
    ],
)
def test_error(text, path, fragment):
    assert_error(text, path, fragment)


def test_too_many_rules_counts_allow_and_deny_together():
    half = ",".join(['"a.com"'] * (MAX_RULES // 2 + 1))
    assert_error('{"version": 1, "name": "t", "allow": [%s], "deny": [%s]}' % (half, half), "$", "too many rules")


def test_exactly_max_rules_is_fine():
    rules = ",".join(['"a.b"'] * MAX_RULES)
    assert len(load_policy_text('{"version":1,"name":"t","allow":[%s]}' % rules).rules) == MAX_RULES


def test_explicit_format():
    assert_error("version: 1\nname: t\n", "$", "JSON syntax error at line 1", fmt="json")
    with pytest.raises(ValueError):
        load_policy_text(DOC, fmt="toml")


def test_size_limit_bytes_and_str():
    big = DOC + "description: " + "x" * MAX_POLICY_BYTES + "\n"
    assert_error(big, "$", "larger than 1 MiB")
    assert_error(big.encode(), "$", "larger than 1 MiB")
    wide = DOC + "description: " + "é" * (MAX_POLICY_BYTES // 2) + "\n"  # under 1 Mi characters, over 1 MiB
    assert_error(wide, "$", "larger than 1 MiB")


def test_not_utf8():
    assert_error(DOC.encode() + b"description: \xff\xfe\n", "$", "not UTF-8 (invalid byte at offset 32)")
    assert_error(DOC.encode("utf-16"), "$", "not UTF-8")


def test_billion_laughs_is_refused_before_expansion():
    lol = ["version: 1", "name: t", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lol += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(9)]
    started = time.monotonic()
    assert_error("\n".join(lol) + "\n", "$", "YAML anchors and aliases are not allowed (line 3)")
    assert time.monotonic() - started < 2


def test_all_errors_are_reported_in_path_order():
    text = (DOC + "mode: loud\nallow: ['10.0.0.1/8', ok.com, 'bad*.com', {cidr: 10.0.0.0/8, ports: [0]}]\n"
            "deny: [{domain: x.com, colour: red}]\ndns: {resolvers: [nope]}\n")
    lines = errors_of(text)
    assert [line.split(": ")[1] for line in lines] == [
        "$.allow[0]", "$.allow[2]", "$.allow[3].ports[0]", "$.deny[0]", "$.dns.resolvers[0]", "$.mode"]
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "t.yaml")
    assert str(caught.value) == f"{lines[0]} (and 5 more errors)"


@pytest.mark.parametrize("text, expected", [
    ("name: t\ncolour: red\nallow: ['10.0.0.1/8']\n", ["$", "$", "$.allow[0]"]),
    ("version: 1\nallow: ['*']\ndns: {timeout: 5}\n", ["$", "$.allow[0]", "$.dns"]),
    ("version: 1\nname: 'bad name'\nallow: [{domain: a.com, colour: red}, 'b..c']\n",
     ["$.allow[0]", "$.allow[1]", "$.name"]),
])
def test_key_problems_do_not_hide_value_problems(text, expected):
    assert [line.split(": ")[1] for line in errors_of(text)] == expected


def test_messages_never_dump_big_values():
    lines = errors_of(DOC + "allow: [{domain: a.com, ports: [" + ",".join(["99999"] * 5000) + "]}]\n"
                      "description: [" + ",".join(["x" * 100] * 1000) + "]\n")
    assert all(len(line) < 300 for line in lines), lines


def test_source_with_control_characters_stays_one_line():
    with pytest.raises(PolicyError) as caught:
        load_policy_text("version: 3\nname: t\n", "evil\nname\u2028")
    assert caught.value.errors == ["evil\\nname\\u2028: $.version: must be 1, got 3"]


def test_policy_error_needs_lines():
    with pytest.raises(ValueError):
        PolicyError([])
    assert str(PolicyError(["a: $: x"])) == "a: $: x"
    assert str(PolicyError(["a: $: x", "a: $: y"])) == "a: $: x (and 1 more error)"


# --------------------------------------------------------------------------- files


def test_load_policy_file_formats(tmp_path):
    (tmp_path / "p.json").write_text('{"version": 1, "name": "j"}')
    (tmp_path / "p.yml").write_text("version: 1\nname: y\n")
    (tmp_path / "p.policy").write_text('  {"version": 1, "name": "s"}')
    assert load_policy_file(tmp_path / "p.json").name == "j"
    assert load_policy_file(tmp_path / "p.yml").name == "y"
    assert load_policy_file(str(tmp_path / "p.policy")).name == "s"
    assert load_policy_file(tmp_path / "p.json").source == str(tmp_path / "p.json")
    (tmp_path / "yaml.json").write_text("version: 1\nname: y\n")
    with pytest.raises(PolicyError, match="JSON syntax error"):
        load_policy_file(tmp_path / "yaml.json")


def test_load_policy_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy_file(missing)
    assert caught.value.errors == [f"{missing}: $: cannot read: No such file or directory"]
    with pytest.raises(PolicyError, match=r": \$: cannot read: Is a directory"):
        load_policy_file(tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_bytes(b"")
    with pytest.raises(PolicyError, match=r"empty\.yaml: \$: empty policy"):
        load_policy_file(empty)
    big = tmp_path / "big.yaml"
    big.write_bytes(DOC.encode() + b"# " + b"x" * MAX_POLICY_BYTES)
    with pytest.raises(PolicyError, match=r"big\.yaml: \$: policy is larger than 1 MiB \(1048577 bytes\)"):
        load_policy_file(big)


def test_validate_files(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(DOC)
    bad = tmp_path / "bad.yaml"
    bad.write_text(DOC + "mode: loud\nallow: ['10.0.0.1/8']\n")
    worse = tmp_path / "worse.json"
    worse.write_text("[]")
    assert validate_files([good]) == []
    assert validate_files([]) == []
    assert validate_files([good, bad, worse]) == [
        f"{bad}: $.allow[0]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        f"{bad}: $.mode: must be 'enforce' or 'audit', got 'loud'",
        f"{worse}: $: the policy must be a mapping, got a list",
    ]


# --------------------------------------------------------------------------- normalised form, digest, cache


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_round_trip(path):
    original = load_policy_file(path)
    text = original.to_json()
    assert load_policy_text(text, original.source) == original
    assert original.digest == hashlib.sha256(text.encode()).hexdigest()
    assert json.loads(text)["version"] == 1


def test_to_json_is_canonical():
    p = policy("B.com", {"domain": "a.COM", "ports": [443, 80]}, {"cidr": "10.0.0.0/8", "reason": "r"},
               deny=["[2001:db8::1]:443"], mode="audit", default="allow", resolvers=["::1", "127.0.0.53"])
    assert json.loads(p.to_json()) == {
        "version": 1, "name": "t", "mode": "audit", "default": "allow",
        "allow": ["B.com", "a.com:80,443", {"cidr": "10.0.0.0/8", "reason": "r"}],
        "deny": ["[2001:db8::1]:443"],
        "dns": {"resolvers": ["::1", "127.0.0.53"]},
    }
    assert p.to_json() == json.dumps(json.loads(p.to_json()), sort_keys=True, separators=(",", ":"))


def test_digest_tracks_policy_content_but_not_description():
    base = load_policy_text(DOC + "allow: [a.com]\n")
    assert load_policy_text(DOC + "description: hi\nallow: [a.com]\n").digest == base.digest
    assert load_policy_text(DOC + "mode: enforce\ndefault: deny\nallow: [a.com]\n").digest == base.digest
    assert load_policy_text(DOC + "allow: [b.com]\n").digest != base.digest
    assert load_policy_text(DOC + "mode: audit\nallow: [a.com]\n").digest != base.digest
    assert load_policy_text(DOC + "allow: [a.com]\n", "other source").digest == base.digest


# --------------------------------------------------------------------------- names, addresses, destinations


@pytest.mark.parametrize("name, expected", [
    ("Example.COM", "example.com"), ("example.com.", "example.com"), ("a", "a"), ("_dmarc.x-y.z", "_dmarc.x-y.z"),
    ("1.2.3.4", "1.2.3.4"), ("l" * 63 + ".com", "l" * 63 + ".com"), (".".join(["a" * 49] * 5) + ".", ".".join(["a" * 49] * 5)),
])
def test_normalize_name(name, expected):
    assert normalize_name(name) == expected


@pytest.mark.parametrize("name", ["", ".", "a..b", "a.b..", ".a", "*.a", "a*", "*", "a b", "a/b", "a:b", "é.com",
                                  "\u212a.com", "l" * 64, ".".join(["a" * 50] * 6), "a\n"])
def test_normalize_name_rejects(name):
    with pytest.raises(ValueError) as caught:
        normalize_name(name)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text, ip, port, name", [
    ("example.com", None, None, "example.com"),
    ("Example.COM.:443", None, 443, "example.com"),
    ("1.2.3.4", "::ffff:1.2.3.4", None, None),
    ("1.2.3.4:80", "::ffff:1.2.3.4", 80, None),
    ("2001:db8::1", "2001:db8::1", None, None),
    ("[2001:db8::1]:443", "2001:db8::1", 443, None),
    ("[2001:db8::1]", "2001:db8::1", None, None),
    ("::ffff:1.2.3.4", "::ffff:1.2.3.4", None, None),
    ("[::ffff:1.2.3.4]:53", "::ffff:1.2.3.4", 53, None),
    ("[1.2.3.4]:53", "::ffff:1.2.3.4", 53, None),
])
def test_parse_dest(text, ip, port, name):
    dest = parse_dest(text, "udp")
    assert dest == Dest(ip=None if ip is None else ipaddress.IPv6Address(ip), port=port, proto="udp", name=name)
    assert parse_dest(text).proto == "tcp"


def test_v4_mapped_dest_is_the_v4_dest():
    assert parse_dest("::ffff:10.1.2.3") == parse_dest("10.1.2.3")
    assert parse_dest("[::ffff:10.1.2.3]:80") == parse_dest("10.1.2.3:80")


@pytest.mark.parametrize("text, proto", [
    ("a.com", "quic"), ("a.com:0", "tcp"), ("a.com:65536", "tcp"), ("a.com:80,443", "tcp"), ("10.0.0.0/8", "tcp"),
    ("*.a.com", "tcp"), ("", "tcp"), ("1.2.3.256", "tcp"), ("[a.com]:80", "tcp"), ("a..com", "tcp"),
    ("2001:db8::1:443x", "tcp"), ("fe80::1%eth0", "tcp"), ("[::1]80", "tcp"),
])
def test_parse_dest_rejects(text, proto):
    with pytest.raises(ValueError):
        parse_dest(text, proto)


def test_to_mapped_and_display_ip():
    assert to_mapped("10.0.0.1") == ipaddress.IPv6Address("::ffff:10.0.0.1")
    assert to_mapped(ipaddress.IPv4Address("10.0.0.1")) == ipaddress.IPv6Address("::ffff:10.0.0.1")
    assert to_mapped(ipaddress.IPv6Address("2001:db8::1")) == ipaddress.IPv6Address("2001:db8::1")
    assert to_mapped("::ffff:10.0.0.1") == to_mapped("10.0.0.1")
    assert display_ip(to_mapped("10.0.0.1")) == "10.0.0.1"
    assert display_ip(ipaddress.IPv6Address("2001:0db8:0:0::1")) == "2001:db8::1"
    assert display_ip(ipaddress.IPv6Address("::1")) == "::1"
    with pytest.raises(ValueError):
        to_mapped("nope")


def test_name_matches():
    wild = rule_of("*.github.com")
    exact = rule_of("github.com")
    assert name_matches(wild, "api.github.com") and name_matches(wild, "a.b.github.com")
    assert name_matches(wild, "API.GitHub.COM.")
    assert not name_matches(wild, "github.com") and not name_matches(wild, "notgithub.com")
    assert not name_matches(wild, "github.com.evil") and not name_matches(wild, "apigithub.com")
    assert name_matches(exact, "GitHub.com.") and not name_matches(exact, "api.github.com")
    assert not name_matches(rule_of("10.0.0.0/8"), "10.0.0.1")
    assert name_matches(rule_of("*.com"), "a.com") and not name_matches(rule_of("*.com"), "com")


# --------------------------------------------------------------------------- decide


def verdict(p: Policy, dest: str | Dest, proto="tcp") -> tuple[str, str]:
    decision = decide(p, parse_dest(dest, proto) if isinstance(dest, str) else dest)
    return decision.verdict, decision.rule_text


def test_default_verdicts():
    assert verdict(policy(), "a.com") == ("deny", "default")
    assert verdict(policy(default="allow"), "a.com") == ("allow", "default")
    decision = decide(policy(), parse_dest("a.com"))
    assert decision == Decision(verdict="deny", rule=None, rule_text="default", reason=None, effective="blocked")


def test_wildcard_matches_below_base_only():
    p = policy(deny=["*.github.com"], default="allow")
    assert verdict(p, "api.github.com") == ("deny", "*.github.com")
    assert verdict(p, "x.api.github.com") == ("deny", "*.github.com")
    assert verdict(p, "github.com") == ("allow", "default")
    assert verdict(p, "notgithub.com") == ("allow", "default")


def test_names_are_case_insensitive_and_ignore_trailing_dot():
    p = policy("Mirror.Internal.", "*.Debian.ORG")
    assert verdict(p, "MIRROR.internal") == ("allow", "Mirror.Internal.")
    assert verdict(p, "mirror.internal.") == ("allow", "Mirror.Internal.")
    assert verdict(p, "Deb.debian.org.") == ("allow", "*.Debian.ORG")
    assert decide(p, Dest(ip=None, port=None, proto="tcp", name="FTP.Debian.Org.")).verdict == "allow"


def test_longest_name_wins():
    p = policy("*.example.com", "*.x.internal.example.com", deny=["*.internal.example.com"])
    assert verdict(p, "www.example.com") == ("allow", "*.example.com")
    assert verdict(p, "db.internal.example.com") == ("deny", "*.internal.example.com")
    assert verdict(p, "a.x.internal.example.com") == ("allow", "*.x.internal.example.com")


def test_exact_beats_wildcard():
    p = policy("api.github.com", deny=["*.github.com"])
    assert verdict(p, "api.github.com") == ("allow", "api.github.com")
    assert verdict(p, "uploads.github.com") == ("deny", "*.github.com")
    p = policy("*.github.com", deny=["github.com"])
    assert verdict(p, "github.com") == ("deny", "github.com")
    assert verdict(p, "api.github.com") == ("allow", "*.github.com")


def test_deny_wins_ties_then_lowest_index():
    assert verdict(policy("a.com", deny=["a.com"]), "a.com") == ("deny", "a.com")
    assert verdict(policy("*.a.com", deny=["*.a.com"]), "b.a.com") == ("deny", "*.a.com")
    assert verdict(policy("10.0.0.0/8", deny=["10.0.0.0/8"]), "10.1.1.1") == ("deny", "10.0.0.0/8")
    p = policy({"domain": "a.com", "reason": "first"}, {"domain": "a.com", "reason": "second"})
    assert decide(p, parse_dest("a.com")).reason == "first"
    p = policy(deny=[{"cidr": "10.0.0.0/8", "reason": "first"}, {"cidr": "10.0.0.0/8", "reason": "second"}])
    decision = decide(p, parse_dest("10.0.0.1"))
    assert (decision.reason, decision.rule.index) == ("first", 0)


def test_longest_prefix_wins():
    p = policy("10.0.0.0/8", "10.1.2.0/24", deny=["10.1.0.0/16"])
    assert verdict(p, "10.2.0.1") == ("allow", "10.0.0.0/8")
    assert verdict(p, "10.1.3.4") == ("deny", "10.1.0.0/16")
    assert verdict(p, "10.1.2.3") == ("allow", "10.1.2.0/24")
    p = policy("2001:db8::/32", deny=["2001:db8:bad::/48"])
    assert verdict(p, "2001:db8:1::1") == ("allow", "2001:db8::/32")
    assert verdict(p, "[2001:db8:bad::1]:443") == ("deny", "2001:db8:bad::/48")


def test_v4_dest_in_mapped_form_is_judged_as_v4():
    p = policy(deny=["10.0.0.0/8"], default="allow")
    assert verdict(p, "::ffff:10.1.2.3") == ("deny", "10.0.0.0/8")
    assert verdict(p, "[::ffff:10.1.2.3]:443") == ("deny", "10.0.0.0/8")
    unmapped = Dest(ip=ipaddress.IPv4Address("10.1.2.3"), port=None, proto="tcp", name=None)  # type: ignore[arg-type]
    assert verdict(p, unmapped) == ("deny", "10.0.0.0/8")
    assert verdict(p, "2001:db8::1") == ("allow", "default")


def test_v6_rule_covering_the_mapped_range_covers_ipv4():
    p = policy(deny=["::/0"], default="allow")
    assert verdict(p, "192.0.2.1") == ("deny", "::/0")
    assert verdict(policy(deny=["0.0.0.0/0"], default="allow"), "2001:db8::1") == ("allow", "default")


def test_name_and_cidr_disagree_deny_wins():
    both = Dest(ip=to_mapped("10.1.2.3"), port=443, proto="tcp", name="api.github.com")
    p = policy("10.0.0.0/8", deny=["*.github.com"])
    assert verdict(p, both) == ("deny", "*.github.com")
    p = policy("api.github.com", deny=["10.1.2.3"])
    assert verdict(p, both) == ("deny", "10.1.2.3")


def test_name_and_cidr_agree_name_decides():
    both = Dest(ip=to_mapped("10.1.2.3"), port=443, proto="tcp", name="api.github.com")
    p = policy("10.1.2.3", {"domain": "*.github.com", "reason": "by name"})
    decision = decide(p, both)
    assert (decision.verdict, decision.rule.kind, decision.reason) == ("allow", "name", "by name")
    p = policy(deny=["10.1.2.3", "*.github.com"])
    assert decide(p, both).rule.kind == "name"


def test_only_one_kind_decides():
    both = Dest(ip=to_mapped("10.1.2.3"), port=443, proto="tcp", name="x.org")
    assert verdict(policy("10.0.0.0/8"), both) == ("allow", "10.0.0.0/8")
    assert verdict(policy("x.org", default="deny"), both) == ("allow", "x.org")


def test_ports_and_protocol_narrow_rules():
    p = policy("mirror.internal:443", {"domain": "dns.internal", "protocol": "udp"},
               {"cidr": "10.0.0.0/8", "ports": [22, 5432], "protocol": "tcp"})
    assert verdict(p, "mirror.internal:443") == ("allow", "mirror.internal:443")
    assert verdict(p, "mirror.internal:443", "udp") == ("allow", "mirror.internal:443")
    assert verdict(p, "mirror.internal:80") == ("deny", "default")
    assert verdict(p, "mirror.internal") == ("deny", "default")  # no port: only port-less rules
    assert verdict(p, "dns.internal:5353", "udp") == ("allow", "dns.internal/udp")
    assert verdict(p, "dns.internal:5353", "tcp") == ("deny", "default")
    assert verdict(p, "dns.internal", "udp") == ("allow", "dns.internal/udp")
    assert verdict(p, "10.9.9.9:5432") == ("allow", "10.0.0.0/8:22,5432/tcp")
    assert verdict(p, "10.9.9.9:5432", "udp") == ("deny", "default")
    assert verdict(p, "10.9.9.9:80") == ("deny", "default")


def test_narrow_rule_only_wins_where_it_applies():
    p = policy("*.example.com", deny=["db.example.com:5432"])
    assert verdict(p, "db.example.com:5432") == ("deny", "db.example.com:5432")
    assert verdict(p, "db.example.com:443") == ("allow", "*.example.com")


def test_dns_resolvers_first_and_final():
    p = policy("127.0.0.0/8", "resolver.example", deny=["127.0.0.53"], resolvers=["127.0.0.53", "::1"])
    assert decide(p, parse_dest("127.0.0.53:53", "udp")) == Decision(
        verdict="allow", rule=None, rule_text="dns.resolvers", reason=None, effective="allowed")
    assert decide(p, parse_dest("[::1]:53", "tcp")).verdict == "allow"
    assert decide(p, parse_dest("127.0.0.1:53", "udp")) == Decision(
        verdict="deny", rule=None, rule_text="dns.resolvers", reason="dns.resolvers: not a listed resolver",
        effective="blocked")
    assert verdict(p, "127.0.0.1:80") == ("allow", "127.0.0.0/8")
    assert verdict(p, "127.0.0.53:80") == ("deny", "127.0.0.53")
    assert verdict(p, "resolver.example:53") == ("allow", "resolver.example")  # no ip: rules decide
    both = Dest(ip=to_mapped("192.0.2.1"), port=53, proto="udp", name="resolver.example")
    assert verdict(p, both) == ("deny", "dns.resolvers")
    assert verdict(policy("127.0.0.0/8"), "127.0.0.1:53") == ("allow", "127.0.0.0/8")  # no dns section
    assert verdict(policy(default="allow", resolvers=[]), "127.0.0.53:53") == ("deny", "dns.resolvers")


def test_audit_mode_effective():
    p = policy("a.com", deny=[{"domain": "b.com", "reason": "circular"}], mode="audit", resolvers=["127.0.0.53"])
    assert decide(p, parse_dest("a.com")).effective == "allowed"
    assert decide(p, parse_dest("c.com")).effective == "would-block"
    blocked = decide(p, parse_dest("b.com"))
    assert (blocked.verdict, blocked.effective, blocked.reason) == ("deny", "would-block", "circular")
    assert decide(p, parse_dest("192.0.2.1:53", "udp")).effective == "would-block"


def test_reason_is_reported_with_the_rule():
    p = load_policy_file(POLICIES / "mysql-rollout.yaml")
    decision = decide(p, parse_dest("api.github.com:443"))
    assert decision.rule_text == "*.github.com"
    assert decision.reason == "circular: deploys must not need GitHub during an outage"
    assert decision.rule is p.rules[decision.rule.index]


# --------------------------------------------------------------------------- property: decide == brute force

MAPPED = 0xFFFF << 32
V4_HOSTS = [0x0A000000 | x for x in range(0, 16)]  # 10.0.0.0 .. 10.0.0.15
V6_HOSTS = [(0x20010DB8 << 96) | x for x in range(0, 16)]  # 2001:db8::0 .. 2001:db8::f
LABELS = ["a", "b", "c"]
PORTS = [53, 80, 443]


@dataclass(frozen=True)
class ModelRule:
    verdict: str
    labels: tuple[str, ...] | None  # name rule
    wildcard: bool
    net: int | None  # cidr rule, as a 128-bit network with prefix
    prefix: int | None
    ports: frozenset[int] | None
    proto: str | None
    written: str | dict


def _mask(bits: int, prefix: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)


@st.composite
def model_rules(draw, verdict: str) -> ModelRule:
    ports = draw(st.none() | st.frozensets(st.sampled_from(PORTS), min_size=1))
    proto = draw(st.sampled_from([None, "tcp", "udp"]))
    as_object = draw(st.booleans())
    suffix = "" if ports is None else ":" + ",".join(map(str, draw(st.permutations(sorted(ports)))))
    if draw(st.booleans()):
        labels = tuple(draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=3)))
        wildcard = draw(st.booleans())
        target = ("*." if wildcard else "") + ".".join(labels)
        if draw(st.booleans()):
            target = target.upper() + "."
        key, net, prefix = "domain", None, None
    else:
        labels, wildcard, key = None, False, "cidr"
        if draw(st.booleans()):
            prefix4 = draw(st.sampled_from([0, 8, 24, 28, 30, 31, 32]))
            base = draw(st.sampled_from(V4_HOSTS)) & _mask(32, prefix4)
            net, prefix = MAPPED | base, 96 + prefix4
            target = f"{ipaddress.IPv4Address(base)}/{prefix4}"
        else:
            prefix = draw(st.sampled_from([0, 32, 96, 100, 124, 126, 127, 128]))
            net = draw(st.sampled_from(V6_HOSTS + [MAPPED | h for h in V4_HOSTS])) & _mask(128, prefix)
            target = f"{ipaddress.IPv6Address(net)}/{prefix}"
        if prefix == 128 and draw(st.booleans()):
            target = target.rsplit("/", 1)[0]
        if ports is not None and ":" in target:
            target = f"[{target}]"
    if as_object:
        written: str | dict = {key: target.strip("[]")}
        if ports is not None:
            written["ports"] = sorted(ports)
        if proto is not None:
            written["protocol"] = proto
        if draw(st.booleans()):
            written["reason"] = f"reason {draw(st.integers(0, 9))}"
    else:
        written = target + suffix + ("" if proto is None else "/" + proto)
    return ModelRule(verdict, labels, wildcard, net, prefix, ports, proto, written)


@dataclass(frozen=True)
class ModelDest:
    labels: tuple[str, ...] | None
    ip: int | None
    port: int | None
    proto: str


model_dests = st.builds(
    ModelDest,
    labels=st.none() | st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(tuple),
    ip=st.none() | st.sampled_from([MAPPED | h for h in V4_HOSTS] + V6_HOSTS),
    port=st.sampled_from([None, 53, 80, 443, 8080]),
    proto=st.sampled_from(["tcp", "udp"]),
)


def brute_force(rules: list[ModelRule], resolvers: list[int] | None, default: str, dest: ModelDest):
    """(verdict, index of the deciding rule or a label) straight from the rules as docs/policy.md states them."""
    if resolvers is not None and dest.port == 53 and dest.ip is not None:
        return ("allow" if dest.ip in resolvers else "deny"), "dns.resolvers"
    names, cidrs = [], []
    for index, rule in enumerate(rules):
        if rule.proto not in (None, dest.proto):
            continue
        if rule.ports is not None and dest.port not in rule.ports:
            continue
        if rule.labels is not None and dest.labels is not None:
            n = len(rule.labels)
            tail_matches = dest.labels[-n:] == rule.labels
            if tail_matches and (len(dest.labels) > n if rule.wildcard else len(dest.labels) == n):
                names.append((index, rule))
        if rule.net is not None and dest.ip is not None:
            if (dest.ip >> (128 - rule.prefix)) == (rule.net >> (128 - rule.prefix)):
                cidrs.append((index, rule))
    names.sort(key=lambda ir: (-len(ir[1].labels), ir[1].wildcard, ir[1].verdict != "deny", ir[0]))
    cidrs.sort(key=lambda ir: (-ir[1].prefix, ir[1].verdict != "deny", ir[0]))
    candidates = [c[0] for c in (names, cidrs) if c]
    if not candidates:
        return default, "default"
    denying = [c for c in candidates if c[1].verdict == "deny"]
    index, rule = denying[0] if denying else candidates[0]
    return rule.verdict, index


def build_dest(dest: ModelDest, trailing_dot: bool) -> Dest:
    name = None if dest.labels is None else ".".join(dest.labels) + ("." if trailing_dot else "")
    ip = None if dest.ip is None else ipaddress.IPv6Address(dest.ip)
    if (name is None) == (ip is None) or trailing_dot:
        return Dest(ip=ip, port=dest.port, proto=dest.proto, name=name)
    target = name if name is not None else display_ip(ip)
    if dest.port is not None:
        target = f"[{target}]:{dest.port}" if ":" in target else f"{target}:{dest.port}"
    parsed = parse_dest(target, dest.proto)
    assert parsed == Dest(ip=ip, port=dest.port, proto=dest.proto, name=name)
    return parsed


@settings(max_examples=400, deadline=None)
@given(
    allow=st.lists(model_rules("allow"), max_size=6),
    deny=st.lists(model_rules("deny"), max_size=6),
    resolvers=st.none() | st.lists(st.sampled_from([MAPPED | h for h in V4_HOSTS[:4]] + V6_HOSTS[:4]), max_size=3),
    default=st.sampled_from(["allow", "deny"]),
    mode=st.sampled_from(["enforce", "audit"]),
    dests=st.lists(model_dests, min_size=1, max_size=8),
    trailing_dot=st.booleans(),
)
def test_decide_equals_brute_force(allow, deny, resolvers, default, mode, dests, trailing_dot):
    document = {"version": 1, "name": "prop", "mode": mode, "default": default,
                "allow": [r.written for r in allow], "deny": [r.written for r in deny]}
    if resolvers is not None:
        document["dns"] = {"resolvers": [display_ip(ipaddress.IPv6Address(r)) for r in resolvers]}
    p = load_policy_text(json.dumps(document))
    cached = load_policy_text(p.to_json(), p.source)
    assert cached == p
    for model in dests:
        dest = build_dest(model, trailing_dot)
        decision = decide(p, dest)
        assert decide(p, dest) == decision == decide(cached, dest)
        expected_verdict, decided_by = brute_force(allow + deny, resolvers, default, model)
        assert decision.verdict == expected_verdict
        if isinstance(decided_by, int):
            assert decision.rule is not None and decision.rule.index == decided_by
            assert decision.rule_text == decision.rule.text and decision.reason == decision.rule.reason
        else:
            assert decision.rule is None and decision.rule_text == decided_by
        blocked = "would-block" if mode == "audit" else "blocked"
        assert decision.effective == ("allowed" if decision.verdict == "allow" else blocked)


def test_capabilities_and_privileged_keys():
    from ocihook.policy import PolicyError, load_policy_text
    base = "version: 1\nname: caps\n"
    pol = load_policy_text(base + "capabilities: [net_raw, CAP_SYS_PTRACE, NET_RAW]\nprivileged: false\n")
    assert pol.capabilities == ("CAP_NET_RAW", "CAP_SYS_PTRACE") and pol.privileged is False
    assert load_policy_text(base).capabilities == () and load_policy_text(base).privileged is False
    assert load_policy_text(base + "privileged: true\n").privileged is True
    assert load_policy_text(base).digest != load_policy_text(base + "capabilities: [NET_RAW]\n").digest
    for bad, needle in (("capabilities: [FLY]", "$.capabilities[0]: unknown capability 'FLY'"),
                        ("capabilities: [CHOWN]", "$.capabilities[0]: CAP_CHOWN is never refused or dropped"),
                        ("capabilities: NET_RAW", "$.capabilities"), ("privileged: 1", "$.privileged")):
        with pytest.raises(PolicyError) as e:
            load_policy_text(base + bad + "\n", "p.yaml")
        assert needle in str(e.value), str(e.value)


def test_explain_shows_privileges(tmp_path):
    import json
    import subprocess
    import sys
    p = tmp_path / "p.yaml"
    p.write_text("version: 1\nname: caps\ndefault: allow\ncapabilities: [NET_RAW]\n")
    cli = [sys.executable, "-m", "ocihook.cli", "policy", "explain", str(p), "example.org:443"]
    res = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert "privileges: capabilities: CAP_NET_RAW kept by runs and allowed in containers" in res.stdout
    out = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert out["capabilities"] == ["CAP_NET_RAW"] and out["privileged"] is False
