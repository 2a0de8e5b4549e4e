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

Several partners (issue 23; ConfigureGateway with PartnersPath): gateway.json holds the lanes,
each lane's mappings are its own table, and ``sync --table T`` syncs the one lane whose table T is
(any other table is refused), by the same ways as above with that lane's own applied state
(``applied_<name>``) and maps: a change for B never touches A's elements, and a lane's full
rebuild rewrites its maps only. ``sync`` without ``--table`` (the boot unit) syncs every lane,
one lane's failure reported in its own entry and failing the run without stopping the others
(``sync_partners``; its section below).

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

from tunnelnat.core.lanes import Lane, LaneError, load_lanes, partner_table
from tunnelnat.core.nat import (
    APPLIED_SETS,
    LB,
    M32,
    RB,
    TABLE,
    GatewayBase,
    MultiPartnerBase,
    NatTable,
    NatTableError,
    PartnerNat,
    ipv4_int,
    mapping_digest,
    partner_set_names,
    render_map_update,
    render_nat_table,
    render_partner_delta,
    render_partner_map_update,
    render_partners_table,
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
    data = _read_base()
    if data.get("layout") == PARTNERS_LAYOUT:
        raise GatewayError("this gateway serves several partners: sync one partner's table")
    return GatewayBase.from_json(data)


def _read_base() -> dict:
    try:
        return json.loads(BASE_FILE.read_text())
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


# --- Several partners (issue 23) --------------------------------------------------------------
#
# With a partners file ConfigureGateway reads the lanes (core/lanes.py) from SSM and keeps them in
# gateway.json (``"layout": "partners"``) with the several-partner base; each lane's mappings are
# in its own DynamoDB table (``lane.table``), same schema, meta item and change log as the
# deployment's. Each lane is synced on its own, as the one-partner table is (unchanged, delta, full
# on boot/gap/drift/forced, never backwards), with its own applied state ``applied_<name>``
# (append-only: the highest generation is the state, core/nat.render_partner_delta), and every
# nft transaction of a lane's sync names that lane's sets and maps only: a change for B never
# touches A's elements. A lane's full rebuild (boot, gap, drift, forced) rewrites its maps only; the
# whole table (chains, every lane) is rendered by ConfigureGateway, or when the table is missing.
# ``applied_generation`` stays what the health and pair agents read: empty until every lane was
# applied since boot, then set once (the sum of the lanes' generations then).

PARTNERS_LAYOUT = "partners"
# The lanes' NAT modes as core/nat.py names them (the same words: core/config.NatMode's).
LANE_NAT_MODES = {"dedicated": "dedicated", "shared": "shared", "instance": "instance"}
# A lane's applied_<name> grows by one element per delta (adding is cheaper than deleting:
# core/nat.render_partner_delta); at this many, a delta deletes all but the newest.
RETIRE_AT = 64


def partners_base(
    lanes: tuple[Lane, ...], mss: int = 1360, tunnel_interfaces: tuple[str, ...] | None = None
) -> MultiPartnerBase:
    """The several-partner ruleset's fixed part from the lanes: their real networks, aliases,
    NAT modes and S (which tell overlapping partners apart). A lane's place is its index, so
    its marks are ``out_mark(lane.index)``/``in_mark(lane.index)`` as core/lanes.py says."""
    if not lanes:
        raise GatewayError("no lanes")
    if [lane.index for lane in lanes] != list(range(1, len(lanes) + 1)):
        raise GatewayError(f"the lanes' indexes are not 1..{len(lanes)} in order")
    if len({lane.deployment for lane in lanes}) != 1:
        raise GatewayError("lanes of more than one deployment")
    try:
        return MultiPartnerBase(
            tuple(
                PartnerNat(
                    name=lane.name,
                    networks=lane.networks,
                    nat_mode=LANE_NAT_MODES[lane.nat_mode],
                    shared_address=lane.shared_address,
                    aliases=lane.aliases,
                    public_addresses=lane.public_addresses,
                )
                for lane in lanes
            ),
            mss=mss,
            tunnel_interfaces=tunnel_interfaces,
        )
    except KeyError as exc:
        raise GatewayError(f"unknown NAT mode {exc}") from None


def read_lanes(ssm: Any, path: str) -> tuple[Lane, ...]:
    """Every lane under ``path`` (GetParametersByPath, page after page), each parameter's name
    checked against the lane it holds (``lane.parameter``). IAM authorises the call against the
    path itself, not the parameters returned (docs.aws.amazon.com/systems-manager/latest/
    userguide/ps-retrieval-authorization.html): the gateway role is granted the path's ARN."""
    values: list[str] = []
    params: dict[str, Any] = {"Path": path, "Recursive": False}
    while True:
        page = ssm.get_parameters_by_path(**params)
        for parameter in page.get("Parameters", ()):
            value = str(parameter.get("Value", ""))
            try:
                lane = Lane.from_json(value)
            except LaneError as exc:
                raise GatewayError(f"{parameter.get('Name')}: {exc}") from None
            if lane.parameter != parameter.get("Name"):
                raise GatewayError(f"{parameter.get('Name')} holds the lane {lane.parameter}")
            values.append(value)
        token = page.get("NextToken")
        if not token:
            break
        params["NextToken"] = token
    if not values:
        raise GatewayError(f"no partners under {path}")
    try:
        return load_lanes(values)
    except LaneError as exc:
        raise GatewayError(str(exc)) from None


def load_partners() -> tuple[MultiPartnerBase, tuple[Lane, ...]] | None:
    """gateway.json's several-partner base and lanes; None: a one-partner gateway."""
    data = _read_base()
    if data.get("layout") != PARTNERS_LAYOUT:
        return None
    try:
        lanes = tuple(Lane.from_dict(x) for x in data["lanes"])
        return MultiPartnerBase.from_json(data["base"]), lanes
    except (KeyError, TypeError, ValueError) as exc:
        raise GatewayError(f"{BASE_FILE} holds an invalid several-partner base: {exc}") from None


@dataclass(frozen=True)
class LaneRef:
    """What a lane's sync needs of gateway.json: its name, table and NAT mode (core/nat's). A
    sync reads only these: building every lane's Lane and the several-partner base would parse
    every pool address of every partner on each one-mapping change."""

    name: str
    table: str
    nat_mode: str


def lane_refs() -> tuple[LaneRef, ...] | None:
    """gateway.json's lanes as LaneRef, in order; None: a one-partner gateway."""
    data = _read_base()
    if data.get("layout") != PARTNERS_LAYOUT:
        return None
    try:
        return tuple(
            LaneRef(
                str(x["name"]),
                partner_table(str(x["deployment"]), str(x["name"])),
                LANE_NAT_MODES[str(x["nat_mode"])],
            )
            for x in data["lanes"]
        )
    except (KeyError, TypeError, ValueError) as exc:  # LaneError too
        raise GatewayError(f"{BASE_FILE} holds an invalid lane: {exc}") from None


def _lane_sets(name: str) -> dict[str, tuple[object, ...]] | None:
    """The lane's four sets and maps as the kernel holds them; None: no such lane in the
    kernel's table (or no table)."""
    found: dict[str, tuple[object, ...]] = {}
    for kind, set_name in zip(("set", "map", "map", "set"), partner_set_names(name), strict=True):
        proc = subprocess.run(
            ["nft", "-j", "list", kind, "ip", TABLE, set_name], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return None
        for entry in json.loads(proc.stdout).get("nftables", []):
            body = entry.get(kind)
            if isinstance(body, dict):
                found[set_name] = tuple(body.get("elem") or ())
    return found


def lane_states(name: str) -> list[tuple[int, int, int]] | None:
    """The lane's applied states, oldest first (the last is its state); None: no such set."""
    applied = partner_set_names(name)[3]
    proc = subprocess.run(
        ["nft", "-j", "list", "set", "ip", TABLE, applied], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    states = []
    for entry in json.loads(proc.stdout).get("nftables", []):
        for element in (entry.get("set") or {}).get("elem") or ():
            state = _state_of(element)
            if state is not None:
                states.append(state)
    return sorted(states)


def read_live_lane(name: str) -> LiveTable | None:
    sets = _lane_sets(name)
    if sets is None:
        return None
    enrolled, snat, dnat, applied = (sets.get(n, ()) for n in partner_set_names(name))
    states = sorted(s for s in map(_state_of, applied) if s is not None)
    return LiveTable(state=states[-1] if states else None, enrolled=enrolled, snat=snat, dnat=dnat)


def render_partners_boot(base: MultiPartnerBase) -> str:
    """Loaded at boot: every chain (the guard too), no mappings, nothing applied by any lane."""
    empty = render_partners_table(base, {})
    names = ["applied_generation", *(partner_set_names(p.name)[3] for p in base.partners)]
    return empty + "".join(f"flush set ip {TABLE} {n}\n" for n in names)


def sync_partners(
    client: object, *, only: str | None = None, full: bool = False, verify: bool = False
) -> dict:
    """A several-partner gateway's sync: one lane (``only``: its name) or every lane. One lane's
    report has today's keys (``applied_generation`` is that lane's) with ``lane`` and ``table``;
    every lane's: ``{"lanes": {name: report}, ...}``, a lane's failure in its own report
    (``error``) without stopping the others."""
    started = time.monotonic()
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the one-partner sync's lock: one sync at a time
        refs = lane_refs()
        if refs is None:
            raise GatewayError("this gateway serves one partner: sync its table")
        by_name = {ref.name: ref for ref in refs}
        if only is not None and only not in by_name:
            raise GatewayError(f"no partner {only!r} on this gateway")
        names = [only] if only is not None else list(by_name)
        states = {n: lane_states(n) for n in names}  # None: the kernel has no such lane
        missing = [n for n, s in states.items() if s is None]
        if (full and only is None) or missing:
            reason = "forced" if full and only is None else "boot"
            loaded = load_partners()  # the whole table: every lane's networks, aliases and S
            if loaded is None:  # gateway.json replaced between the two reads
                raise GatewayError("this gateway serves one partner: sync its table")
            reports = _whole_table(client, *loaded, reason)
        else:
            reports = {}
            for name in names:
                try:
                    lane_args = (client, by_name[name], states[name], full, verify)
                    reports[name] = _sync_lane(*lane_args)
                except Exception as exc:  # noqa: BLE001 - one lane's failure is its own
                    if only is not None:
                        raise
                    error = f"{type(exc).__name__}: {exc}"[:300]
                    reports[name] = {"lane": name, "table": by_name[name].table, "error": error}
        _mark_applied_since_boot(refs)
    if only is not None:
        if "error" in reports[only]:
            raise GatewayError(f"partner {only}: {reports[only]['error']}")
        return {**reports[only], "seconds": round(time.monotonic() - started, 4)}
    return {
        "lanes": reports,
        "failed": sorted(n for n, r in reports.items() if "error" in r),
        "seconds": round(time.monotonic() - started, 4),
    }


def _whole_table(
    client: object, base: MultiPartnerBase, lanes: tuple[Lane, ...], reason: str
) -> dict[str, dict]:
    """Every lane's table read, the whole ruleset (chains, guard, every lane) in one ``nft -f``;
    the boot ruleset saved. A lane whose table cannot be read is loaded empty with nothing
    applied (its ``applied_<name>`` empty, so its next sync is its ``boot``; its partner's
    traffic is dropped meanwhile, no instance being enrolled): the other lanes are served."""
    reports: dict[str, dict] = {}
    tables: dict[str, NatTable] = {}
    failed: list[str] = []
    for lane in lanes:
        mode = base.partner(lane.name).nat_mode
        states = lane_states(lane.name)
        t0 = time.monotonic()
        report: dict = {
            "lane": lane.name,
            "table": lane.table,
            "previous_generation": states[-1][0] if states else None,
        }
        try:
            generation, _ = read_meta(client, lane.table)
            rows = read_rows(client, lane.table)
        except Exception as exc:  # noqa: BLE001 - one lane's failure is its own
            failed.append(lane.name)
            reports[lane.name] = {**report, "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        tables[lane.name] = desired = NatTable.from_rows(generation, rows, mode)
        reports[lane.name] = {
            **report,
            "action": "full",
            "reason": reason,
            "applied_generation": generation,
            "items_read": 1 + len(rows),
            "mappings": len(desired),
            "seconds": round(time.monotonic() - t0, 4),
            **rejected_report(desired),
        }
    ruleset = render_partners_table(base, tables)
    if failed:  # nothing applied for them, so not every lane: applied_generation empty too
        names = ["applied_generation", *(partner_set_names(n)[3] for n in failed)]
        ruleset += "".join(f"flush set ip {TABLE} {n}\n" for n in names)
    t0 = time.monotonic()
    nft_apply(ruleset)
    spent = round(time.monotonic() - t0, 4)
    for name in tables:
        reports[name]["nft_seconds"] = spent
    _write(BOOT_RULESET, render_partners_boot(base))
    return reports


def _sync_lane(
    client: object,
    lane: LaneRef,
    states: list[tuple[int, int, int]] | None,
    full: bool,
    verify: bool,
) -> dict:
    """One lane, as ``sync`` does the one-partner table; its full rebuild rewrites its maps only.
    ``states``: its applied states as the kernel held them under the lock (``lane_states``)."""
    started = time.monotonic()
    name, table_name, mode = lane.name, lane.table, lane.nat_mode
    generation, checksum = read_meta(client, table_name)
    states = states or []
    state = states[-1] if states else None
    current = state[0] if state else None
    report: dict = {"lane": name, "table": table_name, "items_read": 1}
    reason: str | None = None
    nft_spent = [0.0]

    def apply(ruleset: str) -> None:
        t0 = time.monotonic()
        try:
            nft_apply(ruleset)
        finally:
            nft_spent[0] += time.monotonic() - t0

    if full:
        reason = "forced"
        if state is not None:
            difference = _lane_difference(name, mode)
            if difference is not None:
                report["drift"] = difference
    elif state is None:
        reason = "boot"  # applied_<name> is empty: nothing applied for this lane since boot
    elif generation < current:  # type: ignore[operator]
        report["action"] = "unchanged"  # never backwards
    else:
        if verify or generation == current:
            difference = _lane_difference(name, mode)
            if difference is not None:
                reason, report["detail"] = "drift", difference
            else:
                report["verified"] = True
        if reason is None:
            retire = states[:-1] if len(states) >= RETIRE_AT else []

            def render(delta: nat_delta.NatDelta, nat_mode: str, after: tuple) -> str:
                return render_partner_delta(
                    name, delta.removes, delta.adds, after, nat_mode, retire=retire
                )

            args = (client, table_name, mode, generation, checksum, state, report)
            reason = nat_delta.catch_up(*args, apply=apply, render=render)
    if reason is not None:
        rows = read_rows(client, table_name)
        report["items_read"] += len(rows)
        desired = NatTable.from_rows(generation, rows, mode)
        apply(render_partner_map_update(name, desired))
        report.update(action="full", reason=reason, mappings=len(desired))
        report.update(rejected_report(desired))
    report.setdefault("mappings", state[2] if state else 0)
    return {
        **report,
        "applied_generation": current if report["action"] == "unchanged" else generation,
        "previous_generation": current,
        "seconds": round(time.monotonic() - started, 4),
        "nft_seconds": round(nft_spent[0], 4),
    }


_ONE_PARTNER_NAMES = re.compile(r"\b(enrolled|snat_map|dnat_map)\b")


def _lane_difference(name: str, nat_mode: str) -> str | None:
    """``live_difference`` of the lane's own sets, saying their names (``snat_bank_a``...)."""
    difference = live_difference(read_live_lane(name), nat_mode)
    if difference is None:
        return None
    enrolled, snat, dnat, _ = partner_set_names(name)
    names = {"enrolled": enrolled, "snat_map": snat, "dnat_map": dnat}
    return _ONE_PARTNER_NAMES.sub(lambda m: names[m.group(1)], difference)


def _mark_applied_since_boot(lanes: tuple[LaneRef, ...]) -> None:
    """Set ``applied_generation`` once every lane has a state (after boot it is empty)."""
    if applied_generation() is not None:
        return
    total = 0
    for lane in lanes:
        states = lane_states(lane.name)
        if not states:
            return
        total += states[-1][0]
    nft_apply(f"add element ip {TABLE} applied_generation {LB} {total} {RB}\n")


def configure_partners(client: object, base: MultiPartnerBase, lanes: tuple[Lane, ...]) -> dict:
    """ConfigureGateway's apply with a partners file: keep the base and the lanes, then the whole
    table, every lane's mappings (forced)."""
    data = {
        "layout": PARTNERS_LAYOUT,
        "base": base.to_json(),
        "lanes": [x.as_dict() for x in lanes],
    }
    _write(BASE_FILE, json.dumps(data, indent=2) + "\n")
    return sync_partners(client, full=True)


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


def save_source(table_name: str, region: str, lanes: dict[str, str] | None = None) -> None:
    """Where the table lives, for ``sync`` without arguments (the ``tunnelnat-sync`` unit);
    with several partners, each lane's table too (``lanes``: name -> table)."""
    if not TABLE_NAME.fullmatch(table_name) or not REGION.fullmatch(region):
        raise GatewayError("invalid table or region")
    saved: dict[str, Any] = {"table": table_name, "region": region}
    if lanes is not None:
        if not all(map(TABLE_NAME.fullmatch, lanes.values())):
            raise GatewayError("invalid lane table")
        saved["lanes"] = dict(lanes)
    _write(SOURCE_FILE, json.dumps(saved) + "\n")


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
        result = sync_any(client, table if args.table else None, args.full, args.verify)
        result["dynamodb"] = {"calls": spent["calls"], "seconds": round(spent["seconds"], 4)}
    except (GatewayError, NatTableError) as exc:
        print(f"tunnelnat: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    # Several partners: every lane ran; any lane that failed fails the run (the boot unit's
    # status, SyncNatTable's), its report saying which.
    return 1 if result.get("failed") else 0


def sync_any(client: object, table: str | None, full: bool, verify: bool) -> dict:
    """The sync gateway.json calls for: the one-partner table (``table``, or the saved one), or
    with several partners one lane (``table`` must be one of the lanes' tables) or every lane."""
    refs = lane_refs()
    if refs is None:
        return sync(client, table or saved_source()[0], full=full, verify=verify)
    lanes = {ref.table: ref.name for ref in refs}
    if table is None:
        return sync_partners(client, full=full, verify=verify)
    if table not in lanes:
        raise GatewayError(
            f"{table} is not one partner's table on this gateway (several partners: "
            f"{', '.join(sorted(lanes))})"
        )
    return sync_partners(client, only=lanes[table], full=full, verify=verify)


if __name__ == "__main__":
    sys.exit(main())
