"""JSON for the hook's hot path without importing the `json` package (which pulls in `re`
and compiles regexes: ~6 ms of every container start). Uses CPython's `_json` scanner and
string encoder directly; falls back to `json` where `_json` is missing.

Only what the hook exchanges: objects, arrays, strings, ints, floats, booleans, null.
"""
from __future__ import annotations

try:
    import _json
except ImportError:  # pragma: no cover — other Pythons
    _json = None


class JSONError(ValueError):
    """Not JSON; str() is one line."""


def _constant(name: str):
    raise JSONError(f"{name} is not JSON")


class _Context:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)
    memo: dict = {}


_scan = _json.make_scanner(_Context()) if _json else None


def loads(text: str):
    if _scan is None:  # pragma: no cover
        import json
        return json.loads(text)
    end = len(text)
    i = 0
    while i < end and text[i] in " \t\n\r":
        i += 1
    try:
        value, i = _scan(text, i)
    except StopIteration as e:
        raise JSONError(f"expecting a value at character {e.value}") from None
    except ValueError as e:  # a JSONDecodeError raised from inside _json
        raise JSONError(str(e).splitlines()[0]) from None
    while i < end and text[i] in " \t\n\r":
        i += 1
    if i != end:
        raise JSONError(f"extra data at character {i}")
    return value


def dumps(obj) -> str:
    out: list[str] = []
    _dump(obj, out)
    return "".join(out)


def _dump(obj, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_json.encode_basestring_ascii(obj) if _json else repr(obj))
    elif isinstance(obj, (int, float)):
        out.append(repr(obj) if isinstance(obj, float) else str(int(obj)))
    elif isinstance(obj, dict):
        out.append("{")
        for n, (k, v) in enumerate(obj.items()):
            if n:
                out.append(",")
            _dump(str(k), out)
            out.append(":")
            _dump(v, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for n, v in enumerate(obj):
            if n:
                out.append(",")
            _dump(v, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")
