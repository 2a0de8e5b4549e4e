"""The NAT table's sync: applies the table the controller wants, pulled from DynamoDB.

    tunnelnat-gateway sync [--table NAME --region R] [--full] [--verify]

Run by SyncNatTable (the controller's syncs), by ConfigureGateway (``configure``: the base, then a
forced full apply) and at boot by the unit ``tunnelnat-sync`` (gateway/systemd/), without
arguments: the table and region ConfigureGateway saved in ``/etc/tunnelnat/source.json``.

What is applied lives in the ruleset, changing atomically with the maps: ``applied_generation``
and ``applied_state`` (generation . checksum . mappings). Both are EMPTY in the boot ruleset
(``tunnelnat.nft``): nothing applied since boot (TunnelUp=0 meanwhile); the next sync rebuilds the
whole table (reason ``boot``).

Each way a sync goes, in its JSON line (``action``, ``reason``):
- ``unchanged``: the generation applied is the desired one (or newer: never backwards), and the
  live maps, read back from the kernel, are what ``applied_state`` says (``verified``);
- ``delta``: the change log since the applied generation, as element deletions and creations
  (nat_delta.py);
- ``full``: the whole table read, at ``boot``, on a ``gap`` in the change log, on ``drift`` (the
  applied checksum is not the desired one, ``applied_state`` is missing, or the live maps are not
  what it says: changed behind the program's back), or ``forced`` (``--full``; a live difference
  found on the way is reported as ``drift``). ``gap`` and ``drift`` rewrite the maps only.

Reading the live maps back costs one ``nft -j list table`` and a digest of every element: 0.18 s
at 10,000 mappings (0.16 s nft's listing and its JSON, 0.02 s the comparison; 18 ms at 1,000),
ten times the ``nft -f`` of a one-mapping delta. So it is done when the generation is unchanged,
on ``--full`` and on ``--verify`` (before a delta: it builds on what the kernel holds), not on
every delta; the controller's scheduled reconcile sends ``Full``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelnat.core.nat import (
    APPLIED_SETS,
    M32,
    TABLE,
    GatewayBase,
    NatTable,
    NatTableError,
    ipv4_int,
    mapping_digest,
    render_map_update,
    render_nat_table,
)
from tunnelnat_gateway import nat_delta

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
    items = nat_delta.query_items(
        client,
        TableName=table_name,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": MAPPING_PK}},
        ProjectionExpression="private_ip, public_ip",
        ConsistentRead=True,
    )
    for item in items:
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
    return _state_of(_set_element("applied_state"))


def _state_of(element: object) -> tuple[int, int, int] | None:
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


@dataclass(frozen=True)
class LiveTable:
    """The sets and maps of ``ip tunnelnat`` as the kernel holds them, read in one listing."""

    state: tuple[int, int, int] | None
    enrolled: tuple[object, ...]
    snat: tuple[object, ...]  # [P, S] pairs as nft -j prints them
    dnat: tuple[object, ...]  # [S, P]


def read_live() -> LiveTable | None:
    """One ``nft -j list table ip tunnelnat`` (one snapshot of every set); None: no table."""
    proc = subprocess.run(
        ["nft", "-j", "list", "table", "ip", TABLE], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    found: dict[str, tuple[object, ...]] = {}
    for entry in json.loads(proc.stdout).get("nftables", []):
        body = entry.get("set") or entry.get("map")
        if isinstance(body, dict):
            found[str(body.get("name"))] = tuple(body.get("elem") or ())
    state = found.get("applied_state") or ()
    return LiveTable(
        state=_state_of(state[0]) if state else None,
        enrolled=found.get("enrolled", ()),
        snat=found.get("snat_map", ()),
        dnat=found.get("dnat_map", ()),
    )


def live_difference(live: LiveTable | None, nat_mode: str) -> str | None:
    """Why the live maps are not what their ``applied_state`` says (None: they are): the count of
    every set and map, ``dnat_map`` the inverse of ``snat_map``, ``enrolled`` its keys, and the
    checksum recomputed from ``snat_map``'s elements. In shared mode the kernel holds no S (no
    map elements, every row's S is the shared address): the count of ``enrolled`` is compared."""
    if live is None:
        return "the table ip tunnelnat is missing"
    if live.state is None:
        return "applied_state is empty"
    _, checksum, count = live.state
    if nat_mode == "shared":
        if live.snat or live.dnat:
            return "shared mode, yet snat_map or dnat_map holds elements"
        if len(live.enrolled) != count:
            return f"enrolled holds {len(live.enrolled)} addresses, {count} were applied"
        return None
    for name, elements in (("snat_map", live.snat), ("dnat_map", live.dnat)):
        if len(elements) != count:
            return f"{name} holds {len(elements)} elements, {count} were applied"
    try:
        snat = {str(p): str(s) for p, s in live.snat}  # type: ignore[misc]
        dnat = {str(p): str(s) for s, p in live.dnat}  # type: ignore[misc]
        total = sum(mapping_digest(ipv4_int(p), ipv4_int(s)) for p, s in snat.items()) & M32
    except (TypeError, ValueError):  # an element that is not an address pair
        return "snat_map or dnat_map holds an element that is not an address pair"
    if dnat != snat:
        return "dnat_map is not the inverse of snat_map"
    if len(live.enrolled) != count or set(map(str, live.enrolled)) != snat.keys():
        return "enrolled is not the set of snat_map's private addresses"
    if total != checksum:
        return f"snat_map's checksum is {total}, {checksum} was applied"
    return None


