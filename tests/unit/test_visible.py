"""ocihook.visible: what every view shows of process-controlled text."""
from __future__ import annotations

import unicodedata

from hypothesis import given, strategies as st

from ocihook import events, report
from ocihook.visible import MARKER, argv_line, cut, visible

BAD = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def raw_controls(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in BAD]


@given(st.one_of(st.text(), st.binary()))
def test_any_text_becomes_one_line_without_control_or_format_characters(text):
    out = visible(text)
    assert not raw_controls(out) and "\n" not in out and "\r" not in out


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E).filter(lambda c: c != "\\")))
def test_plain_text_is_unchanged(text):
    assert visible(text) == text


def test_escapes():
    assert visible("a\nb\rALLOWED\t\\") == "a\\nb\\rALLOWED\\t\\\\"
    assert visible(b"\x1b[31mred\x7f\xff\xfe") == "\\x1b[31mred\\x7f\\xff\\xfe"
    assert visible("\x85\u2028\u2029\u202a\u202e\u2066\u2069\u200b\u200e\ufeff\U000e0001") == (
        "\\u0085\\u2028\\u2029\\u202a\\u202e\\u2066\\u2069\\u200b\\u200e\\ufeff\\U000e0001")
    assert visible("é 日本 ü") == "é 日本 ü"          # printable non-ASCII stays
    assert visible(None) == ""
    assert argv_line([b"printf", b"a\nb\rALLOWED"]) == "printf a\\nb\\rALLOWED"


@given(st.text(), st.integers(min_value=1, max_value=60))
def test_cut_fits_and_never_splits_an_escape(text, width):
    line = visible(text)
    short = cut(line, width)
    assert len(short) <= width
    if len(line) <= width:
        assert short == line
    else:
        assert short.endswith(MARKER)
        kept = short[:-len(MARKER)]
        assert any(visible(text[:k]) == kept for k in range(len(text) + 1))


@given(st.lists(st.binary().map(lambda b: b.replace(b"\0", b"")), min_size=1, max_size=6))
def test_argv_fields_round_trip_through_json(args):
    import json
    fields = events.argv_fields(b"\0".join(args) + b"\0")
    rec = json.loads(json.dumps(fields))
    assert events.argv_bytes(rec) == args
    assert (rec["argv_b64"] is None) == all(_utf8(a) for a in args)
    assert report.command_text(rec) == argv_line(args)


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_report_views_escape_every_process_controlled_field():
    rec = {"container": "c1", "policy": "p", "verdict": "blocked", "kind": "dns", "proto": "udp", "family": 4,
           "dst_ip": "127.0.0.53", "dst_port": 53, "domain": "evil\n.example", "pid": 7, "comm": "x\x1b]0;t\x07",
           **events.argv_fields(b"sh\0-c\0echo ok\r\nsafedeploy: allowed: all\0"), "uid": 0,
           "rule": "default", "reason": None, "count": 1, "first_seen": "t", "last_seen": "t", "parents": []}
    table = report.format_table([rec])
    assert len(table.splitlines()) == 3 and not raw_controls(table.replace("\n", ""))
    assert "evil\\n.example" in table and "echo ok\\r\\nsafedeploy: allowed: all" in table
    (line,) = report.summary([rec])
    assert line == "safedeploy: blocked: evil\\n.example (127.0.0.53:53/udp) by pid 7 x\\x1b]0;t\\x07 x1 rule default"
