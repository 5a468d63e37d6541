"""safedeploy: hermetic deploy environments for runc/podman containers and plain commands."""
__version__ = "0.1.0"


def enable_site_packages() -> None:
    """The hook's launcher starts Python with -S (no site-packages: ~15 ms less per start).
    The cold paths — validating a new policy (jsonschema, yaml), compiling programs (bcc) —
    call this first to turn site-packages on."""
    import sys
    if sys.flags.no_site and "site" not in sys.modules:
        import site
        site.main()
