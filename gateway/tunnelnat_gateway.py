"""The gateway-side program: applies the NAT table the controller wants, pulled from DynamoDB.

It runs on the gateway, embedded in the ConfigureGateway and SyncNatTable documents next to
``tunnelnat/core/nat.py`` (``make documents`` copies both), with the system's python3 and boto3.

    tunnelnat_gateway.py configure --base-json JSON --table NAME --region R
    tunnelnat_gateway.py sync [--table NAME --region R] [--full]

``configure`` also keeps a copy of this program (and nat.py) in ``/etc/tunnelnat/lib`` and the
table's name and region in ``/etc/tunnelnat/source.json``: the boot unit ``tunnelnat-sync`` runs
that copy as ``sync`` without arguments after a reboot (gateway/systemd/).

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
import os
import re
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
SOURCE_FILE = STATE_DIR / "source.json"  # the table and region ConfigureGateway was given
TABLE_NAME = re.compile(r"^[A-Za-z0-9_.-]{3,255}$")
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
MAPPING_PK = "mapping"
META_KEY = {"pk": {"S": "meta"}, "sk": {"S": "generation"}}


class GatewayError(RuntimeError):
    pass


def read_desired(client: object, table_name: str, nat_mode: str) -> NatTable:
    """Read the generation first, then the mappings: the table we build is never older than the
    generation we label it with (writes bump both in one transaction).

    Every address is validated (NatTable.from_rows): nft is never handed a value that is not a
    canonical IPv4 address. A row that cannot be applied (malformed, or colliding with another
    on P or S) is left out and listed in the table's ``rejected``; every other row is applied."""
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
            except (KeyError, TypeError):
                # Kept as whatever text it has: from_rows rejects it with the reason.
                append((_text(item, "private_ip"), _text(item, "public_ip")))
    return NatTable.from_rows(generation, rows, nat_mode)


def _text(item: object, name: str) -> str:
    value = item.get(name) if isinstance(item, dict) else None
    value = value.get("S") if isinstance(value, dict) else value
    return str(value)[:60]


def rejected_report(table: NatTable, limit: int = 20) -> dict:
    """The rows left out, for the sync's JSON line (the controller logs and counts them)."""
    if not table.rejected:
        return {}
    rows = [{"private_ip": p, "public_ip": s, "reason": r} for p, s, r in table.rejected[:limit]]
    return {"rejected": rows, "rejected_count": len(table.rejected)}


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
        **rejected_report(desired),
    }


def configure(client: object, table_name: str, base_json: str) -> dict:
    base = GatewayBase.from_json(json.loads(base_json))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    BASE_FILE.write_text(json.dumps(base.to_json(), indent=2) + "\n")
    return sync(client, table_name, full=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def install_for_boot(table_name: str, region: str) -> str:
    """Keep this program, nat.py and where the table lives, for the ``tunnelnat-sync`` unit."""
    from tunnelnat.core import nat

    lib = STATE_DIR / "lib"
    _write(lib / "tunnelnat_gateway.py", Path(__file__).read_text(), 0o755)
    _write(lib / "tunnelnat" / "__init__.py", "")
    _write(lib / "tunnelnat" / "core" / "__init__.py", "")
    _write(lib / "tunnelnat" / "core" / "nat.py", Path(nat.__file__).read_text())
    _write(STATE_DIR / "source.json", json.dumps({"table": table_name, "region": region}) + "\n")
    return str(lib / "tunnelnat_gateway.py")


def saved_source() -> tuple[str, str]:
    """The table and region ``configure`` saved (``sync`` without arguments, at boot)."""
    try:
        saved = json.loads(SOURCE_FILE.read_text())
    except FileNotFoundError:
        raise GatewayError(f"{SOURCE_FILE} is missing: run ConfigureGateway first") from None
    table, region = str(saved.get("table", "")), str(saved.get("region", ""))
    if not TABLE_NAME.fullmatch(table) or not REGION.fullmatch(region):
        raise GatewayError(f"{SOURCE_FILE} holds an invalid table or region")
    return table, region


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunnelnat_gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("sync", "configure"):
        p = sub.add_parser(name)
        # sync without them uses what configure saved (the boot unit tunnelnat-sync)
        p.add_argument("--table", required=name == "configure")
        p.add_argument("--region", required=name == "configure")
        if name == "sync":
            p.add_argument("--full", action="store_true")
        else:
            p.add_argument("--base-json", required=True)
    args = parser.parse_args(argv)
    import boto3  # on the gateway only; the rendering above needs none of it

    try:
        if bool(args.table) != bool(args.region):
            raise GatewayError("--table and --region go together")
        table, region = (args.table, args.region) if args.table else saved_source()
        client = boto3.client("dynamodb", region_name=region)
        if args.command == "sync":
            result = sync(client, table, full=args.full)
        else:
            result = configure(client, table, args.base_json)
            result["installed"] = install_for_boot(table, region)
    except (GatewayError, NatTableError) as exc:
        print(f"tunnelnat: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
