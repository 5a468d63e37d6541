"""safedeploy: hermetic deploy environments for runc/podman containers and plain commands."""
__version__ = "0.1.0"


def sha256_hex(data: bytes) -> str:
    """sha256 without importing hashlib (OpenSSL's import costs the hook ~2.5 ms a start)."""
    try:
        from _sha256 import sha256  # CPython 3.11's built-in module
    except ImportError:  # pragma: no cover — 3.12 renamed it
        from hashlib import sha256
    return sha256(data).hexdigest()


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def write_atomic(path, text: str) -> None:
    """Write a file whole or not at all (temp file + rename), creating its directory."""
    import os
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # a full disk must not keep a half-written temp file
        except OSError:
            pass
        raise


def enable_site_packages() -> None:
    """The hook's launcher starts Python with -S (no site-packages: ~15 ms less per start).
    The cold paths — validating a new policy (jsonschema, yaml), compiling programs (bcc) —
    call this first to turn site-packages on."""
    import sys
    if sys.flags.no_site and "site" not in sys.modules:
        import site
        site.main()
