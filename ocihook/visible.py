"""Text a policed process controls (its command line, thread name, the names it looks
up), made safe to show a person: every view (report table, ``watch``, the stderr summary
of ``run``, syslog lines, ``status``) passes such text through :func:`visible`.

Control and formatting characters come out as visible escapes, so one event stays one
line and nothing moves the cursor, recolours the terminal or reorders the text:

* ``\\n``, ``\\r``, ``\\t``; any other C0 control and DEL as ``\\x1b``, ``\\x7f``;
* a byte that is not UTF-8 (bytes input, or a ``surrogateescape`` string) as ``\\xff``;
* C1 controls, line/paragraph separators (U+2028/2029), bidi embeddings, overrides and
  isolates (U+202A-202E, U+2066-2069) and every other format character (Unicode category
  Cf: zero-width spaces and joiners, LRM/RLM, BOM, ...) as ``\\u0085``, ``\\u202e``;
* a backslash as ``\\\\``, so an escape is never ambiguous with text that merely looks
  like one.

Machines read the JSON report and ``watch --json`` instead, which keep the exact text.
No imports at module level: the hook reports its errors through here.
"""
from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
MARKER = "…"  # where a cut line stops


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    cp = ord(ch)
    if cp < 0x80:
        return f"\\x{cp:02x}"
    if 0xDC80 <= cp <= 0xDCFF:  # surrogateescape: an undecodable byte
        return f"\\x{cp - 0xDC00:02x}"
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def _pieces(text: str) -> list[str]:
    from unicodedata import category  # noqa: PLC0415 — only for text that needs it
    return [_escape(ch) if ch in _NAMED or category(ch) in _ESCAPED_CATEGORIES else ch for ch in text]


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and "\\" not in text


def visible(text) -> str:
    """text (str, bytes or None) as one printable line; see the module doc."""
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    text = str(text)
    return text if _plain(text) else "".join(_pieces(text))


def argv_line(argv) -> str:
    """A command line for people: the arguments (bytes or str), each made visible, joined
    by spaces."""
    return " ".join(visible(a) for a in argv)


def cut(line: str, width: int) -> str:
    """A line made by :func:`visible` cut to width characters, the last one MARKER; never
    inside an escape (half of ``\\x1b`` would read as other text)."""
    if width <= 0 or len(line) <= width:
        return line
    end = max(width - len(MARKER), 0)
    i = 0
    while i < end:  # every backslash of a visible line starts an escape
        if line[i] == "\\" and i + 1 < len(line):
            size = {"x": 4, "u": 6, "U": 10}.get(line[i + 1], 2)
            if i + size > end:
                end = i
                break
            i += size
        else:
            i += 1
    return line[:end] + MARKER
