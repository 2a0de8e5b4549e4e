"""``tunnelnat enroll`` / ``unenroll``: set or remove the enrolment tag; ``--wait`` follows the
controller's record of the instance until it is done, failed, or the timeout passes."""

from __future__ import annotations

from dataclasses import dataclass

from tunnelnat.core.enrolment import GATEWAY_ROLE_TAG
from tunnelnat_cli.aws import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK, CliError
from tunnelnat_cli.context import Change, Ctx
from tunnelnat_cli.fleet import require_instance
from tunnelnat_cli.render import Progress, dump_json
from tunnelnat_cli.table import Mapping, Record

# Statuses after which waiting longer cannot help (the controller has decided).
TERMINAL_FAILURES = (
    "pool-exhausted",
    "unsupported-subnet",
    "invalid-tag",
    "no-private-ip",
    "no-public-ip",
    "not-running",
    "is-gateway",
    # Isolation (issue 14): the controller skipped it; only a human settles these.
    "conflict",
    "other-vpc",
    "route-conflict",
)

FIXES = {
    "pool-exhausted": "add Elastic IPs to the address pool and redeploy, or unenroll another "
    "instance; then `tunnelnat reconcile {id}`",
    "unsupported-subnet": "launch the instance in the gateway's subnet (or enable route-table "
    "mode), or `tunnelnat unenroll {id}`",
    "invalid-tag": "set the exact enrolment value: `tunnelnat enroll {id}` (check --tag-value)",
    "no-private-ip": "the instance needs a private IPv4 address",
    "no-public-ip": "nat_mode 'instance' uses the instance's public IP: associate an Elastic IP",
    "not-running": "start the instance: it is enrolled when it runs",
    "is-gateway": "the gateway is never enrolled; pick another instance",
    "conflict": "two instances have one private address (the reason names the other): "
    "terminate or re-address one, or untag it; then `tunnelnat reconcile {id}`",
    "other-vpc": "only the gateway's VPC is served: launch it there, or untag it (if another "
    "deployment serves that VPC, give the two deployments different enrolment tags)",
    "route-conflict": "a route for a partner network in its subnet's route table is not "
    "tunnelnat's (the reason names it): remove it if it is stale, then "
    "`tunnelnat reconcile {id}`; else keep the instance out: `tunnelnat unenroll {id}`",
}


def fix_for(status: str, instance_id: str) -> str:
    if status.startswith("failed"):
        return (
            f"see the controller's log lines for {instance_id} (CloudWatch Logs, "
            f"instance_id={instance_id}), then `tunnelnat reconcile {instance_id}`"
        )
    if status == "pending-ssm":
        return "the SSM agent is not online yet: check `tunnelnat doctor`"
    return FIXES.get(status, "run `tunnelnat doctor`").format(id=instance_id)


def is_failure(status: str) -> bool:
    return status in TERMINAL_FAILURES or status.startswith("failed")


@dataclass(frozen=True)
class Outcome:
    result: str  # enrolled | unenrolled | failed | timeout | requested
    record: Record | None
    mapping: Mapping | None
    message: str


def run_enroll(ctx: Ctx) -> int:
    return _run(ctx, enrol=True)


def run_unenroll(ctx: Ctx) -> int:
    return _run(ctx, enrol=False)


def _run(ctx: Ctx, *, enrol: bool) -> int:
    args = ctx.args
    instance_id = args.instance
    ec2 = ctx.aws.client("ec2")
    reader = ctx.reader
    label = instance_id
    try:
        inst = require_instance(ec2, instance_id, ctx.aws.region)
    except CliError:
        if enrol or (reader.mapping(instance_id) is None and reader.record(instance_id) is None):
            raise
        raise CliError(
            f"instance {instance_id} no longer exists but the table still lists it: run "
            f"`tunnelnat reconcile {instance_id}` to clean up"
        ) from None
    if inst.name:
        label = f"{instance_id} ({inst.name})"
    if enrol and inst.state in ("terminated", "shutting-down"):
        raise CliError(f"instance {label} is {inst.state}: it cannot be enrolled")
    if enrol and inst.tags.get(GATEWAY_ROLE_TAG) == "gateway":
        raise CliError(f"instance {label} is a tunnelnat gateway: the gateway is never enrolled")
    baseline = reader.record(instance_id)
    key, value = args.tag_key, args.tag_value
    if enrol:
        if inst.tags.get(key) == value:
            ctx.say(f"{label} already carries {key}={value}")
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": key, "Value": value}])
        ctx.say(f"tagged {label} {key}={value}; the controller enrols it")
        if inst.state != "running":
            ctx.say(f"note: {label} is {inst.state}; it is enrolled once it runs")
    else:
        if key not in inst.tags:
            ctx.say(f"{label} has no {key} tag")
        ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": key}])
        ctx.say(f"removed tag {key} from {label}; the controller unenrols it")
    ctx.after_change(Change("enroll" if enrol else "unenroll", (instance_id,)))
    if not args.wait:
        outcome = Outcome("requested", baseline, reader.mapping(instance_id), "tag changed")
        return _report(ctx, instance_id, outcome, enrol=enrol)
    outcome = _wait(ctx, instance_id, label, baseline, enrol=enrol)
    return _report(ctx, instance_id, outcome, enrol=enrol)


