"""``tunnelnat-gateway switchover``: the Switchover document's verb (``tunnelnat switchover``).

Sent to the active: asks its pair agent to hand G over to the ready standby (the request file the
agent's ``check_request`` answers) and waits until it did, up to ``--wait-seconds``. Prints one
JSON line ``{"switched", "role", "seconds", "outcome", "detail", "to", "instance"}``; exits 1
when this gateway is not the active or the handover did not happen.

    switchover [--wait-seconds N] [--config PATH]

pair.json is read for two paths only (``role_file``, ``request_file``), as the agent defaults
them, so a gateway whose agent refuses its configuration still gets a clear answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DOCUMENT = "Switchover"
CONFIG_FILE = "/etc/tunnelnat/pair.json"  # TUNNELNAT_PAIR_CONFIG overrides (the lab, the tests)
ROLE_FILE = "/run/tunnelnat/pair-role"  # the pair agent's defaults (pair.py)
POLL_SECONDS = 0.1
MAX_WAIT_SECONDS = 120


class Refused(Exception):
    """Nothing was asked of the agent: the message says why."""


def _die(message: str) -> int:
    print(f"{DOCUMENT}: {message}", file=sys.stderr)
    return 1


def paths(config: Path) -> tuple[Path, Path]:
    """(role file, request file) as the pair agent places them."""
    try:
        data = json.loads(config.read_text())
    except OSError:
        raise Refused(f"no {config}: this is not a gateway of a pair") from None
    except ValueError as exc:
        raise Refused(f"{config} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Refused(f"{config} is not a JSON object")
    role = Path(data.get("role_file") or ROLE_FILE)
    request = data.get("request_file")
    return role, Path(request) if request else role.parent / "switchover"


def read_role(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def switchover(
    role_file: Path,
    request: Path,
    wait_seconds: float,
    *,
    command_id: str,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Ask, wait for ``<request>.result``, and say what happened (``switched`` is the verdict)."""
    role = read_role(role_file)
    if role != "active":
        raise Refused(f"this gateway is not the active (its agent says: {role or 'nothing'})")
    result_file = request.with_name(f"{request.name}.result")
    _remove(result_file)  # an answer to an earlier request is not this one's
    started = clock()
    new = request.with_name(f"{request.name}.new")
    new.write_text(f"{command_id}\n")
    new.replace(request)  # the agent sees the whole request or none
    deadline = started + wait_seconds
    # The agent answers in <request>.result (and removes the request) within one interval.
    while not _answered(result_file) and clock() < deadline:
        sleep(POLL_SECONDS)
    if not _answered(result_file):
        _remove(request)  # a late agent must not hand over by surprise
    role = read_role(role_file)
    try:
        answer = json.loads(result_file.read_text())
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        answer = {"outcome": "no_answer", "detail": "the pair agent did not answer"}
    switched = answer.get("outcome") == "done" and role == "standby"
    line: dict[str, Any] = {
        "switched": switched,
        "role": role or None,
        "seconds": round(clock() - started, 3),
    }
    line.update({k: answer.get(k) for k in ("outcome", "detail", "to", "instance")})
    return line


def _answered(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelnat-gateway switchover")
    parser.add_argument("--wait-seconds", default="30", help="1-120 (the document's WaitSeconds)")
    parser.add_argument("--config", help="pair.json (default: $TUNNELNAT_PAIR_CONFIG or /etc's)")
    args = parser.parse_args(argv)
    wait = args.wait_seconds
    if not (wait.isdigit() and 1 <= int(wait) <= MAX_WAIT_SECONDS):
        return _die(f"WaitSeconds must be 1-{MAX_WAIT_SECONDS}, not {wait!r}")
    config = Path(args.config or os.environ.get("TUNNELNAT_PAIR_CONFIG") or CONFIG_FILE)
    try:
        role_file, request = paths(config)
        line = switchover(
            role_file,
            request,
            int(wait),
            command_id=os.environ.get("SSM_COMMAND_ID") or "by hand",
        )
    except Refused as exc:
        return _die(str(exc))
    except OSError as exc:
        return _die(f"cannot ask the pair agent: {exc}")
    print(json.dumps(line, sort_keys=True))
    return 0 if line["switched"] else 1


if __name__ == "__main__":
    sys.exit(main())
