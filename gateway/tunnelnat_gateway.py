"""The gateway-side program: applies the NAT table the controller wants, pulled from DynamoDB.

It runs on the gateway, embedded in the ConfigureGateway and SyncNatTable documents next to
``tunnelnat/core/nat.py`` (``make documents`` copies both), with the system's python3 and boto3.

    tunnelnat_gateway.py configure --base-json JSON --table NAME --region R
    tunnelnat_gateway.py sync --table NAME --region R [--full]

The applied generation is kept inside the ruleset itself (the ``applied_generation`` set), so it
changes atomically with the maps and vanishes with them on reboot: a gateway that lost its table
reads as "nothing applied" and gets the whole table back on the next sync.

At boot the ``tunnelnat-restore`` unit loads the saved ruleset ``/etc/tunnelnat/tunnelnat.nft``
(guard and all, no mappings) before the network and strongSwan start. Its ``applied_generation``
set is EMPTY: "nothing applied since boot". The health agent reports TunnelUp=0 while the set is
empty or missing, and the next sync here applies the whole table; every successful sync or
apply puts its generation (also 0) in the set.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

from tunnelnat.core.nat import (
    TABLE,
    GatewayBase,
    NatTable,
    NatTableError,
    render_map_update,
    render_nat_table,
)

STATE_DIR = Path("/etc/tunnelnat")
BASE_FILE = STATE_DIR / "gateway.json"
BOOT_RULESET = STATE_DIR / "tunnelnat.nft"
LOCK_FILE = Path("/run/lock/tunnelnat-nat.lock")
MAPPING_PK = "mapping"
META_KEY = {"pk": {"S": "meta"}, "sk": {"S": "generation"}}


class GatewayError(RuntimeError):
    pass


def read_desired(client: object, table_name: str, nat_mode: str) -> NatTable:
    """Read the generation first, then the mappings: the table we build is never older than the
    generation we label it with (writes bump both in one transaction)."""
    meta = client.get_item(TableName=table_name, Key=META_KEY, ConsistentRead=True).get("Item", {})
    generation = int(meta.get("generation", {}).get("N", "0"))
    rows: list[tuple[str, str]] = []
    append = rows.append
    paginator = client.get_paginator("query")
    pages = paginator.paginate(
        TableName=table_name,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": MAPPING_PK}},
        ProjectionExpression="private_ip, public_ip",
        ConsistentRead=True,
    )
    for page in pages:
        for item in page["Items"]:
            try:
                append((item["private_ip"]["S"], item["public_ip"]["S"]))
            except (KeyError, TypeError) as exc:
                raise GatewayError(f"refusing malformed mapping row {item!r}: {exc}") from None
    try:
        # Every address is validated here (NatTable.from_rows): nft is never handed a value
        # that is not a canonical IPv4 address; a bad row stops the sync loudly.
        return NatTable.from_rows(generation, rows, nat_mode)
    except NatTableError:
        raise  # a consistent-looking but ambiguous table (an address mapped twice)
    except ValueError as exc:
        raise GatewayError(f"refusing malformed mapping row: {exc}") from None


def applied_generation() -> int | None:
    """The generation in the kernel's ruleset; None when the table is not there or its
    ``applied_generation`` set is empty (the boot ruleset: nothing applied since boot)."""
    proc = subprocess.run(
        ["nft", "-j", "list", "set", "ip", TABLE, "applied_generation"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    for entry in json.loads(proc.stdout).get("nftables", []):
        elems = entry.get("set", {}).get("elem")
        if elems:
            return int(elems[0])
    return None


def render_boot_ruleset(base: GatewayBase) -> str:
    """The ruleset the gateway loads at boot: every chain (the guard with them), no mappings,
    and an empty ``applied_generation`` set, in one transaction."""
    empty = render_nat_table(base, NatTable(0, (), base.nat_mode))
    return empty + f"flush set ip {TABLE} applied_generation\n"


def nft_apply(ruleset: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=ruleset, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GatewayError(f"nft rejected the ruleset: {proc.stderr.strip()}")


def load_base() -> GatewayBase:
    try:
        return GatewayBase.from_json(json.loads(BASE_FILE.read_text()))
    except FileNotFoundError:
        raise GatewayError(f"{BASE_FILE} is missing: run ConfigureGateway first") from None


def sync(client: object, table_name: str, *, full: bool = False) -> dict:
    started = time.monotonic()
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        # Concurrent syncs queue here; each reads the newest table, so a late one never
        # overwrites a newer generation with an older one.
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = load_base()
        desired = read_desired(client, table_name, base.nat_mode)
        current = applied_generation()
        if current is None or full:
            nft_apply(render_nat_table(base, desired))
            BOOT_RULESET.write_text(render_boot_ruleset(base))
            action = "full"
        elif current >= desired.generation:
            action = "unchanged"
        else:
            nft_apply(render_map_update(desired))
            action = "updated"
    return {
        "action": action,
        "applied_generation": current if action == "unchanged" else desired.generation,
        "previous_generation": current,
        "mappings": len(desired),
        "seconds": round(time.monotonic() - started, 3),
    }


def configure(client: object, table_name: str, base_json: str) -> dict:
    base = GatewayBase.from_json(json.loads(base_json))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    BASE_FILE.write_text(json.dumps(base.to_json(), indent=2) + "\n")
    return sync(client, table_name, full=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelnat_gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sync", "configure"):
        p = sub.add_parser(name)
        p.add_argument("--table", required=True)
        p.add_argument("--region", required=True)
        if name == "sync":
            p.add_argument("--full", action="store_true")
        else:
            p.add_argument("--base-json", required=True)
    args = parser.parse_args(argv)
    import boto3  # on the gateway only; the rendering above needs none of it

    client = boto3.client("dynamodb", region_name=args.region)
    try:
        if args.command == "sync":
            result = sync(client, args.table, full=args.full)
        else:
            result = configure(client, args.table, args.base_json)
    except (GatewayError, NatTableError) as exc:
        print(f"tunnelnat: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
