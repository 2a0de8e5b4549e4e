"""``tunnelnat status``: enrolled and pending instances, generations, tunnels."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat_cli.aws import EXIT_OK, error_code
from tunnelnat_cli.context import Ctx
from tunnelnat_cli.fleet import gateways, instances_by_id, tagged_instances
from tunnelnat_cli.pair import (
    DeployedSoftware,
    GatewaySoftware,
    PairState,
    deployed_software,
    gateway_software,
    pair_state,
    short,
)
from tunnelnat_cli.partner_lanes import (
    lane_doc,
    network_text,
    read_lanes,
    table_snapshot,
    tunnel_of,
)
from tunnelnat_cli.render import ago, dump_json, iso, table
from tunnelnat_cli.tunnels import tunnel_states

SCHEMA = "tunnelnat.status/v1"
ENROLLED = "enrolled"
NOT_SEEN = "not-seen"
# Skipped so that everything else converges (issue 14); only a human settles them.
ATTENTION = ("conflict", "other-vpc", "route-conflict")


def collect(ctx: Ctx) -> dict[str, Any]:
    """The status document (the ``--json`` output; its schema is ``schemas.STATUS``)."""
    now = ctx.runtime.now()
    snapshot = ctx.reader.snapshot()
    ec2 = ctx.aws.client("ec2")
    tagged = {i.instance_id: i for i in tagged_instances(ec2, ctx.args.tag_key, ctx.args.tag_value)}
    ids = set(snapshot.records) | set(snapshot.mappings) | set(tagged)
    known = instances_by_id(ec2, sorted(ids)) if ids else {}
    rows = []
    for instance_id in sorted(ids):
        record = snapshot.records.get(instance_id)
        mapping = snapshot.mappings.get(instance_id)
        inst = known.get(instance_id)
        if record is not None:
            status, reason, updated = record.status, record.reason, record.updated_at
        elif mapping is not None:
            status, reason, updated = "mapped", "a mapping without an instance record", None
        else:
            status = NOT_SEEN
            reason = "tagged, but the controller has not recorded it yet"
            updated = None
        rows.append(
            {
                "instance_id": instance_id,
                "name": inst.name if inst else None,
                "state": inst.state if inst else "gone",
                "private_ip": (record.private_ip if record else None)
                or (mapping.private_ip if mapping else None)
                or (inst.private_ip if inst else None),
                "public_ip": (mapping.public_ip if mapping else None)
                or (record.public_ip if record else None),
                "status": status,
                "reason": reason,
                "route_installed": bool(record and record.route_installed),
                "mapped": mapping is not None,
                "updated_at": iso(updated),
            }
        )
    found = gateways(ec2, ctx.deployment)
    pair = _pair(ctx, ec2, found)
    # Of a pair, the gateway is the active (G's ENI holder); a single one as before.
    gateway_id = pair.active if pair else (found[-1].instance_id if found else None)
    try:
        tunnels = tunnel_states(
            ctx.aws.client("cloudwatch"),
            gateway_ids={g.instance_id for g in found},
            deployment=ctx.deployment,
            now=now,
        )
    except ClientError as exc:  # the table is what status is for; tunnels are a bonus
        ctx.err.write(
            f"tunnelnat: tunnels unknown: {exc.operation_name} failed ({error_code(exc)})\n"
        )
        tunnels = []
    enrolled = sum(1 for r in rows if r["status"] == ENROLLED)
    attention = {s: n for s in ATTENTION if (n := sum(1 for r in rows if r["status"] == s))}
    # Several partners (issue 23): one entry per lane, each from its own table; a deployment
    # without a partners file has no lanes and its document is as before (no "partners" key).
    lanes = read_lanes(ctx.aws.client("ssm"), ctx.deployment)
    if lanes.problem:
        ctx.err.write(f"tunnelnat: partners unknown: {lanes.problem}\n")
    partners = []
    for lane in lanes.lanes:
        snap, problem = table_snapshot(ctx.aws.client("dynamodb"), lane)
        partners.append(lane_doc(lane, snap, problem, tunnel_of(lane, tunnels)))
    doc = {
        "schema": SCHEMA,
        "deployment": ctx.deployment,
        "table": ctx.args.table,
        "region": ctx.aws.region,
        "generated_at": iso(now),
        "gateway": {
            "instance_id": gateway_id,
            "desired_generation": snapshot.desired_generation,
            "applied_generation": snapshot.applied_generation,
            "applied_by": snapshot.applied_by,
            "applied_at": iso(snapshot.applied_at),
            "in_sync": snapshot.applied_generation >= snapshot.desired_generation
            and (snapshot.applied_by in (None, gateway_id) or snapshot.desired_generation == 0),
        },
        "pair": _pair_doc(pair, snapshot.desired_generation, now),
        "software": _software_doc(
            deployed_software(ctx.aws.client("ssm"), ctx.deployment), gateway_software(found, pair)
        ),
        "instances": rows,
        "tunnels": [
            {
                "tunnel": t.tunnel,
                "gateway": t.gateway,
                "state": t.state,
                "value": t.value,
                "timestamp": iso(t.timestamp),
            }
            for t in tunnels
        ],
        "summary": {
            "total": len(rows),
            "enrolled": enrolled,
            "pending": len(rows) - enrolled,
            "attention": attention,
        },
    }
    if partners:
        doc["partners"] = partners
    return doc


def run(ctx: Ctx) -> int:
    doc = collect(ctx)
    if ctx.args.json:
        dump_json(doc, ctx.out)
        return EXIT_OK
    now = ctx.runtime.now()
    out = ctx.out
    gw = doc["gateway"]
    out.write(f"deployment {doc['deployment']}  table {doc['table']}  region {doc['region']}\n")
    sync = "in sync" if gw["in_sync"] else "BEHIND: run `tunnelnat reconcile`"
    out.write(
        f"gateway {gw['instance_id'] or 'NOT FOUND'}  generation applied "
        f"{gw['applied_generation']} / desired {gw['desired_generation']} ({sync})\n"
    )
    if doc["pair"] is not None:
        _write_pair(out, doc["pair"], now)
    _write_software(out, doc["software"], pair=doc["pair"] is not None)
    out.write("\n")
    if doc["instances"]:
        out.write(
            table(
                ["INSTANCE", "NAME", "PRIVATE IP", "PUBLIC (S)", "STATUS", "LAST CHANGE", "REASON"],
                [
                    [
                        r["instance_id"],
                        r["name"],
                        r["private_ip"],
                        r["public_ip"],
                        r["status"],
                        _ago_iso(r["updated_at"], now),
                        r["reason"],
                    ]
                    for r in doc["instances"]
                ],
            )
            + "\n"
        )
    else:
        out.write(f"no instances enrolled or tagged {ctx.args.tag_key}={ctx.args.tag_value}\n")
    summary = doc["summary"]
    out.write(f"\n{summary['enrolled']} enrolled, {summary['pending']} not enrolled\n")
    if summary["attention"]:
        counts = ", ".join(f"{n} {status}" for status, n in summary["attention"].items())
        out.write(
            f"needs a human: {counts} (skipped so the rest converge; the REASON column names the "
            "other party; `tunnelnat doctor` gives the fix)\n"
        )
    out.write("\n")
    if doc["tunnels"]:
        out.write(
            table(
                ["TUNNEL", "GATEWAY", "STATE", "LAST DATAPOINT"],
                [
                    [
                        t["tunnel"],
                        t["gateway"] or f"(deployment {ctx.deployment})",
                        t["state"],
                        _ago_iso(t["timestamp"], now),
                    ]
                    for t in doc["tunnels"]
                ],
            )
            + "\n"
        )
    else:
        out.write("tunnels: no TunnelUp metric found (is the gateway's health agent running?)\n")
    if doc.get("partners"):
        _write_partners(out, doc["partners"])
    return EXIT_OK


def _write_partners(out: Any, partners: list[dict[str, Any]]) -> None:
    """One row per partner: its tunnel, what instances address (alias->real, or real), its S,
    its enrolments (from its own table) and whether the gateway applied them."""
    rows = []
    for p in partners:
        if p["problem"]:
            enrolled, generation = "?", p["problem"]
        else:
            enrolled = f"{p['enrolled']} ({p['pending']} pending)"
            behind = p["applied_generation"] < p["desired_generation"]
            generation = (
                f"{p['applied_generation']}/{p['desired_generation']}{' BEHIND' if behind else ''}"
            )
        rows.append([
            p["partner"], f"IKEv{p['ike_version']}", p["tunnel_state"], p["endpoint"],
            network_text(p), ",".join(p["public_addresses"]), enrolled, generation,
        ])  # fmt: skip
    out.write("\n")
    out.write(
        table(
            [
                "PARTNER",
                "IKE",
                "TUNNEL",
                "ENDPOINT",
                "INSTANCES ADDRESS (alias->real)",
                "S",
                "ENROLLED",
                "GENERATION",
            ],
            rows,
        )  # fmt: skip
        + "\n"
    )


def _pair(ctx: Ctx, ec2: Any, found: list) -> PairState | None:
    """The pair (None: a single gateway). G's ENI is the gateways' one secondary interface
    (doctor, which reads the configuration, also matches it against G)."""
    return pair_state(ec2, ctx.aws.client("dynamodb"), ctx.args.table, found, None)


def _pair_doc(pair: PairState | None, desired: int, now: float) -> dict[str, Any] | None:
    if pair is None:
        return None
    record, last = pair.record, pair.record.last_failover if pair.record else None
    return {
        "active": pair.active,
        "eni_id": pair.eni_id,
        "standbys": [
            {
                "instance_id": s.instance_id,
                "applied_generation": s.readiness.applied_generation if s.readiness else None,
                "behind": s.behind(desired),
                "sas": s.readiness.sas if s.readiness else None,
                "tunnel_loaded": s.readiness.tunnel_loaded if s.readiness else None,
                "heartbeat_heard_at": iso(s.readiness.peer_heard_at) if s.readiness else None,
                "heard": s.heard(now),
                "reported_at": iso(s.readiness.updated_at) if s.readiness else None,
                "stale": s.stale(now),
            }
            for s in pair.standbys
        ],
        "failovers": record.failovers if record else 0,
        "last_failover": {
            "from": last.from_instance,
            "to": last.to_instance,
            "at": iso(last.at),
            "detected_seconds": last.detected_seconds,
            "switch_seconds": last.switch_seconds,
            "reason": last.reason,
        }
        if last
        else None,
    }


def _software_doc(deployed: DeployedSoftware, running: list[GatewaySoftware]) -> dict[str, Any]:
    return {
        "parameter": deployed.parameter,
        "deployed": {"version": deployed.version, "sha256": deployed.sha256}
        if deployed.sha256
        else None,
        "problem": deployed.problem,
        "gateways": [
            {
                "instance_id": g.instance_id,
                "version": g.version,
                "sha256": g.sha256,
                "deployed": g.deployed(deployed),
                "reported_at": iso(g.reported_at) if g.reported else None,
            }
            for g in running
        ],
    }


def _write_software(out: Any, software: dict[str, Any], *, pair: bool) -> None:
    deployed = software["deployed"]
    if deployed is None:
        out.write(f"software: the deployed gateway software is unknown: {software['problem']}\n")
    else:
        out.write(
            f"software: deployed {deployed['version'] or '?'} (sha256 {short(deployed['sha256'])})"
            "\n"
        )
    for g in software["gateways"]:
        if g["version"] is None:
            why = (
                "its pair agent reports none (software older than the gateway package)"
                if pair
                else "a single gateway has no pair agent to report it"
            )
            out.write(f"  {g['instance_id']} version unknown: {why}\n")
            continue
        verdict = {
            True: "the deployed one",
            False: "NOT the deployed one (`tunnelnat doctor`)",
            None: "deployed or not: unknown",
        }[g["deployed"]]
        out.write(f"  {g['instance_id']} {g['version']} ({short(g['sha256'])}): {verdict}\n")


def _write_pair(out: Any, pair: dict[str, Any], now: float) -> None:
    out.write(f"pair: active {pair['active'] or 'NONE (G is attached to no gateway)'}")
    out.write(f" (G's ENI {pair['eni_id']})\n" if pair["eni_id"] else "\n")
    if not pair["standbys"]:
        out.write("  standby NONE: nobody takes over if the active fails (`tunnelnat doctor`)\n")
    for s in pair["standbys"]:
        problems = []
        if s["stale"]:
            problems.append(f"agent silent (last report {_ago_iso(s['reported_at'], now)})")
        if s["behind"]:
            problems.append(f"behind (generation {s['applied_generation']})")
        if s["tunnel_loaded"] is False:
            problems.append("tunnel not loaded")
        if s["heard"] is False:
            problems.append("not hearing the active")
        facts = [
            f"generation {s['applied_generation'] if s['applied_generation'] is not None else '?'}",
            "tunnel loaded"
            if s["tunnel_loaded"]
            else "tunnel ?"
            if s["tunnel_loaded"] is None
            else "tunnel NOT loaded",
            f"SAs {s['sas'] if s['sas'] is not None else '?'}",
            f"heard the active {_ago_iso(s['heartbeat_heard_at'], now)}",
        ]
        verdict = "NOT READY: " + "; ".join(problems) if problems else "ready"
        out.write(f"  standby {s['instance_id']} {verdict} ({', '.join(facts)})\n")
    last = pair["last_failover"]
    if last is None:
        out.write("  no failover recorded\n")
    else:
        timing = ", ".join(
            f"{name} {last[key]:.1f} s"
            for name, key in (("detected", "detected_seconds"), ("switched", "switch_seconds"))
            if last[key] is not None
        )
        out.write(
            f"  last failover {last['from']} -> {last['to']} {_ago_iso(last['at'], now)}"
            f"{' (' + timing + ')' if timing else ''}; {pair['failovers']} in all\n"
        )


def _ago_iso(text: str | None, now: float) -> str:
    if text is None:
        return "-"
    return ago(datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp(), now)
