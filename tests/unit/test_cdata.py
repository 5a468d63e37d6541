"""ocihook.cdata: the C types and libc call of the hook's hot path, on ctypes' C core. They
must be what ctypes' are (size, alignment, values, errno), and the hot path must not pay for
importing the ctypes package (~3 ms a container start)."""
import ctypes
import errno
import os
import subprocess
import sys

import pytest

import ocihook
from ocihook import cdata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ocihook.__file__)))  # checkout or site-packages


@pytest.mark.parametrize("name", ["c_uint8", "c_uint16", "c_uint32", "c_uint64", "c_int", "c_long", "c_char"])
def test_scalars_are_ctypes_own(name):
    ours, theirs = getattr(cdata, name), getattr(ctypes, name)
    assert (cdata.sizeof(ours), ctypes.alignment(ours)) == (ctypes.sizeof(theirs), ctypes.alignment(theirs))
    if name != "c_char":
        top = (1 << (8 * ctypes.sizeof(theirs) - (name in ("c_int", "c_long")))) - 1
        assert ours(top).value == theirs(top).value == top
        assert ours(top + 1).value == theirs(top + 1).value           # the same wrap-around


def test_structures_mix_with_ctypes():
    class Mine(cdata.Structure):
        _fields_ = [("a", cdata.c_uint8), ("b", cdata.c_uint64), ("name", cdata.c_char * 5)]

    class Theirs(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint64), ("name", ctypes.c_char * 5)]

    m = Mine(a=1, b=2)
    m.name = b"abc"
    assert ctypes.sizeof(m) == ctypes.sizeof(Theirs) == 24
    assert bytes(Theirs.from_buffer_copy(bytes(m))) == bytes(m)
    assert Theirs.from_buffer_copy(bytes(m)).name == b"abc"
    buf = cdata.create_string_buffer(b"/sys/fs/bpf")
    assert buf.value == b"/sys/fs/bpf" and cdata.sizeof(buf) == 12       # NUL-terminated
    arr = (cdata.c_uint32 * 4)()
    cdata.memmove(arr, bytes(range(16)), 16)
    assert bytes(arr) == bytes(range(16))
    with pytest.raises(ValueError):
        cdata.memmove(arr, b"short", 16)                            # never reads past the source


def test_a_libc_call_keeps_errno():
    from ocihook import bpfsys
    assert cdata.libc_function("getpid")() == os.getpid()
    syscall = cdata.libc_function("syscall")                        # returns a C long: -1 stays -1
    assert syscall(bpfsys._NR_BPF, 0xFFFF, None, 0) == -1 and cdata.get_errno() == errno.EINVAL


def test_the_hooks_hot_path_imports_no_ctypes():
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ocihook import hook, session, privileges, refuser, loader, pinned, compiler, bpfsys\n"
            "print(sorted(m for m in ('ctypes', 'struct', 'json', 're', 'pathlib') if m in sys.modules))") % ROOT
    out = subprocess.run([sys.executable, "-S", "-E", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
