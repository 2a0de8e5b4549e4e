"""``tunnelnat-gateway activate``: make this archive the gateway's current software.

Run from the archive gateway/install_package.py fetched, LIB/gateway/<sha256>.pyz (the user data
at first boot, InstallGatewaySoftware on every change; docs/gateway-software.md):

1. refuses an archive whose content is not the SHA-256 its name says;
2. points LIB/tunnelnat-gateway.pyz (what the systemd units run) at it, in one rename of a
   relative symbolic link;
3. prunes old archives: the current and the previous one stay, the KEEP newest, and any younger
   than a minute (a document may have just fetched it, and runs it by its path);
4. with ``--restart-pair-agent``, when the current archive changed, restarts the pair agent (the
   one long-running program of the package: units, timers and documents start the new one by
   themselves) if systemd is PID 1 and the agent runs; without systemd (containers, the lab) it
   says so.

Prints one JSON line {"installed", "version", "sha256", "previous", "changed", "pair_agent"};
exits 1 with ``activate: <why>`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tunnelnat_gateway import software

CURRENT = "tunnelnat-gateway.pyz"  # in LIB, beside gateway/
KEEP = 3
YOUNG_SECONDS = 60
PAIR_UNIT = "tunnelnat-pair.service"


class ActivateError(RuntimeError):
    pass


def systemd_is_pid1() -> bool:
    """sd_booted() and PID 1 itself: the lab's namespaces share a host whose /run may have it."""
    try:
        return Path("/run/systemd/system").is_dir() and (
            Path("/proc/1/comm").read_text().strip() == "systemd"
        )
    except OSError:
        return False


def run_systemctl(argv: list[str]) -> int:
    return subprocess.run(["systemctl", *argv], capture_output=True, timeout=120).returncode


def restart_pair_agent(
    systemctl: Callable[[list[str]], int] = run_systemctl, systemd: bool | None = None
) -> str:
    if not (systemd_is_pid1() if systemd is None else systemd):
        return "no systemd"
    if systemctl(["is-active", "--quiet", PAIR_UNIT]) != 0:
        return "not running"
    if systemctl(["try-restart", PAIR_UNIT]) != 0:
        raise ActivateError(f"{PAIR_UNIT} does not restart")
    return "restarted"


def point_current(link: Path, archive: Path) -> None:
    """``link`` (LIB/tunnelnat-gateway.pyz) to gateway/<archive's name>, relative, in one rename:
    a unit starting meanwhile runs the old archive or the new one, never neither."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path("gateway") / archive.name)
    os.replace(tmp, link)


def activate(
    archive: Path,
    *,
    restart: bool = False,
    systemctl: Callable[[list[str]], int] = run_systemctl,
    systemd: bool | None = None,
    now: float | None = None,
) -> dict[str, object]:
    archive = Path(os.path.realpath(archive))
    versions, sha256 = archive.parent, archive.name.removesuffix(".pyz")
    if versions.name != "gateway" or not archive.name.endswith(".pyz"):
        raise ActivateError(f"{archive} is not LIB/gateway/<sha256>.pyz")
    identity = software.identity(archive)
    if identity["sha256"] != sha256:
        raise ActivateError(f"{archive} is {identity['sha256']}, not {sha256}")
    link = versions.parent / CURRENT
    previous = (
        os.path.basename(os.readlink(link)).removesuffix(".pyz") if link.is_symlink() else None
    )
    changed = previous != sha256
    if changed:
        point_current(link, archive)
    prune(versions, keep={sha256, previous}, now=time.time() if now is None else now)
    pair_agent = None
    if restart:
        pair_agent = restart_pair_agent(systemctl, systemd) if changed else "unchanged"
    return {
        "installed": str(archive),
        "version": identity["version"],
        "sha256": sha256,
        "previous": previous,
        "changed": changed,
        "pair_agent": pair_agent,
    }


def prune(versions: Path, keep: set[str | None], now: float) -> list[str]:
    """Removes old archives (see the module's docstring); returns their names."""
    archives = sorted(versions.glob("*.pyz"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for path in archives[KEEP:]:
        if path.name.removesuffix(".pyz") in keep or now - path.stat().st_mtime < YOUNG_SECONDS:
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelnat-gateway activate")
    parser.add_argument(
        "--restart-pair-agent", action="store_true", help="restart it if the package changed"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    archive = software.archive_path()
    try:
        if archive is None:
            raise ActivateError("run from the installed archive, not from a source tree")
        line = activate(archive, restart=args.restart_pair_agent)
    except (ActivateError, OSError, subprocess.SubprocessError) as exc:
        print(f"activate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(line, sort_keys=True))
    return 0
