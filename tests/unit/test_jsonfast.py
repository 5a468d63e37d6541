"""ocihook.jsonfast (the hook's JSON without the json package) against json itself."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, strategies as st

from ocihook import jsonfast

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                      max_leaves=30)
KEYS = st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.none(),
                 st.floats(allow_nan=False, allow_infinity=False))


@given(VALUES)
def test_dumps_is_compact_json_dumps(value):
    assert jsonfast.dumps(value) == json.dumps(value, separators=(",", ":"))


@given(VALUES)
def test_loads_reads_what_json_reads(value):
    text = json.dumps(value, indent=1)
    assert jsonfast.loads(text) == json.loads(text)
    assert jsonfast.loads(f" \n{jsonfast.dumps(value)}\t\r\n") == json.loads(text)


@given(st.dictionaries(KEYS, st.integers(), max_size=4))
def test_non_string_keys_as_json_turns_them_into_strings(value):
    assert jsonfast.dumps(value) == json.dumps(value, separators=(",", ":"))


@given(st.text(max_size=40))
def test_any_text_is_read_as_json_reads_it_or_refused_as_json_refuses_it(text):
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            jsonfast.loads(text)
        return
    if any(c in text for c in ("NaN", "Infinity")):   # json's extensions: refused here
        with pytest.raises(jsonfast.JSONError):
            jsonfast.loads(text)
        return
    got = jsonfast.loads(text)
    assert got == expected or (isinstance(got, float) and math.isnan(got) and math.isnan(expected))


def test_errors_are_one_line_json_errors():
    for bad in ("", "{", '{"a": 1} x', "[1,]", "NaN", '"\\x"'):
        with pytest.raises(jsonfast.JSONError) as e:
            jsonfast.loads(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), {"t": [float("nan")]}])
def test_non_finite_floats_are_refused_not_written_as_invalid_json(value):
    with pytest.raises(ValueError):
        jsonfast.dumps(value)


@given(VALUES)
def test_the_fallback_without_the_json_accelerator_writes_valid_json(value):
    saved = jsonfast._json
    jsonfast._json = None                     # as on a Python without the _json module
    try:
        text = jsonfast.dumps(value)
    finally:
        jsonfast._json = saved
    assert json.loads(text) == value
