"""``tunnelnat-gateway configure-gateway``: ConfigureGateway's work (the NAT side of a gateway).

    configure-gateway --partner-networks CIDR[,CIDR...] --table NAME --region R
                      [--nat-mode dedicated|instance|shared] [--shared-address A|none]
                      [--mss N] [--backend kernel|libipsec]
                      [--partners-path /tunnelnat/DEPLOYMENT/partners] [--partners-digest HEX]

One run at a time (a lock, waited for 240 s). The table with its fail-closed guard first (the
base kept for the boot ruleset and every sync, then a forced full apply, nat_sync.configure),
the table and region kept for the boot's sync; then, and only then, forwarding on with loose
reverse-path filtering, also for the next boot (docs/stack.md, Order on a new gateway: until
the guard is loaded this gateway forwards nothing, whatever ConfigureTunnel did). Prints one
JSON line ``{"configured", "forwarding", "cloud_init", "nat"}``; a failure is one line on stderr
starting with ``ConfigureGateway:`` and exit status 1.

Several partners (issue 23): with ``--partners-path`` (the stack's PartnersPath, core/lanes.py's
``parameter_path``) the lanes are read from SSM (GetParametersByPath), and the several-partner
table is applied instead: every partner's networks, aliases, NAT and S from its lane, every
lane's mappings from its own table (``lane.table``; ``--table`` stays the deployment's, kept in
source.json beside the lanes' tables). ``--partner-networks``, ``--nat-mode`` and
``--shared-address`` are then not used (the lanes say it per partner). An empty path is today's
one-partner gateway, unchanged. ``--partners-digest`` is not used here: it is in the document
only so that a changed set of lanes changes the association's parameters and re-runs it.

A partner removed from the partners file loses its ConfigureTunnel association, so nothing else
runs RemoveTunnel for it: with ``--partners-path`` every tunnel ConfigureTunnel recorded under
/etc/tunnelnat/tunnels whose name is no lane's is removed here (tunnel.remove_tunnel: its SAs,
connection, key, files and route go, the other tunnels' SAs stay up), reported as
``removed_tunnels``. Its NAT sets go with its lane: the several-partner table is rebuilt whole
from the lanes. Without ``--partners-path`` (one partner) no tunnel is ever removed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from tunnelnat.core.nat import GatewayBase
from tunnelnat_gateway import nat_sync, tunnel

NAME = "ConfigureGateway"
LOCK_FILE = Path("/run/lock/tunnelnat-configure-gateway.lock")
LOCK_WAIT = 240.0
SYSCTL_FILE = Path("/etc/sysctl.d/90-tunnelnat.conf")
# Loose reverse-path filtering: decrypted packets from the partner arrive on the tunnel device or
# the VPC interface with sources routed elsewhere.
SYSCTLS = (
    ("net.ipv4.conf.all.rp_filter", "2"),
    ("net.ipv4.conf.default.rp_filter", "2"),
    ("net.ipv4.ip_forward", "1"),
)
TOOLS = ("nft", "sysctl")
# The document's allowedPatterns, checked again here (a hand-made run).
PARTNERS_PATH = re.compile(r"^(/tunnelnat/[a-z][a-z0-9-]{1,28}[a-z0-9]/partners)?$")
PARTNERS_DIGEST = re.compile(r"^[0-9a-f]{0,64}$")
# The machine ConfigureTunnel's records and strongSwan's files live on (tests: a temporary root
# and shims for swanctl and ip).
TUNNEL_HOST: Callable[[], tunnel.Host] = tunnel.Host


class ConfigureError(RuntimeError):
    """What failed, said once on stderr after ``ConfigureGateway:``."""


@contextmanager
def locked(path: Path | None = None, wait: float | None = None) -> Iterator[None]:
    """One run at a time (the association's schedule, a parameter change, a hand-made run); the
    kernel drops the lock with the process."""
    path = LOCK_FILE if path is None else path
    wait = LOCK_WAIT if wait is None else wait
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ConfigureError(
                        f"another {NAME} run still holds the lock after {wait:.0f}s"
                    ) from None
                time.sleep(0.2)
        yield


def gateway_base(
    partner_networks: str,
    nat_mode: str = "dedicated",
    shared_address: str = "none",
    mss: str | int = 1360,
    backend: str = "kernel",
) -> GatewayBase:
    """The table's fixed part from the document's parameters, checked by core/nat.py's model."""
    if backend not in ("kernel", "libipsec"):
        raise ConfigureError(f"IpsecBackend must be kernel or libipsec, not {backend!r}")
    try:
        return GatewayBase(
            partner_networks=tuple(IPv4Network(n) for n in partner_networks.split(",")),
            nat_mode=nat_mode,
            shared_address=None if shared_address == "none" else IPv4Address(shared_address),
            mss=int(mss),
            # Userspace ESP leaves through its TUN device: the guard matches on it.
            tunnel_interface="ipsec0" if backend == "libipsec" else None,
        )
    except ValueError as exc:  # NatTableError too; a network with host bits set
        raise ConfigureError(str(exc)) from None


def forwarding_on(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Forwarding and rp_filter now, and in /etc/sysctl.d for the next boot."""
    for key, value in SYSCTLS:
        proc = run(["sysctl", "-qw", f"{key}={value}"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigureError(f"sysctl {key}={value} failed: {proc.stderr.strip()[:300]}")
    SYSCTL_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = SYSCTL_FILE.with_name(f".{SYSCTL_FILE.name}.tmp")
    tmp.write_text("".join(f"{key} = {value}\n" for key, value in sorted(SYSCTLS, key=_first)))
    os.replace(tmp, SYSCTL_FILE)


def _first(item: tuple[str, str]) -> bool:
    return item[0] != "net.ipv4.ip_forward"  # the file as it always was: ip_forward first


def configure(args: argparse.Namespace, client: object, ssm: Any = None) -> dict:
    """The guard's table, then forwarding (the order is the point: see the module docstring)."""
    lanes: list[str] | None = None  # several partners: the lanes' names, read this run
    if args.partners_path:
        nat, lanes = configure_partners(args, client, ssm)
    else:
        base = gateway_base(args.partner_networks, args.nat_mode, args.shared_address, args.mss,
                            args.backend)  # fmt: skip
        try:
            nat = nat_sync.configure(client, args.table, base)
            nat_sync.save_source(args.table, args.region)
        except Exception as exc:  # noqa: BLE001 - nft, the files, DynamoDB: one line says which
            raise ConfigureError(f"applying the nftables table failed: {exc}") from None
    forwarding_on()
    result = {
        "configured": True,
        "forwarding": True,
        "cloud_init": os.environ.get("TN_CLOUD_INIT", "none"),
        "nat": nat,
    }
    if lanes is not None:
        # After the table: the removed partner's sets are gone with its lane; after forwarding:
        # a tunnel that cannot be removed never keeps the other partners from being served.
        removed, failed = remove_unlisted_tunnels(lanes)
        result["removed_tunnels"] = removed
        if failed:
            result["tunnels_not_removed"] = failed
    return result


def recorded_tunnels(host: tunnel.Host) -> list[str]:
    """Every tunnel ConfigureTunnel recorded here: its NAME.charon (tunnel.configured_tunnels)
    or its NAME.json facts (what the pair agent, the health agent and ShowTunnels read as the
    gateway's tunnels)."""
    directory = host.path(f"{tunnel.STATE}/tunnels")
    names = set(tunnel.configured_tunnels(host))
    if directory.is_dir():
        names |= {p.stem for p in directory.glob("*.json")}
    return sorted(n for n in names if re.fullmatch(tunnel.PATTERNS["TunnelName"], n))


def remove_unlisted_tunnels(keep: list[str]) -> tuple[list[str], dict[str, str]]:
    """The tunnels recorded here that no lane names, removed one by one (under
    ConfigureTunnel's lock, as RemoveTunnel): (removed, {name: why not}). A failure is that
    tunnel's only."""
    host = TUNNEL_HOST()
    removed: list[str] = []
    failed: dict[str, str] = {}
    locked_out = ""
    for name in recorded_tunnels(host):
        if name in keep:
            continue
        if locked_out:  # each would wait its 240 s too: within the document's 900 s, not tried
            failed[name] = f"not tried: {locked_out}"
            continue
        try:
            tunnel.remove_tunnel(host, name)
        except (tunnel.Failed, OSError) as exc:
            failed[name] = str(exc)[:300]
            if "holds the lock" in failed[name]:  # tunnel.take_lock's: a ConfigureTunnel run hangs
                locked_out = failed[name]
            continue
        removed.append(name)
    return removed, failed


def configure_partners(
    args: argparse.Namespace, client: object, ssm: Any
) -> tuple[dict, list[str]]:
    """The several-partner table: the lanes from SSM, the base from them, every lane applied.
    Forwarding stays off unless every lane's mappings were read and the whole table loaded.
    Returns the report and the lanes' names (the tunnels to keep)."""
    if args.backend not in ("kernel", "libipsec"):
        raise ConfigureError(f"IpsecBackend must be kernel or libipsec, not {args.backend!r}")
    try:
        lanes = nat_sync.read_lanes(ssm, args.partners_path)
    except Exception as exc:  # noqa: BLE001 - SSM refused, or the lanes contradict each other
        raise ConfigureError(
            f"reading the partners under {args.partners_path} failed: {exc}"
        ) from None
    try:
        # As the one-partner base: libipsec's ESP leaves through its TUN device.
        interfaces = ("ipsec0",) if args.backend == "libipsec" else None
        base = nat_sync.partners_base(lanes, int(args.mss), interfaces)
    except (ValueError, nat_sync.GatewayError) as exc:  # NatTableError too
        raise ConfigureError(str(exc)) from None
    try:
        # A lane whose table cannot be read is loaded empty and reported (main fails the run
        # after forwarding is on): one partner's problem never keeps the others down.
        nat = nat_sync.configure_partners(client, base, lanes)
        nat_sync.save_source(args.table, args.region, {x.name: x.table for x in lanes})
    except Exception as exc:  # noqa: BLE001 - nft, the files, DynamoDB: one line says which
        raise ConfigureError(f"applying the nftables table failed: {exc}") from None
    return nat, [x.name for x in lanes]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunnelnat-gateway configure-gateway")
    p.add_argument("--partner-networks", required=True)
    p.add_argument("--nat-mode", default="dedicated", choices=("dedicated", "instance", "shared"))
    p.add_argument("--shared-address", default="none")
    p.add_argument("--mss", default="1360")
    p.add_argument("--backend", default="kernel", choices=("kernel", "libipsec"))
    p.add_argument("--table", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--partners-path", default="")
    p.add_argument("--partners-digest", default="")
    return p


def main(argv: list[str] | None = None, client: object | None = None, ssm: Any = None) -> int:
    args = parser().parse_args(argv)
    try:
        cloud_init = os.environ.get("TN_CLOUD_INIT", "none")
        for tool in TOOLS:
            if shutil.which(tool) is None:
                raise ConfigureError(f"{tool} is not installed (cloud-init: {cloud_init})")
        if not nat_sync.TABLE_NAME.fullmatch(args.table):
            raise ConfigureError(f"invalid table name {args.table[:80]!r}")
        if not nat_sync.REGION.fullmatch(args.region):
            raise ConfigureError(f"invalid region {args.region[:80]!r}")
        if not PARTNERS_PATH.fullmatch(args.partners_path):
            raise ConfigureError(f"invalid partners path {args.partners_path[:80]!r}")
        if not PARTNERS_DIGEST.fullmatch(args.partners_digest):
            raise ConfigureError("invalid partners digest")
        with locked():
            if client is None:
                import boto3  # on the gateway only

                client = boto3.client("dynamodb", region_name=args.region)
            if ssm is None and args.partners_path:
                import boto3

                ssm = boto3.client("ssm", region_name=args.region)
            result = configure(args, client, ssm)
    except ConfigureError as exc:
        print(f"{NAME}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    code = 0
    failed = result["nat"].get("failed")
    if failed:  # several partners: the others are served, the run still fails naming these
        errors = "; ".join(f"{n}: {result['nat']['lanes'][n]['error']}" for n in failed)
        print(f"{NAME}: partners not applied ({errors})", file=sys.stderr)
        code = 1
    stuck = result.get("tunnels_not_removed")
    if stuck:  # the next run (every lane change re-runs it) tries again
        errors = "; ".join(f"{n}: {why}" for n, why in stuck.items())
        print(f"{NAME}: tunnels of removed partners not removed ({errors})", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
