"""safedeploy: hermetic deploy environments for runc/podman containers and plain commands."""
__version__ = "0.1.0"
