"""JSON for the hook's hot path without importing the `json` package (which pulls in `re`
and compiles regexes: ~6 ms of every container start). Uses CPython's `_json` scanner and
string encoder directly; falls back to `json` where `_json` is missing.

Only what the hook exchanges: objects, arrays, strings, ints, floats, booleans, null.
"""

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
    """Compact JSON (as json.dumps with separators=(",", ":")); NaN and infinities are
    refused (they are not JSON)."""
    out: list[str] = []
    _dump(obj, out)
    return "".join(out)


def _string(text: str) -> str:
    if _json is not None:
        return _json.encode_basestring_ascii(text)
    import json  # noqa: PLC0415 — only where _json is missing
    return json.dumps(text)


def _float(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not JSON")
    return float.__repr__(value)


def _key(key) -> str:
    """An object key as json.dumps turns it into a string."""
    if isinstance(key, str):
        return key
    if key is True or key is False:
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return _float(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _dump(obj, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_string(obj))
    elif isinstance(obj, int):
        out.append(int.__repr__(obj))
    elif isinstance(obj, float):
        out.append(_float(obj))
    elif isinstance(obj, dict):
        out.append("{")
        for n, (k, v) in enumerate(obj.items()):
            if n:
                out.append(",")
            out.append(_string(_key(k)))
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
