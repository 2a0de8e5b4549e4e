"""The operator's ``tunnelnat`` command, run against the lab the way an operator runs it.

The installed console script (``.venv/bin/tunnelnat``) runs as a separate process with
``--endpoint-url`` pointing at the lab's moto server, the lab's deployment and table, dummy
credentials and no AWS configuration files, so it can only ever talk to moto on loopback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from lab import topology as topo
from lab.ssm_runner import REPO, default_env

CONSOLE_SCRIPT = REPO / ".venv" / "bin" / "tunnelnat"


def cli_argv(lab: topo.Lab, *args: str) -> list[str]:
    """``tunnelnat ARGS`` aimed at the lab (global options may follow the subcommand)."""
    # The console script when installed; the same entry point as a module otherwise.
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m"]
    if not CONSOLE_SCRIPT.exists():
        command.append("tunnelnat_cli")
    return [
        *command,
        *args,
        "--endpoint-url",
        lab.moto_endpoint,
        "--region",
        topo.REGION,
        "--deployment",
        topo.DEPLOYMENT,
        "--table",
        topo.TABLE,
    ]


def cli_env(lab: topo.Lab) -> dict[str, str]:
    return {
        **default_env(),
        **lab.aws_env(),
        # Never a profile or real credentials from the machine's files.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "PYTHONPATH": str(REPO / "lambdas"),
    }


@contextlib.contextmanager
def quiet_moto_errors() -> Iterator[None]:
    """moto's server (in this process) logs a traceback for every action it does not implement;
    ``doctor`` asks for one (DescribeInstanceInformation) and reports the check as unknown."""
    logger = logging.getLogger("werkzeug")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_cli(lab: topo.Lab, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``tunnelnat ARGS`` against the lab; its exit status, stdout and stderr."""
    return subprocess.run(
        cli_argv(lab, *args),
        env=cli_env(lab),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def status_json(lab: topo.Lab) -> dict[str, Any]:
    """``tunnelnat status --json``, parsed; LabError when the command fails."""
    proc = run_cli(lab, "status", "--json")
    if proc.returncode != 0:
        raise topo.LabError(f"tunnelnat status failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def doctor_json(lab: topo.Lab) -> tuple[int, dict[str, Any]]:
    """``tunnelnat doctor --json``: its exit status and report."""
    with quiet_moto_errors():
        proc = run_cli(lab, "doctor", "--json")
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        raise topo.LabError(
            f"tunnelnat doctor printed no report ({proc.returncode}): {proc.stderr.strip()}"
        ) from None
