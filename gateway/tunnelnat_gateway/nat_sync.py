"""The gateway-side program: applies the NAT table the controller wants, pulled from DynamoDB.

    tunnelnat_gateway.py configure --base-json JSON --table NAME --region R
    tunnelnat_gateway.py sync [--table NAME --region R] [--full]

Embedded in ConfigureGateway and SyncNatTable with ``tunnelnat/core/nat.py`` (SyncNatTable adds
``tunnelnat_delta.py``, the change-log reader). ``configure`` keeps a copy of it and nat.py in
``/etc/tunnelnat/lib``, run as ``sync`` by the boot unit ``tunnelnat-sync`` (gateway/systemd/).

What is applied lives in the ruleset, changing atomically with the maps: ``applied_generation``
and ``applied_state``. Both are EMPTY in the boot ruleset (``tunnelnat.nft``): nothing applied
since boot (TunnelUp=0 meanwhile); the next sync rebuilds the whole table (reason ``boot``).
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
    APPLIED_SETS,
    M32,
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


def read_meta(client: object, table_name: str) -> tuple[int, int | None]:
    """The desired generation and checksum (None: the store cannot vouch for it)."""
    meta = client.get_item(TableName=table_name, Key=META_KEY, ConsistentRead=True).get("Item", {})
    checksum = meta.get("checksum", {}).get("N")
    known = checksum is not None and meta.get("checksum_from", {}).get("N") == "0"
    return int(meta.get("generation", {}).get("N", "0")), int(checksum) & M32 if known else None


def read_desired(
    client: object, table_name: str, nat_mode: str, generation: int | None = None
) -> NatTable:
    """The generation first, then the mappings: the table is never older than its label (writes
    bump both at once). A row that cannot be applied is left out and listed in ``rejected``."""
    if generation is None:
        generation = read_meta(client, table_name)[0]
    return NatTable.from_rows(generation, read_rows(client, table_name), nat_mode)


def read_rows(client: object, table_name: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    append = rows.append
    pages = client.get_paginator("query").paginate(
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
            except (KeyError, TypeError):  # from_rows rejects it with the reason
                append((_text(item, "private_ip"), _text(item, "public_ip")))
    return rows


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


def _set_element(name: str) -> object:
    proc = subprocess.run(
        ["nft", "-j", "list", "set", "ip", TABLE, name], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    for entry in json.loads(proc.stdout).get("nftables", []):
        elems = entry.get("set", {}).get("elem")
        if elems:
            return elems[0]
    return None


def applied_generation() -> int | None:
    """None: no table, or nothing applied since boot."""
    element = _set_element("applied_generation")
    return None if element is None else int(element)


def applied_state() -> tuple[int, int, int] | None:
    """(generation, checksum, mappings) applied; None: empty or missing."""
    element = _set_element("applied_state")
    if not isinstance(element, dict) or len(element.get("concat", ())) != 3:
        return None
    generation, checksum, count = (int(x) for x in element["concat"])
    return generation, checksum, count


def render_boot_ruleset(base: GatewayBase) -> str:
    """Loaded at boot: every chain (the guard too), no mappings, nothing applied."""
    empty = render_nat_table(base, NatTable(0, (), base.nat_mode))
    return empty + "".join(f"flush set ip {TABLE} {n}\n" for n in APPLIED_SETS)


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
        generation, checksum = read_meta(client, table_name)
        state = applied_state()
        # An empty applied_generation means nothing applied since boot, whatever applied_state
        # holds: the boot restore, the health agent (TunnelUp=0) and this sync agree on it.
        marker = applied_generation()
        current = state[0] if state and marker is not None else marker
        report: dict = {"items_read": 1}
        try:
            from tunnelnat_gateway import (
                nat_delta as log,  # SyncNatTable's; the boot copy reads no change log
            )
        except ImportError:
            log = None
        if full:
            reason = "forced"
        elif marker is None:
            reason = "boot"
        elif state is None:  # a generation without a state: an older program's table
            reason = "drift"
        elif generation < current or (generation == current and log is None):
            reason, report["action"] = None, "unchanged"  # never backwards
        elif log is None:
            reason = "gap"
        else:
            args = (client, table_name, base.nat_mode, generation, checksum, state, report)
            reason = log.catch_up(*args, apply=nft_apply)
        if reason is not None:
            rows = read_rows(client, table_name)
            report["items_read"] += len(rows)
            desired = NatTable.from_rows(generation, rows, base.nat_mode)
            if state is not None and reason in ("gap", "drift"):  # maps only, chains stay
                nft_apply(render_map_update(desired))
            else:
                nft_apply(render_nat_table(base, desired))
                BOOT_RULESET.write_text(render_boot_ruleset(base))
            report.update(action="full", reason=reason, mappings=len(desired))
            report.update(rejected_report(desired))
        report.setdefault("mappings", state[2] if state else 0)
    return {
        "applied_generation": current if report["action"] == "unchanged" else generation,
        "previous_generation": current,
        "seconds": round(time.monotonic() - started, 3),
        **report,
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
