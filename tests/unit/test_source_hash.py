"""The program version (loader.source_hash) is cached under the sources' file signature: a
warm start does not read and hash ~120 KB of C, and any change to a source changes it."""
import os

import pytest

from ocihook import loader


@pytest.fixture
def sources(tmp_path, monkeypatch):
    bpf = tmp_path / "bpf"
    bpf.mkdir()
    for name in loader.SOURCES:
        (bpf / name).write_text(f'#include "common.h"\nint {name.split(".")[0]};\n')
    (bpf / "common.h").write_text("#define X 1\n")
    monkeypatch.setattr(loader, "BPF_DIR", str(bpf))
    monkeypatch.setenv("SAFEDEPLOY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(loader, "RACY_S", 0)
    return bpf


def test_the_cached_version_is_used_while_no_source_changes(sources, monkeypatch):
    first = loader.source_hash()
    assert os.path.exists(loader._hash_cache())
    monkeypatch.setattr(loader, "source_text", lambda: pytest.fail("hashed the sources again"))
    assert loader.source_hash() == first


@pytest.mark.parametrize("change", ["same size", "header", "new file", "removed file"])
def test_any_change_to_the_sources_changes_the_version(sources, change):
    first = loader.source_hash()
    if change == "same size":
        path = sources / loader.SOURCES[0]
        before = os.stat(path)
        path.write_text(path.read_text().replace("int", "INT"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back: ctime tells
    elif change == "header":
        (sources / "common.h").write_text("#define X 2\n")
    elif change == "new file":
        (sources / "extra.h").write_text("")
    else:
        for name in loader.SOURCES:
            path = sources / name
            path.write_text(path.read_text().replace('#include "common.h"\n', "#define X 1\n"))
        os.unlink(sources / "common.h")  # the same text once inlined: the cache must not hide it
    again = loader.source_hash()
    os.unlink(loader._hash_cache())
    assert again == loader.source_hash()          # what hashing the sources now gives
    if change in ("same size", "header"):
        assert again != first


def test_a_source_changed_a_moment_ago_is_not_cached(sources, monkeypatch):
    monkeypatch.setattr(loader, "RACY_S", 3600)
    loader.source_hash()
    assert not os.path.exists(loader._hash_cache())


def test_no_writable_state_dir_only_costs_time(sources, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SAFEDEPLOY_STATE_DIR", str(blocker / "state"))   # cannot be made
    assert loader.source_hash() == loader.source_hash()