def _wait(
    ctx: Ctx, instance_id: str, label: str, baseline: Record | None, *, enrol: bool
) -> Outcome:
    runtime, reader = ctx.runtime, ctx.reader
    progress = Progress(ctx.err)
    start = runtime.monotonic()
    record = mapping = None
    while True:
        record = reader.record(instance_id)
        mapping = reader.mapping(instance_id)
        elapsed = runtime.monotonic() - start
        fresh = record is not None and (
            baseline is None or record.updated_at != baseline.updated_at
        )
        if enrol:
            if record is not None and record.status == "enrolled" and mapping is not None:
                progress.done()
                return Outcome("enrolled", record, mapping, f"enrolled as {mapping.public_ip}")
        elif mapping is None and (record is None or record.status != "enrolled"):
            progress.done()
            if baseline is None and record is None:
                return Outcome("unenrolled", record, mapping, "was not enrolled: nothing to undo")
            return Outcome("unenrolled", record, mapping, "mapping and route removed")
        if (
            fresh
            and record is not None
            and is_failure(record.status)
            and (enrol or record.status.startswith("failed"))
        ):
            progress.done()
            return Outcome("failed", record, mapping, f"{record.status}: {record.reason}")
        shown = f"{record.status}: {record.reason}" if record else "no record yet"
        progress.update(elapsed, f"{label}: {shown}")
        if elapsed >= ctx.args.timeout:
            progress.done()
            return Outcome(
                "timeout", record, mapping, f"timed out after {ctx.args.timeout:g}s; last: {shown}"
            )
        runtime.sleep(min(ctx.args.interval, max(0.0, ctx.args.timeout - elapsed)) or 0.01)


def _report(ctx: Ctx, instance_id: str, outcome: Outcome, *, enrol: bool) -> int:
    record, mapping = outcome.record, outcome.mapping
    code = {
        "enrolled": EXIT_OK,
        "unenrolled": EXIT_OK,
        "requested": EXIT_OK,
        "failed": EXIT_FINDINGS,
        "timeout": EXIT_FINDINGS,
    }.get(outcome.result, EXIT_ERROR)
    fix = None
    if outcome.result == "failed" and record is not None:
        fix = fix_for(record.status, instance_id)
    elif outcome.result == "timeout":
        fix = (
            "check `tunnelnat doctor` (controller queue, DLQ, SSM agent); if the deployment "
            "uses another enrolment tag, pass --tag-key/--tag-value"
        )
    if ctx.args.json:
        dump_json(
            {
                "schema": "tunnelnat.enroll/v1",
                "action": "enroll" if enrol else "unenroll",
                "instance_id": instance_id,
                "result": outcome.result,
                "status": record.status if record else None,
                "reason": record.reason if record else None,
                "public_ip": mapping.public_ip if mapping else None,
                "message": outcome.message,
                "fix": fix,
            },
            ctx.out,
        )
        return code
    if outcome.result == "requested":
        ctx.say("not waiting: follow it with `tunnelnat status` (or pass --wait)")
    elif code == EXIT_OK:
        ctx.say(f"{instance_id}: {outcome.message}")
    else:
        ctx.err.write(f"{instance_id}: {outcome.message}\n")
        if fix:
            ctx.err.write(f"  fix: {fix}\n")
    return code