def load_base() -> GatewayBase:
    try:
        return GatewayBase.from_json(json.loads(BASE_FILE.read_text()))
    except FileNotFoundError:
        raise GatewayError(f"{BASE_FILE} is missing: run ConfigureGateway first") from None


def sync(client: object, table_name: str, *, full: bool = False, verify: bool = False) -> dict:
    """Bring the kernel's maps to the desired generation; the JSON report (module docstring)."""
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
        reason: str | None = None
        nft_spent = [0.0]

        def apply(ruleset: str) -> None:  # nft_apply, its time in the report
            t0 = time.monotonic()
            try:
                nft_apply(ruleset)
            finally:
                nft_spent[0] += time.monotonic() - t0

        if full:
            reason = "forced"
            if state is not None and marker is not None:  # what the forced apply repairs
                difference = live_difference(read_live(), base.nat_mode)
                if difference is not None:
                    report["drift"] = difference
        elif marker is None:
            reason = "boot"
        elif state is None:  # a generation without a state: an older program's table
            reason, report["detail"] = "drift", "applied_state is empty"
        elif generation < current:
            report["action"] = "unchanged"  # never backwards
        else:
            if verify or generation == current:
                # Behind the program's back (nft by hand, another tool) the maps may have
                # changed while applied_state still says what this program wrote.
                difference = live_difference(read_live(), base.nat_mode)
                if difference is not None:
                    reason, report["detail"] = "drift", difference
                else:
                    report["verified"] = True
            if reason is None:
                args = (client, table_name, base.nat_mode, generation, checksum, state, report)
                reason = nat_delta.catch_up(*args, apply=apply)
        if reason is not None:
            rows = read_rows(client, table_name)
            report["items_read"] += len(rows)
            desired = NatTable.from_rows(generation, rows, base.nat_mode)
            if state is not None and reason in ("gap", "drift"):  # maps only, chains stay
                apply(render_map_update(desired))
            else:
                apply(render_nat_table(base, desired))
                _write(BOOT_RULESET, render_boot_ruleset(base))
            report.update(action="full", reason=reason, mappings=len(desired))
            report.update(rejected_report(desired))
        report.setdefault("mappings", state[2] if state else 0)
    return {
        "applied_generation": current if report["action"] == "unchanged" else generation,
        "previous_generation": current,
        "seconds": round(time.monotonic() - started, 4),
        "nft_seconds": round(nft_spent[0], 4),
        **report,
    }


def configure(client: object, table_name: str, base: GatewayBase | str) -> dict:
    """ConfigureGateway's apply: keep the base (the boot ruleset's and every sync's), then the
    whole table, chains included."""
    if isinstance(base, str):
        base = GatewayBase.from_json(json.loads(base))
    _write(BASE_FILE, json.dumps(base.to_json(), indent=2) + "\n")
    return sync(client, table_name, full=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def save_source(table_name: str, region: str) -> None:
    """Where the table lives, for ``sync`` without arguments (the ``tunnelnat-sync`` unit)."""
    if not TABLE_NAME.fullmatch(table_name) or not REGION.fullmatch(region):
        raise GatewayError("invalid table or region")
    _write(SOURCE_FILE, json.dumps({"table": table_name, "region": region}) + "\n")


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


def timed_client(client: Any) -> dict:
    """Count ``client``'s DynamoDB calls and the seconds spent in them, from the parameters'
    validation (``provide-client-params``, the first event of a call) to the reply parsed
    (``after-call``): the endpoint's resolution, the request, DynamoDB's work. The report tells
    the gateway's own work from the store's."""
    spent = {"calls": 0, "seconds": 0.0}
    started: list[float] = []

    def before(**_kw: object) -> None:
        started.append(time.perf_counter())

    def after(**_kw: object) -> None:
        if started:
            spent["seconds"] += time.perf_counter() - started.pop()
            spent["calls"] += 1

    client.meta.events.register("provide-client-params.dynamodb", before)
    client.meta.events.register("after-call.dynamodb", after)
    return spent


def main(argv: list[str] | None = None) -> int:
    """``sync [--table NAME --region R] [--full] [--verify]`` (``tunnelnat-gateway sync``)."""
    parser = argparse.ArgumentParser(prog="tunnelnat-gateway")
    parser.add_argument("command", choices=["sync"])
    # Without them: what ConfigureGateway saved (the boot unit tunnelnat-sync).
    parser.add_argument("--table")
    parser.add_argument("--region")
    parser.add_argument("--full", action="store_true", help="the whole table, chains included")
    parser.add_argument("--verify", action="store_true", help="read the live maps back first")
    args = parser.parse_args(argv)
    try:
        if bool(args.table) != bool(args.region):
            raise GatewayError("--table and --region go together")
        table, region = (args.table, args.region) if args.table else saved_source()
        if not TABLE_NAME.fullmatch(table) or not REGION.fullmatch(region):
            raise GatewayError("invalid table or region")
        import boto3  # on the gateway only; the rendering needs none of it

        client = boto3.client("dynamodb", region_name=region)
        spent = timed_client(client)
        result = sync(client, table, full=args.full, verify=args.verify)
        result["dynamodb"] = {"calls": spent["calls"], "seconds": round(spent["seconds"], 4)}
    except (GatewayError, NatTableError) as exc:
        print(f"tunnelnat: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
