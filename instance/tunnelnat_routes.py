"""Keep tunnelnat's host routes in the instance's own network configuration.

Runs on an enrolled instance, embedded in the AddHostRoute document (``make documents`` copies it
there). Standard library only: the instance has python3, nothing else of ours.

A route added with ``ip route replace`` is "foreign" to systemd-networkd, which Amazon Linux 2023
and Ubuntu 24.04 (through netplan) both use: a restart of networkd (a package update) deletes it
and partner traffic leaves by the default route until the next reconcile. So where networkd
manages the interface that reaches the gateway G, the routes go into networkd's own configuration:
a drop-in ``tunnelnat-<deployment>.conf`` for the ``.network`` file networkd uses for that
interface (read from ``networkctl status``), under /etc/systemd/network/ (drop-in directories
there apply to .network files in /run and /usr/lib too: systemd.network(5)). That one path serves
both distributions: Amazon Linux's amazon-ec2-net-utils links /run/systemd/network/70-IF.network,
netplan renders /run/systemd/network/10-netplan-IF.network. ``networkctl reload`` then makes
networkd own the routes without taking the interface down.

One drop-in per deployment: two deployments enrolling one instance never rewrite or remove each
other's. The ``tunnelnat.conf`` of earlier versions (one for whichever deployment wrote last) is
taken over only when every ``Gateway=`` in it is this deployment's G. A deployment with several
partners passes one scope per partner (``<deployment>.<partner>``): each partner's routes have
their own drop-in, and since every partner of a deployment routes via the same G, a partner's
scope never takes over the earlier versions' drop-in (it could hold another partner's routes).

Exit status of ``persist``: 0 the drop-in is in place, 3 networkd does not manage the interface
(the document falls back to its oneshot unit), 1 failure, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

NETWORKD_ETC = Path("/etc/systemd/network")
LEGACY_DROPIN_NAME = "tunnelnat.conf"  # earlier versions': one for every deployment
# The stack's deployment names, or a partner's lane of one (``<deployment>.<partner>``,
# core/lanes.py route_scope): part of a file name here, so never "." or "..", never a "/".
DEPLOYMENT = re.compile(r"[a-z][a-z0-9-]{1,28}[a-z0-9](\.[a-z][a-z0-9-]{0,22}[a-z0-9])?")
NOT_MANAGED = 3
# Interface names as the kernel allows them (IFNAMSIZ 16, no "/" or whitespace); we accept less.
IFNAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
# A .network file's name: it becomes a directory name of ours, so nothing that could climb out.
NETWORK_FILE_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,200}\.network")
MAX_DESTINATIONS = 32

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


class RouteError(ValueError):
    """Input that must not reach a configuration file."""


def parse_deployment(text: str) -> str:
    if not DEPLOYMENT.fullmatch(text):
        raise RouteError(f"deployment {text[:40]!r} is not a deployment name")
    return text


def is_partner_scope(deployment: str) -> bool:
    """``<deployment>.<partner>``: one partner's routes of a several-partner deployment."""
    return "." in parse_deployment(deployment)


def dropin_name(deployment: str) -> str:
    """This deployment's drop-in: ``tunnelnat-<deployment>.conf``."""
    return f"tunnelnat-{parse_deployment(deployment)}.conf"


