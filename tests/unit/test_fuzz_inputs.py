"""Property tests: every input gives a result or a one-line error, never a traceback."""
from __future__ import annotations

import ctypes
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocihook import hook
from ocihook.compiler import name_key_bytes
from ocihook.pinned import C, NameKey, name_of_key
from ocihook.policy import PolicyError, load_policy_text, normalize_name

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)


@FAST
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_oci_state_reader(raw):
    try:
        state = hook.read_state(raw)
    except hook.HookError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert isinstance(state["id"], str)
        hook.annotations_of(state)
        try:
            hook.stage_of([], state)
        except hook.HookError as e:
            assert "\n" not in str(e)


@FAST
@given(st.text(max_size=200) | st.sampled_from(["base64:", "file:", "{", "file:/", "base64:e30="]).flatmap(
    lambda p: st.text(max_size=40).map(lambda t: p + t)))
def test_annotation_decoder(value):
    try:
        source, raw = hook.policy_source(value)
    except hook.HookError as e:
        assert "\n" not in str(e) and str(e).strip()
        return
    try:
        load_policy_text(raw, source)
    except PolicyError as e:
        assert "\n" not in str(e)


@FAST
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_policy_loader_never_tracebacks(text):
    try:
        load_policy_text(text, "fuzz")
    except PolicyError as e:
        assert "\n" not in str(e)


@FAST
@given(st.lists(st.text(alphabet="abcXYZ019-_", min_size=1, max_size=10), min_size=1, max_size=6),
       st.booleans())
def test_dns_name_keys_match_the_kernels_trie(labels, trailing_dot):
    name = ".".join(labels) + ("." if trailing_dot else "")
    norm = normalize_name(name)
    assert norm == norm.lower() and not norm.endswith(".")
    # the kernel looks up the reversed name + a 0 byte: the key of `*.BASE` is a prefix of it
    # exactly when BASE is a proper label-aligned suffix, the exact key only for the name itself
    query = name_key_bytes(norm, False)
    parts = norm.split(".")
    for i in range(len(parts)):
        base = normalize_name(".".join(labels[i:]))
        assert query.startswith(name_key_bytes(base, True)) == (i > 0)
        assert query.startswith(name_key_bytes(base, False)) == (i == 0)
    assert not query.startswith(name_key_bytes("x" + norm, False))
    key = NameKey(prefixlen=C["SD_NAME_FIXED_BITS"] + 8 * len(query))
    ctypes.memmove(key.name, query, len(query))
    assert name_of_key(key) == norm
