"""The operator's ``tunnelnat`` command: status, enroll/unenroll, reconcile, doctor.

``main(argv)`` is the console script's entry point (declared in pyproject.toml).
"""

from tunnelnat_cli.app import Runtime, main

__all__ = ["Runtime", "main"]
