"""Measurement aid only (docs/policy.md's client table): run a command with a seccomp filter
that makes its network syscalls fail with a chosen errno, to see how each client reacts to an
error the product could return. The product itself does not do this: it will return its
errors from its cgroup programs (bpf_set_retval) or synthesize DNS answers.

    errinject.py dns ECONNREFUSED -- CMD...      every UDP/TCP send (sendto to an IP address,
                                                 sendmsg, sendmmsg) fails: the first DNS query
    errinject.py connect EACCES -- CMD...        every connect() to an IPv4/IPv6 address fails
    errinject.py vc EACCES -- CMD...             as dns, and writev() too: glibc's DNS over TCP
                                                 (resolv.conf `options use-vc`) writes with writev

seccomp cannot read the destination address, so the filter keys on the syscall and on the
length of the address argument: netlink (12 bytes) and unix sockets (nscd probes) pass.
"""
import ctypes
import errno
import os
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR = {"writev": 20, "connect": 42, "sendto": 44, "sendmsg": 46, "sendmmsg": 307}
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


def program(mode: str, err: int) -> bytes:
    fail = ERRNO | err
    p = [_ins(LD_W_ABS, 0, 0, 4), _ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64), _ins(RET_K, 0, 0, ALLOW),
         _ins(LD_W_ABS, 0, 0, 0)]
    if mode == "vc":
        p += [_ins(JEQ_K, 0, 1, NR["writev"]), _ins(RET_K, 0, 0, fail)]
    if mode in ("dns", "vc"):
        p += [_ins(JEQ_K, 0, 1, NR["sendmsg"]), _ins(RET_K, 0, 0, fail),
              _ins(JEQ_K, 0, 1, NR["sendmmsg"]), _ins(RET_K, 0, 0, fail),
              _ins(JEQ_K, 0, 3, NR["sendto"]), _ins(LD_W_ABS, 0, 0, 16 + 8 * 5),   # addrlen
              _ins(JEQ_K, 1, 0, 12), _ins(RET_K, 0, 0, fail), _ins(RET_K, 0, 0, ALLOW)]
    else:
        p += [_ins(JEQ_K, 0, 4, NR["connect"]), _ins(LD_W_ABS, 0, 0, 16 + 8 * 2),      # addrlen
              _ins(JEQ_K, 1, 0, 16), _ins(JEQ_K, 0, 1, 28), _ins(RET_K, 0, 0, fail)]
    p.append(_ins(RET_K, 0, 0, ALLOW))
    return b"".join(p)


def main() -> None:
    mode, name, sep, *cmd = sys.argv[1:]
    assert mode in ("dns", "vc", "connect") and sep == "--" and cmd, __doc__
    code = program(mode, getattr(errno, name))
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0):
        raise OSError(ctypes.get_errno(), "seccomp")
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
