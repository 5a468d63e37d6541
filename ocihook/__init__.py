"""safedeploy: hermetic deploy environments for runc/podman containers and plain commands."""
__version__ = "0.1.0"


def sha256_hex(data: bytes) -> str:
    """sha256 without importing hashlib (OpenSSL's import costs the hook ~2.5 ms a start)."""
    try:
        from _sha256 import sha256  # CPython 3.11's built-in module
    except ImportError:  # pragma: no cover — 3.12 renamed it
        from hashlib import sha256
    return sha256(data).hexdigest()


def enable_site_packages() -> None:
    """The hook's launcher starts Python with -S (no site-packages: ~15 ms less per start).
    The cold paths — validating a new policy (jsonschema, yaml), compiling programs (bcc) —
    call this first to turn site-packages on."""
    import sys
    if sys.flags.no_site and "site" not in sys.modules:
        import site
        site.main()
