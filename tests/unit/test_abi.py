"""ocihook/abi.py is generated from bpf/abi.h: it is current, and ctypes lays it out as C does."""
from __future__ import annotations

import ctypes

import pytest

from ocihook import abi, abigen


def test_generated_mirror_is_current():
    header, target = abigen.paths()
    with open(header) as f, open(target) as g:
        assert g.read() == abigen.generate(f.read()), "run: python -m ocihook.abigen"


@pytest.mark.parametrize("name", sorted(abi.LAYOUT))
def test_ctypes_layout_is_c_layout(name):
    size, fields = abi.LAYOUT[name]
    cls = abi.STRUCTS[name]
    assert ctypes.sizeof(cls) == size
    assert [f for f, *_ in cls._fields_] == list(fields)
    for field, (offset, fsize) in fields.items():
        desc = getattr(cls, field)
        assert (desc.offset, desc.size) == (offset, fsize), field


def test_generator_reads_the_c_subset():
    consts, structs = abigen.parse("#define SD_N 3\nstruct a { __u8 x; __u64 y; };\n"
                                   "struct b { struct a in[SD_N]; __u16 z; char s[5]; };")
    assert consts == {"SD_N": 3}
    lay = abigen.layout(structs)
    assert lay["a"][0] == 16 and lay["a"][2]["y"] == (8, 8)
    assert lay["b"][2] == {"in": (0, 48), "z": (48, 2), "s": (50, 5)} and lay["b"][0] == 56
    with pytest.raises(abigen.AbiError):
        abigen.parse("struct c { float f[SD_UNKNOWN]; };")
