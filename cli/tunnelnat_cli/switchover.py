"""``tunnelnat switchover``: hand G over to the ready standby on purpose (maintenance of the
active, a kernel update), as a deploy does before it terminates the active (issue 20).

The active is the gateway holding G's ENI (EC2's answer, as ``status`` reads it). The command
refuses unless a standby is ready as its agent last reported it (``gateway/<id>``: role
``standby``, the tunnel's configuration loaded, the NAT table at the table's generation, the
report fresh), then sends the operator-only ``<deployment>-Switchover`` document to the active.
There the pair agent hands over (no detection wait, no forced detach) and the document prints one
JSON line. ``--wait`` follows the command and prints the new active from ``meta/pair``, checked
against EC2 (the ENI's holder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.adapters.commands import CommandError, SsmCommands
from tunnelnat.adapters.pair import META_PK, PAIR_SK
from tunnelnat_cli.aws import EXIT_FINDINGS, EXIT_OK, CliError
from tunnelnat_cli.context import Ctx
from tunnelnat_cli.fleet import gateways
from tunnelnat_cli.pair import PairState, StandbyView, eni_holder, pair_state
from tunnelnat_cli.render import dump_json

SCHEMA = "tunnelnat.switchover/v1"
DOCUMENT = "Switchover"
# The document's own wait for the agent's answer (its WaitSeconds): the handover takes about a
# second; the rest is for an agent busy with a slow AWS call.
DOCUMENT_WAIT_SECONDS = 30


class SwitchoverCommand(SsmCommands):
    """SSM Run Command for Switchover, which only operators send (stacks/documents.py
    OPERATOR_ONLY: in no role's SendCommand statement)."""

    def document_name(self, document: str) -> str:
        if document != DOCUMENT:
            raise ValueError(f"unknown document {document!r}")
        return f"{self._prefix}{document}"


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    ready: bool
    reason: str  # why not ready ("ready" when it is)


def candidate(standby: StandbyView, desired: int, now: float) -> Candidate:
    """Whether ``standby`` is ready to take G, as its agent last reported."""
    r, sid = standby.readiness, standby.instance_id
    if r is None:
        return Candidate(sid, False, "its agent has not reported")
    if standby.stale(now):
        return Candidate(sid, False, f"its agent's report is {standby.age(now):.0f}s old")
    if r.role != "standby":
        return Candidate(sid, False, f"its agent says {r.role or 'no role'}")
    if r.tunnel_loaded is not True:
        return Candidate(sid, False, "the tunnel's configuration is not loaded")
    if standby.behind(desired) is not False:
        return Candidate(
            sid, False, f"NAT table at generation {r.applied_generation}, the table's is {desired}"
        )
    return Candidate(sid, True, "ready")


def preflight(ctx: Ctx) -> tuple[PairState, list[Candidate], int]:
    """The pair, its standbys as candidates, the table's generation; CliError when there is no
    pair or nobody holds G."""
    ec2 = ctx.aws.client("ec2")
    found = gateways(ec2, ctx.deployment)
    pair = pair_state(ec2, ctx.aws.client("dynamodb"), ctx.args.table, found, None)
    if pair is None:
        raise CliError(
            f"{ctx.deployment} is not a gateway pair (no pair agent has reported): a single "
            "gateway has nobody to hand G to"
        )
    if pair.active is None:
        raise CliError(
            "no running gateway holds G's ENI (a failover in progress?): nothing to hand over; "
            "`tunnelnat status` says more",
            code=EXIT_FINDINGS,
        )
    desired, _ = ctx.reader.generations()
    now = ctx.runtime.now()
    return pair, [candidate(s, desired, now) for s in pair.standbys], desired


def last_switchover(ctx: Ctx) -> tuple[str | None, dict[str, Any] | None, int]:
    """meta/pair: the active the agents recorded, the last switchover, how many there were."""
    item = ctx.reader.get(META_PK, PAIR_SK) or {}
    last = (item.get("last_switchover") or {}).get("M") or {}

    def text(value: dict[str, Any] | None) -> str | None:
        return None if not value else value.get("S") or value.get("N")

    record = {key: text(last.get(key)) for key in ("from", "to", "at", "seconds", "reason")}
    for key in ("at", "seconds"):
        record[key] = float(record[key]) if record[key] is not None else None  # type: ignore[assignment]
    count = int(float(text(item.get("switchovers")) or 0))
    return text(item.get("active")), (record if last else None), count


def send(ctx: Ctx, active: str) -> str:
    """SendCommand only (no --wait): the command's ID."""
    try:
        reply = ctx.aws.client("ssm").send_command(
            InstanceIds=[active],
            DocumentName=f"{ctx.deployment}-{DOCUMENT}",
            Parameters={"WaitSeconds": [str(DOCUMENT_WAIT_SECONDS)]},
            TimeoutSeconds=max(30, int(ctx.args.timeout)),
            Comment="tunnelnat switchover",
        )
    except ClientError as exc:
        raise CliError(
            f"SendCommand {ctx.deployment}-{DOCUMENT} to {active}: "
            f"{exc.response['Error'].get('Message') or exc} (is the document deployed, and the "
            "caller allowed ssm:SendCommand with it?)"
        ) from None
    return str(reply["Command"]["CommandId"])


def follow(ctx: Ctx, active: str) -> dict[str, Any]:
    """Run the document on the active and wait for its line; CliError when it did not switch."""
    port = ctx.runtime.commands or SwitchoverCommand(
        ctx.aws.client("ssm"),
        document_prefix=f"{ctx.deployment}-",
        timeout_seconds=ctx.args.timeout,
        poll_seconds=ctx.args.interval,
        sleep=ctx.runtime.sleep,
    )
    try:
        result = port.run(active, DOCUMENT, {"WaitSeconds": str(DOCUMENT_WAIT_SECONDS)})
    except (CommandError, ClientError) as exc:
        raise CliError(f"{DOCUMENT} on {active}: {exc}", code=EXIT_FINDINGS) from None
    line: dict[str, Any] = {}
    for text in reversed(result.stdout.strip().splitlines()):
        try:
            line = json.loads(text)
            break
        except ValueError:
            continue
    if not result.ok or line.get("switched") is not True:
        said = line.get("detail") or (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise CliError(
            f"{DOCUMENT} on {active} {result.status}: G stays on {active}: "
            f"{said if isinstance(said, str) else (said[0] if said else 'no output')}",
            code=EXIT_FINDINGS,
        )
    return line


def run(ctx: Ctx) -> int:
    pair, candidates, desired = preflight(ctx)
    active = pair.active
    assert active is not None
    ready = [c for c in candidates if c.ready]
    if not ready:
        why = "; ".join(f"{c.instance_id}: {c.reason}" for c in candidates) or "none running"
        raise CliError(
            f"no ready standby to take G from {active} ({why}): nothing was sent; "
            "`tunnelnat status` says more",
            code=EXIT_FINDINGS,
        )
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "deployment": ctx.deployment,
        "from": active,
        "standbys": [
            {"instance_id": c.instance_id, "ready": c.ready, "reason": c.reason} for c in candidates
        ],
        "desired_generation": desired,
        "command_id": None,
        "switched": None,
        "active": None,
        "switchover": None,
        "switchovers": None,
    }
    if not ctx.args.wait:
        doc["command_id"] = send(ctx, active)
        if ctx.args.json:
            dump_json(doc, ctx.out)
        else:
            ctx.out.write(
                f"sent {ctx.deployment}-{DOCUMENT} to the active {active} (command "
                f"{doc['command_id']}); `tunnelnat status` shows the new active once it is done\n"
            )
        return EXIT_OK
    line = follow(ctx, active)
    # The agent records the switchover right after the handover: a few reads at most.
    deadline = ctx.runtime.monotonic() + max(ctx.args.interval * 5, 10.0)
    while True:
        recorded, last, count = last_switchover(ctx)
        if recorded not in (None, active) or ctx.runtime.monotonic() >= deadline:
            break
        ctx.runtime.sleep(ctx.args.interval)
    ec2 = ctx.aws.client("ec2")
    holder, _ = eni_holder(ec2, gateways(ec2, ctx.deployment), None)
    doc.update(
        {
            "switched": holder is not None and holder != active,
            "active": holder,
            "switchover": last,
            "switchovers": count,
        }
    )
    if ctx.args.json:
        dump_json(doc, ctx.out)
    else:
        took = f" in {line['seconds']:.1f}s" if isinstance(line.get("seconds"), int | float) else ""
        ctx.out.write(f"switched{took}: G moved from {active} to {holder} (EC2: G's ENI holder)\n")
        if recorded != holder:
            ctx.out.write(f"meta/pair still names {recorded} as the active (the agent's record)\n")
        else:
            ctx.out.write(f"meta/pair: active {recorded}, {count} switchover(s) so far\n")
    return EXIT_OK if doc["switched"] else EXIT_FINDINGS
