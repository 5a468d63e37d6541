"""The C data types and the libc calls the hook's hot path needs, built on ``_ctypes``.

``_ctypes`` is the C core that the ``ctypes`` package wraps; importing the package itself
costs the hook ~3 ms on every container start (it builds ~40 types, endian variants and
function-pointer caches the hook never uses), a bare interpreter start being ~10 ms.
These are the same objects (``Structure``, ``Union``, ``sizeof``, ``byref`` are ctypes'
own), and the scalar types below are defined as ctypes defines them, so cold paths may mix
them with ``ctypes`` (a ``Structure`` of either kind goes wherever ctypes takes one).
"""
from _ctypes import (FUNCFLAG_CDECL, FUNCFLAG_USE_ERRNO, RTLD_LOCAL, CFuncPtr, Structure, Union,  # noqa: F401
                     _SimpleCData, addressof, byref, dlopen, get_errno, sizeof)


class c_uint8(_SimpleCData):  # noqa: N801 — ctypes' names
    _type_ = "B"


class c_uint16(_SimpleCData):  # noqa: N801
    _type_ = "H"


class c_uint32(_SimpleCData):  # noqa: N801
    _type_ = "I"


class c_uint64(_SimpleCData):  # noqa: N801
    _type_ = "Q"


class c_int(_SimpleCData):  # noqa: N801
    _type_ = "i"


class c_long(_SimpleCData):  # noqa: N801
    _type_ = "l"


class c_char(_SimpleCData):  # noqa: N801
    _type_ = "c"


class _LibcFunction(CFuncPtr):
    """A libc function returning a C long, errno kept for get_errno() (ctypes.CDLL(None,
    use_errno=True).<name> with restype c_long); integer arguments are passed as C int."""
    _flags_ = FUNCFLAG_CDECL | FUNCFLAG_USE_ERRNO
    _restype_ = c_long


class _Process:
    """The running process's own symbols (dlopen(NULL)): what CFuncPtr looks names up in."""
    _handle = dlopen(None, RTLD_LOCAL)


def libc_function(name: str) -> CFuncPtr:
    return _LibcFunction((name, _Process))


def create_string_buffer(init: bytes):
    """A NUL-terminated char array holding init (ctypes.create_string_buffer(init))."""
    buf = (c_char * (len(init) + 1))()
    buf.value = init
    return buf


def memmove(dst, src: bytes, n: int) -> None:
    """Copy the first n bytes of src into the C object dst (ctypes.memmove with bytes)."""
    (c_char * n).from_address(addressof(dst))[:] = src[:n]
