"""Generate ocihook/abi.py, the Python mirror of bpf/abi.h (``python -m ocihook.abigen``).

bpf/abi.h is the one source of the structs and constants the programs share with userspace.
This reads the small C subset it is written in (``#define SD_X <int>``; structs of
``__u8/__u16/__u32/__u64/char`` fields, nested structs and arrays) and writes ctypes
structures (on ``cdata``: ctypes' types without the cost of importing ctypes), the constants,
and the layout (size, and offset and size of every field) that C's natural alignment gives. ``tests/unit/test_abi.py`` regenerates and diffs, and checks that
ctypes lays the structures out as C does; a kernel test compares with what bcc compiled.
"""
from __future__ import annotations

import os
import re
import sys

from .errors import SafedeployError

_SCALARS = {"__u8": ("cdata.c_uint8", 1), "__u16": ("cdata.c_uint16", 2), "__u32": ("cdata.c_uint32", 4),
            "__u64": ("cdata.c_uint64", 8), "char": ("cdata.c_char", 1)}
_DEFINE = re.compile(r"^#define\s+(SD_[A-Z0-9_]+)\s+(0x[0-9a-fA-F]+|\d+)\b")
_STRUCT = re.compile(r"struct\s+(\w+)\s*\{(.*?)\};", re.S)
_FIELD = re.compile(r"^(?:volatile\s+)?(struct\s+\w+|\w+)\s+(\w+)(?:\[(\w+)\])?$")


class AbiError(SafedeployError, ValueError):
    """abi.h holds something the generator does not understand."""


def parse(text: str) -> tuple[dict[str, int], dict[str, list[tuple[str, str, int | None]]]]:
    """(constants, structs): structs map a name to [(field, type, array length or None)]."""
    consts: dict[str, int] = {}
    for line in text.splitlines():
        m = _DEFINE.match(line.strip())
        if m:
            consts[m.group(1)] = int(m.group(2), 0)
    body = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    structs: dict[str, list[tuple[str, str, int | None]]] = {}
    for m in _STRUCT.finditer(body):
        fields = []
        for decl in m.group(2).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            f = _FIELD.match(decl)
            if not f:
                raise AbiError(f"struct {m.group(1)}: cannot read field {decl!r}")
            ctype, name, count = f.groups()
            n = None
            if count is not None:
                n = int(count) if count.isdigit() else consts.get(count)
                if n is None:
                    raise AbiError(f"struct {m.group(1)}.{name}: unknown array length {count}")
            fields.append((name, ctype, n))
        structs[m.group(1)] = fields
    return consts, structs


def layout(structs) -> dict[str, tuple[int, int, dict[str, tuple[int, int]]]]:
    """C natural-alignment layout: struct -> (size, alignment, {field: (offset, size)})."""
    out: dict[str, tuple[int, int, dict[str, tuple[int, int]]]] = {}

    def size_align(ctype: str) -> tuple[int, int]:
        if ctype in _SCALARS:
            return _SCALARS[ctype][1], _SCALARS[ctype][1]
        name = ctype.split()[1]
        if name not in out:
            raise AbiError(f"struct {name} is used before it is defined")
        return out[name][0], out[name][1]

    for sname, fields in structs.items():
        off, align, fmap = 0, 1, {}
        for name, ctype, n in fields:
            size, a = size_align(ctype)
            size *= n or 1
            off = (off + a - 1) // a * a
            fmap[name] = (off, size)
            off += size
            align = max(align, a)
        out[sname] = ((off + align - 1) // align * align, align, fmap)
    return out


def _class_name(sname: str) -> str:
    return "".join(p.capitalize() for p in sname.removeprefix("sd_").split("_"))


def generate(text: str) -> str:
    consts, structs = parse(text)
    lay = layout(structs)
    lines = ['"""Generated from bpf/abi.h by ``python -m ocihook.abigen``. DO NOT EDIT."""',
             "from . import cdata", "", "# constants"]
    lines += [f"{k} = {v:#x}" if k.startswith("SD_RULE_") else f"{k} = {v}" for k, v in consts.items()]
    for sname, fields in structs.items():
        lines += ["", "", f"class {_class_name(sname)}(cdata.Structure):", f'    """struct {sname}"""',
                  "    _fields_ = ["]
        for name, ctype, n in fields:
            t = _SCALARS[ctype][0] if ctype in _SCALARS else _class_name(ctype.split()[1])
            if ctype == "char" or n is None:
                t = f"{t} * {n}" if n else t
            else:
                t = f"{t} * {n}"
            lines.append(f'        ("{name}", {t}),')
        lines.append("    ]")
    lines += ["", "", "# struct -> (size, {field: (offset, size)}) as C lays it out",
              "LAYOUT = {"]
    for sname, (size, _, fmap) in lay.items():
        lines.append(f'    "{sname}": ({size}, {fmap!r}),')
    lines += ["}", "", "STRUCTS = {"]
    lines += [f'    "{sname}": {_class_name(sname)},' for sname in structs]
    lines += ["}", ""]
    return "\n".join(lines)


def paths() -> tuple[str, str]:
    from . import resources  # noqa: PLC0415
    return os.path.join(resources.path("bpf"), "abi.h"), os.path.join(resources.PKG_DIR, "abi.py")


def main(argv: list[str] | None = None) -> int:
    header, target = paths()
    with open(header) as f:
        text = generate(f.read())
    if argv and argv[0] == "--check":
        with open(target) as f:
            if f.read() != text:
                print(f"{target} is stale: run python -m ocihook.abigen", file=sys.stderr)
                return 1
        return 0
    with open(target, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
