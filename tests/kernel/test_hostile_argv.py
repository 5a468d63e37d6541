"""Issue 13: a policed process controls its command line. Hypothesis-made argv (any bytes:
ANSI sequences, CR, LF, NUL-split arguments, bidi overrides, invalid UTF-8) through a real
`safedeploy run` under a policy that blocks a loopback connect: the report table, `watch`
(text, cut and --json), the stderr summary and the syslog line each stay one line per
event without a raw control character, and the JSONL report keeps the exact argv."""
from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from ocihook import events, loader, report
from ocihook.events import C

CLI = [sys.executable, "-m", "ocihook.cli"]
POLICY = 'version: 1\nname: hostile\ndefault: allow\ndeny: [{cidr: 127.0.0.2/32, reason: "circular: auth"}]\n'
CODE = 'import socket\ntry:socket.create_connection(("127.0.0.2",9),1)\nexcept OSError:0'
SPECIALS = [b"\x1b[31m", b"\x1b[2J\x1b[H", b"\x1b]0;title\x07", b"\r", b"\n", b"\r\n", b"\t", b"\x7f", b"\x00",
            b"\xff\xfe", b"\xc2\x85", b"\xc2\x9b", "\u2028".encode(), "\u2029".encode(), "\u202e".encode(),
            "\u2066".encode(), "\u200b".encode(), "\ufeff".encode(), b"\\x1b", b"ALLOWED", b" ", "é".encode()]
BLOB = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(SPECIALS)), max_size=10).map(b"".join)
# NUL splits a blob into several arguments; sometimes long enough to fill the kernel's copy
ARGV = st.one_of(BLOB, st.binary(min_size=150, max_size=400)).map(lambda b: b.split(b"\0"))
_BAD = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def raw_controls(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in _BAD]


class Lines:
    """The lines a process writes to one of its pipes, read as they come."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.q: queue.Queue = queue.Queue()
        self.t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.t.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line)
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {needle!r} in {timeout} s; got {self.lines} "
                                     f"{getattr(self, 'err', None) and self.err.lines}") from None
            assert line is not None, f"stream ended before {needle!r}; got {self.lines}"
            if needle in line:
                return line


def start_watch(*args, env=None) -> tuple[subprocess.Popen, Lines]:
    w = subprocess.Popen([*CLI, "watch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, errors="surrogateescape", env={**os.environ, **(env or {})})
    err = Lines(w.stderr)
    err.wait_for("watching")                      # the ring buffer is open: nothing is missed from here
    out = Lines(w.stdout)
    out.err = err
    return w, out


@pytest.fixture
def own_pins(monkeypatch):
    """Programs pinned under a bpffs root of this test's own: `watch` holds the ring buffer
    of one pinned version for minutes, and the shared root sees versions come and go
    (other checkouts' gc)."""
    root = f"/sys/fs/bpf/sdargv{secrets.token_hex(4)}"
    monkeypatch.setenv("SAFEDEPLOY_BPFFS", root)
    yield loader.ensure_programs()
    shutil.rmtree(root, ignore_errors=True)


def test_hostile_argv_stays_one_visible_line_per_event_and_exact_in_json(tmp_path, own_pins, monkeypatch):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    logsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    logsock.bind(str(tmp_path / "log.sock"))
    logsock.setblocking(False)
    monkeypatch.setenv("SAFEDEPLOY_SYSLOG", str(tmp_path / "log.sock"))
    n = [0]
    # one watch at a time: readers of one ring buffer share it (each event reaches one of them)
    modes = {"wide": (["--wide"], {}), "cut": ([], {"COLUMNS": "150"}), "json": (["--json"], {})}

    # each example is a real run: few of them, and no shrinking (a failure prints its argv)
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(extra=ARGV)
    def one(extra):
        n[0] += 1
        mode = list(modes)[n[0] % 3]
        w, out = start_watch(*modes[mode][0], env=modes[mode][1])
        try:
            rep = tmp_path / f"r{n[0]}.jsonl"
            argv = [os.fsencode(sys.executable), b"-c", CODE.encode(), *extra]
            res = subprocess.run([*CLI, "run", "--policy", str(pol), "--report", str(rep), "--", *argv],
                                 capture_output=True, timeout=600)
            stderr = res.stderr.decode("utf-8", "surrogateescape")
            assert res.returncode == 0, stderr
            recs = report.load(rep)
            assert [(r["verdict"], r["dst_ip"], r["dst_port"]) for r in recs] == [("blocked", "127.0.0.2", 9)]
            rec = recs[0]
            run_id = rec["container"]
            needle = f'"container": "{run_id}"' if mode == "json" else f"[run {run_id}]"
            out.wait_for(needle)
        finally:
            w.terminate()
            w.wait(timeout=30)
        out.t.join(timeout=30)

        # JSONL: the exact argv, or the kernel's first SD_CMDLINE bytes of it
        full = b"\0".join(argv) + b"\0"
        got = b"\0".join(events.argv_bytes(rec))
        if rec["argv_truncated"]:
            assert got == full[:C["SD_CMDLINE"]]
        else:
            assert got + b"\0" == full
        assert events.argv_bytes(json.loads(json.dumps(rec))) == events.argv_bytes(rec)
        # stderr summary: one line for the one blocked destination, nothing raw
        lines = stderr.splitlines()
        assert len([ln for ln in lines if ln.startswith("safedeploy: blocked:")]) == 1, lines
        assert len(lines) == 2 and lines[1].startswith("safedeploy: report:"), lines
        assert not raw_controls(stderr.replace("\n", "")), stderr
        # the report table: a group title, the column heads, one row
        table = subprocess.run([*CLI, "report", str(rep)], capture_output=True, timeout=60)
        text = table.stdout.decode()
        assert text.splitlines()[0] == "BLOCKED (1 attempts)" and len(text.splitlines()) == 3, text
        assert not raw_controls(text.replace("\n", "")), text
        command = report.command_text(rec)
        assert "127.0.0.2/32 — circular: auth" in text.splitlines()[2] and text.splitlines()[2].endswith(command)
        # syslog: one datagram
        grams = []
        while True:
            try:
                grams.append(logsock.recv(65536).decode())
            except BlockingIOError:
                break
        assert len(grams) == 1 and f"container {run_id}: blocked: 127.0.0.2:9/tcp" in grams[0], grams
        assert not raw_controls(grams[0]), grams
        # watch: one line for the one event, nothing raw
        mine = [ln.rstrip("\n") for ln in out.lines if needle in ln]
        assert len(mine) == 1, mine
        line = mine[0]
        assert not raw_controls(line), line
        if mode == "json":
            ev = json.loads(line)
            assert ev["rule"] == "127.0.0.2/32" and ev["reason"] == "circular: auth"
            assert events.argv_bytes(ev) == events.argv_bytes(rec)
        else:
            assert "rule 127.0.0.2/32 (circular: auth)" in line, line
        if mode == "wide":
            assert line.endswith(f"  {command}"), (line, command)
        if mode == "cut":   # the command line makes every line longer than 150
            assert len(line) == 150 and line.endswith("…"), line
            assert f"  {command}".startswith(line[line.index("  /"):-1]), (line, command)

    try:
        one()
    finally:
        logsock.close()
    assert n[0] >= 3