def parse_gateway(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise RouteError(f"gateway {text!r} is not an IPv4 address") from None


def parse_destinations(text: str) -> list[ipaddress.IPv4Network]:
    """Comma-separated IPv4 networks, host bits clear, sorted and without duplicates."""
    nets = set()
    for item in text.split(","):
        try:
            nets.add(ipaddress.IPv4Network(item, strict=True))
        except ValueError:
            raise RouteError(f"destination {item!r} is not an IPv4 network") from None
    if not 1 <= len(nets) <= MAX_DESTINATIONS:
        raise RouteError(f"between 1 and {MAX_DESTINATIONS} destinations, got {len(nets)}")
    return sorted(nets)


def parse_route_get(output: str) -> str:
    """The interface of ``ip -o -4 route get G``'s answer ("10.0.0.5 dev ens5 src ...")."""
    words = output.split()
    for key, value in zip(words, words[1:], strict=False):
        if key == "dev":
            if not IFNAME.fullmatch(value):
                raise RouteError(f"unexpected interface name {value!r}")
            return value
    raise RouteError(f"no interface in the route to the gateway: {output.strip()!r}")


def parse_network_file(status: str) -> Path | None:
    """The ``Network File:`` of ``networkctl status IF``; None when networkd does not manage the
    interface ("n/a", or no such line)."""
    for line in status.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key.strip() == "Network File":
            value = value.strip()
            if value in ("", "n/a"):
                return None
            path = Path(value)
            if not path.is_absolute() or not NETWORK_FILE_NAME.fullmatch(path.name):
                raise RouteError(f"unexpected network file {value!r}")
            return path
    return None


def dropin_path(network_file: Path, deployment: str, etc_dir: Path = NETWORKD_ETC) -> Path:
    """Where our drop-in for ``network_file`` goes: ETC/NAME.network.d/tunnelnat-DEPLOYMENT.conf."""
    if not NETWORK_FILE_NAME.fullmatch(network_file.name):
        raise RouteError(f"unexpected network file {str(network_file)!r}")
    return etc_dir / f"{network_file.name}.d" / dropin_name(deployment)


def render_networkd_dropin(
    destinations: Iterable[ipaddress.IPv4Network], gateway: ipaddress.IPv4Address
) -> str:
    """The drop-in: one [Route] per destination via the gateway, in the main table."""
    lines = [
        "# tunnelnat (AddHostRoute): the partner's networks via the VPN gateway.",
        "# Rewritten by AddHostRoute, deleted by RemoveHostRoute; do not edit.",
    ]
    for net in sorted(set(destinations)):
        lines += ["", "[Route]", f"Destination={net}", f"Gateway={gateway}"]
    return "\n".join(lines) + "\n"


def existing_dropins(deployment: str, etc_dir: Path = NETWORKD_ETC) -> list[Path]:
    """This deployment's drop-ins, for any .network file."""
    return sorted(etc_dir.glob(f"*.network.d/{dropin_name(deployment)}"))


def legacy_dropins(gateway: ipaddress.IPv4Address, etc_dir: Path = NETWORKD_ETC) -> list[Path]:
    """Earlier versions' ``tunnelnat.conf`` drop-ins whose every route goes via ``gateway``
    (this deployment's G): ours to replace. One naming another G is another deployment's."""
    ours = []
    for path in sorted(etc_dir.glob(f"*.network.d/{LEGACY_DROPIN_NAME}")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        gateways = {line.split("=", 1)[1].strip() for line in lines if line.startswith("Gateway=")}
        if gateways <= {str(gateway)}:
            ours.append(path)
    return ours


def write_if_changed(path: Path, text: str) -> bool:
    """Atomically make ``path`` hold ``text`` (mode 0644); False when it already did."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def remove_dropin(path: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # only when empty: other drop-ins there are not ours
    except OSError:
        pass


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "LC_ALL": "C", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


def systemd_is_running() -> bool:
    """sd_booted(): systemd is PID 1 (the lab's machines and containers have none)."""
    return Path("/run/systemd/system").is_dir()


def persist(
    gateway: ipaddress.IPv4Address,
    destinations: Sequence[ipaddress.IPv4Network],
    *,
    deployment: str,
    etc_dir: Path = NETWORKD_ETC,
    run: Runner | None = None,
    systemd: bool | None = None,
) -> dict:
    """Put the routes into networkd's configuration for the interface that reaches ``gateway``.

    Returns a report; ``report["persistence"]`` is "networkd", or "none" (with a reason) when
    networkd does not manage that interface and the caller must persist the routes itself.
    Raises RouteError (or CalledProcessError) when it cannot do what it should.
    """
    run = run or run_command
    if not (systemd_is_running() if systemd is None else systemd):
        return {"persistence": "none", "reason": "systemd is not running"}
    route = run(["ip", "-o", "-4", "route", "get", str(gateway)])
    if route.returncode != 0:
        raise RouteError(f"no route to the gateway {gateway}: {route.stderr.strip()}")
    device = parse_route_get(route.stdout)
    status = run(["networkctl", "status", "--no-pager", "--lines=0", device])
    if status.returncode != 0:
        # networkd not running (or not installed): nothing of its to configure.
        reason = f"networkctl status {device}: {status.stderr.strip() or status.returncode}"
        return {"persistence": "none", "device": device, "reason": reason}
    network_file = parse_network_file(status.stdout)
    if network_file is None:
        return {"persistence": "none", "device": device, "reason": "not managed by networkd"}
    target = dropin_path(network_file, deployment, etc_dir)
    changed = write_if_changed(target, render_networkd_dropin(destinations, gateway))
    # Our drop-in for another .network file (the interface's file was renamed) would add the
    # routes a second time, or keep routes for networks no longer wanted: ours to remove; so is
    # an earlier version's drop-in of our G. Other deployments' drop-ins are theirs.
    stale = [p for p in existing_dropins(deployment, etc_dir) if p != target]
    if not is_partner_scope(deployment):
        stale += legacy_dropins(gateway, etc_dir)
    for path in stale:
        remove_dropin(path)
    if changed or stale:
        reload = run(["networkctl", "reload"])
        if reload.returncode != 0:
            # Leave no file networkd has not seen: the next run writes and reloads again.
            if changed:
                remove_dropin(target)
            raise RouteError(f"networkctl reload failed: {reload.stderr.strip()}")
    return {
        "persistence": "networkd",
        "device": device,
        "network_file": str(network_file),
        "dropin": str(target),
        "changed": changed or bool(stale),
        "removed": [str(p) for p in stale],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("persist", help="write the networkd drop-in for the routes")
    add.add_argument("--gateway", required=True)
    add.add_argument("--destinations", required=True, help="comma-separated IPv4 networks")
    add.add_argument(
        "--deployment", required=True, help="the tunnelnat deployment (or <deployment>.<partner>)"
    )
    add.add_argument("--etc-dir", type=Path, default=NETWORKD_ETC)
    args = parser.parse_args(argv)
    try:
        gateway = parse_gateway(args.gateway)
        destinations = parse_destinations(args.destinations)
        deployment = parse_deployment(args.deployment)
    except RouteError as exc:
        print(f"tunnelnat-routes: {exc}", file=sys.stderr)
        return 2
    try:
        report = persist(gateway, destinations, deployment=deployment, etc_dir=args.etc_dir)
    except (RouteError, OSError, subprocess.SubprocessError) as exc:
        print(f"tunnelnat-routes: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, sort_keys=True))
    return 0 if report["persistence"] == "networkd" else NOT_MANAGED


if __name__ == "__main__":
    sys.exit(main())
