"""``tunnelnat psk set``: put the pre-shared key agreed with the partner into the deployment's
secret; ``--wait`` follows it to the tunnel.

The key is read from stdin or ``--file`` (never from the command line, where ``ps`` and the shell's
history would keep it), prompted for twice without echo when stdin is a terminal, and never
printed. Nothing here sends it to the gateway: the stack's PskRollout rule reacts to the secret's
new ``AWSCURRENT`` version by running ``ConfigureTunnel`` there (stacks/psk_rollout.py), which
restarts the tunnel's IKE SA with the new key. So ``--wait`` watches what the deployment does by
itself: a ``ConfigureTunnel`` command on the gateway requested after the change, its outcome,
then the gateway's ``TunnelUp`` metric.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.lanes import PARTNER_NAME
from tunnelnat_cli.aws import EXIT_FINDINGS, EXIT_OK, CliError, error_code
from tunnelnat_cli.context import Change, Ctx
from tunnelnat_cli.fleet import Instance, gateways
from tunnelnat_cli.render import Progress, dump_json, iso
from tunnelnat_cli.tunnels import METRIC, NAMESPACE_PREFIX, TunnelState, tunnel_states

SCHEMA_ID = "tunnelnat.psk/v1"
MIN_LENGTH = 20  # ConfigureTunnel refuses a shorter key
MAX_BYTES = 65536  # Secrets Manager's limit on a SecretString
SECRET_NAME = re.compile(r"^[A-Za-z0-9/_+=.@-]{1,512}$")  # ConfigureTunnel's allowedPattern
SECRET_ARN = re.compile(
    r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]+$"
)
DOCUMENT = "ConfigureTunnel"
# Before the tunnel had a document of its own, ConfigureGateway's association read the secret.
EARLIER_DOCUMENTS = ("ConfigureGateway",)
RUNNING = ("Pending", "InProgress", "Delayed")
# TunnelUp counts from the first whole minute after ConfigureTunnel was requested: CloudWatch's
# 1-minute buckets start on the minute, so a bucket from there holds no datapoint older than the
# run, and its Minimum >= 1 says the tunnel was up all the time it reported.
MINUTE = 60

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "schema",
        "secret",
        "version_id",
        "changed_at",
        "result",
        "gateway_id",
        "command_id",
        "command_status",
        "tunnels",
        "message",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "secret": {"type": "string"},
        "version_id": {"type": "string"},
        "changed_at": {"type": "string"},
        "result": {"enum": ["stored", "ready", "failed", "timeout"]},
        "gateway_id": {"type": ["string", "null"]},
        "command_id": {"type": ["string", "null"]},
        "command_status": {"type": ["string", "null"]},
        "tunnels": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["tunnel", "state"],
                "properties": {
                    "tunnel": {"type": "string"},
                    "state": {"enum": ["up", "down", "unknown"]},
                },
            },
        },
        "message": {"type": "string"},
    },
}


# -- the key ------------------------------------------------------------------------------------
def check_psk(raw: str) -> str:
    """The key as it will be stored, or CliError saying what is wrong (never showing the key).

    One final line break (a file's, or echo's) is not part of the key. The gateway strips spaces
    at either end before use, so a key with them would differ from the partner's: refused.
    """
    psk = raw[:-2] if raw.endswith("\r\n") else raw[:-1] if raw.endswith("\n") else raw
    if not psk:
        raise CliError("no pre-shared key given: pipe it on stdin or pass --file PATH")
    if "\n" in psk or "\r" in psk:
        raise CliError("the pre-shared key has a line break inside: give it on one line")
    if psk != psk.strip():
        raise CliError(
            "the pre-shared key starts or ends with a space: the gateway strips them, so it "
            "would not match the partner's; remove them"
        )
    if any(unicodedata.category(c) == "Cc" for c in psk):
        raise CliError("the pre-shared key contains control characters: use printable text")
    if len(psk) < MIN_LENGTH:
        raise CliError(
            f"the pre-shared key is {len(psk)} characters long; at least {MIN_LENGTH} are needed"
        )
    if len(psk.encode()) > MAX_BYTES:
        raise CliError(f"the pre-shared key is over Secrets Manager's {MAX_BYTES}-byte limit")
    return psk


def read_psk(ctx: Ctx) -> str:
    path = ctx.args.file
    if path is not None and path != "-":
        try:
            with open(path, encoding="utf-8") as stream:
                return check_psk(stream.read(MAX_BYTES * 4 + 3))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            raise CliError(f"cannot read --file {path!r}: {reason}") from None
    stdin = ctx.runtime.stdin
    if path is None and getattr(stdin, "isatty", lambda: False)():
        first = ctx.runtime.getpass("New pre-shared key (not shown): ")
        second = ctx.runtime.getpass("Again: ")
        if first != second:
            raise CliError("the two entries differ: nothing was changed")
        return check_psk(first)
    try:
        return check_psk(stdin.read(MAX_BYTES * 4 + 3))
    except UnicodeDecodeError:
        raise CliError("cannot read the pre-shared key from stdin: not UTF-8") from None


# -- which secret -------------------------------------------------------------------------------
def check_secret_id(value: str) -> str:
    if not (SECRET_NAME.fullmatch(value) or SECRET_ARN.fullmatch(value)):
        raise CliError(
            f"--secret {value[:80]!r}: not a secret name (letters, digits, /_+=.@-) or ARN"
        )
    return value


def association_names(deployment: str, partner: str | None = None) -> list[str]:
    """The associations whose PskSecretName the gateway uses: one partner's
    ``<deployment>-ConfigureTunnel-<partner>`` (several partners, issue 23), else the
    deployment's (a stack deployed before ConfigureTunnel existed: ConfigureGateway's)."""
    if partner is not None:
        return [f"{deployment}-{DOCUMENT}-{partner}"]
    return [f"{deployment}-{document}" for document in (DOCUMENT, *EARLIER_DOCUMENTS)]


def association_secret(ssm: Any, deployment: str, partner: str | None = None) -> str | None:
    """The secret ConfigureTunnel's association reads: what the gateway really uses."""
    try:
        for name in association_names(deployment, partner):
            reply = ssm.list_associations(
                AssociationFilterList=[{"key": "AssociationName", "value": name}]
            )
            for association in reply.get("Associations", []):
                described = ssm.describe_association(AssociationId=association["AssociationId"])
                values = described["AssociationDescription"].get("Parameters", {})
                secret = (values.get("PskSecretName") or [None])[0]
                if secret:
                    return str(secret)
    except ClientError as exc:
        if not error_code(exc).startswith("AccessDenied"):
            raise
    return None


def partner_arg(ctx: Ctx) -> str | None:
    """--partner, checked: it names an association and a metric dimension."""
    partner = getattr(ctx.args, "partner", None)
    if partner is not None and not PARTNER_NAME.fullmatch(partner):
        raise CliError(f"--partner {partner[:40]!r}: not a partner name (see the partners file)")
    return partner


def secret_id(ctx: Ctx) -> str:
    """--secret, else the stack's PskSecretName output (--stack), else the association's."""
    if ctx.args.secret:
        return check_secret_id(ctx.args.secret)
    partner = partner_arg(ctx)
    found = association_secret(ctx.aws.client("ssm"), ctx.deployment, partner)
    if found is None:
        name = association_names(ctx.deployment, partner)[0]
        hint = (
            "pass --secret NAME (the partner's psk_secret in the partners file)"
            if partner is not None
            else "pass --stack STACK (its PskSecretName output) or --secret NAME; with a "
            "partners file, --partner NAME"
        )
        raise CliError(
            f"cannot tell which secret holds the PSK (no {name} association found): {hint}"
        )
    return check_secret_id(found)


def changed_at(secrets: Any, secret: str, version_id: str, fallback: float) -> float:
    """When Secrets Manager created the version (its clock, which SSM's history shares)."""
    request: dict[str, Any] = {"SecretId": secret, "IncludeDeprecated": True}
    try:
        while True:  # botocore has no paginator for it
            page = secrets.list_secret_version_ids(**request)
            for version in page.get("Versions", []):
                created = version.get("CreatedDate")
                if version.get("VersionId") == version_id and created is not None:
                    return _epoch(created)
            if not page.get("NextToken"):
                break
            request["NextToken"] = page["NextToken"]
    except ClientError as exc:
        if not error_code(exc).startswith("AccessDenied"):
            raise
    return fallback


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    text = str(value).replace("Z", "+00:00")
    parsed = datetime.fromisoformat(text)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


# -- following the rollout ----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    command_id: str
    requested_at: float
    status: str
    detail: str = ""


def configure_run(
    ssm: Any, gateway_id: str, document: str, since: float, tunnel: str | None = None
) -> Run | None:
    """The newest ``document`` command requested on the gateway at or after ``since``, with its
    status on that instance; ``tunnel``: only runs for that tunnel (several partners: each
    partner's ConfigureTunnel runs carry its TunnelName)."""
    newest: dict | None = None
    pages = ssm.get_paginator("list_commands").paginate(
        InstanceId=gateway_id,
        Filters=[
            {"key": "DocumentName", "value": document},
            {"key": "InvokedAfter", "value": iso(since) or ""},
        ],
    )
    for page in pages:
        for command in page.get("Commands", []):
            if command.get("DocumentName") != document:
                continue
            if tunnel is not None and (command.get("Parameters") or {}).get("TunnelName") != [
                tunnel
            ]:
                continue
            requested = _epoch(command["RequestedDateTime"])
            if requested < since:
                continue
            if newest is None or requested > _epoch(newest["RequestedDateTime"]):
                newest = command
    if newest is None:
        return None
    requested = _epoch(newest["RequestedDateTime"])
    try:
        invocation = ssm.get_command_invocation(
            CommandId=newest["CommandId"], InstanceId=gateway_id
        )
    except ClientError as exc:
        if error_code(exc) != "InvocationDoesNotExist":
            raise
        return Run(newest["CommandId"], requested, "Pending")  # not delivered yet
    lines = [
        line.strip()
        for line in (invocation.get("StandardErrorContent") or "").splitlines()
        if line.strip()
    ]
    detail = lines[-1] if lines else str(invocation.get("StatusDetails") or "")
    return Run(newest["CommandId"], requested, str(invocation.get("Status")), detail[:300])


def tunnel_up_since(
    cloudwatch: Any, states: list[TunnelState], *, deployment: str, since: float, now: float
) -> list[str]:
    """The tunnels (of ``states``) whose TunnelUp, from the first whole minute after ``since``
    to ``now``, has datapoints and a newest 1-minute Minimum >= 1."""
    start = since + (-since % MINUTE)
    if not states or now < start + 1:  # CloudWatch refuses EndTime == StartTime (whole seconds)
        return []
    queries = []
    for i, state in enumerate(states):
        second = ("Gateway", state.gateway) if state.gateway else ("Deployment", deployment)
        queries.append(
            {
                "Id": f"t{i}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": NAMESPACE_PREFIX + deployment,
                        "MetricName": METRIC,
                        "Dimensions": [
                            {"Name": "Tunnel", "Value": state.tunnel},
                            {"Name": second[0], "Value": second[1]},
                        ],
                    },
                    "Period": MINUTE,
                    "Stat": "Minimum",
                },
                "ReturnData": True,
            }
        )
    newest: dict[str, tuple[float, float]] = {}
    pages = cloudwatch.get_paginator("get_metric_data").paginate(
        MetricDataQueries=queries,
        StartTime=datetime.fromtimestamp(start, UTC),
        EndTime=datetime.fromtimestamp(now, UTC),
    )
    for page in pages:
        for result in page.get("MetricDataResults", []):
            for stamp, value in zip(
                result.get("Timestamps", []), result.get("Values", []), strict=False
            ):
                seen = newest.get(result["Id"])
                if seen is None or stamp.timestamp() > seen[0]:
                    newest[result["Id"]] = (stamp.timestamp(), value)
    return [
        state.tunnel
        for i, state in enumerate(states)
        if f"t{i}" in newest and newest[f"t{i}"][1] >= 1
    ]


@dataclass
class Rollout:
    secret: str
    version_id: str
    changed_at: float
    result: str = "stored"
    gateway_id: str | None = None
    run: Run | None = None
    tunnels: list[TunnelState] = field(default_factory=list)
    message: str = ""
    fix: str | None = None


def _launched_at(gateway: Instance) -> float | None:
    launched = gateway.raw.get("LaunchTime")
    return _epoch(launched) if launched is not None else None


def follow(ctx: Ctx, rollout: Rollout) -> Rollout:
    """Poll until the gateway ran ConfigureTunnel after the change and reports its tunnels up,
    the run failed, or the timeout passed."""
    runtime, args = ctx.runtime, ctx.args
    ec2, ssm = ctx.aws.client("ec2"), ctx.aws.client("ssm")
    cloudwatch = ctx.aws.client("cloudwatch")
    document = f"{ctx.deployment}-{DOCUMENT}"
    partner = partner_arg(ctx)
    progress = Progress(ctx.err)
    start = runtime.monotonic()
    while True:
        elapsed = runtime.monotonic() - start
        found = gateways(ec2, ctx.deployment)
        gateway = found[-1] if found else None
        rollout.gateway_id = gateway.instance_id if gateway else None
        configured_since: float | None = None
        if gateway is None:
            shown = f"no running {ctx.deployment} gateway"
        else:
            launched = _launched_at(gateway)
            rollout.run = configure_run(
                ssm, gateway.instance_id, document, rollout.changed_at, partner
            )
            run = rollout.run
            if run is not None and run.status == "Success":
                configured_since = run.requested_at
            elif launched is not None and launched > rollout.changed_at and run is None:
                # A gateway launched after the change got the new key from the association.
                configured_since = launched
            if run is not None and run.status not in RUNNING and run.status != "Success":
                progress.done()
                rollout.result = "failed"
                rollout.message = (
                    f"{DOCUMENT} {run.status} on {gateway.instance_id} (command "
                    f"{run.command_id}): {run.detail or 'no output'}"
                )
                rollout.fix = (
                    f"aws ssm get-command-invocation --command-id {run.command_id} "
                    f"--instance-id {gateway.instance_id}; then `tunnelnat doctor`"
                )
                return rollout
            if configured_since is None:
                shown = (
                    f"{gateway.instance_id}: waiting for EventBridge to start {DOCUMENT}"
                    if run is None
                    else f"{gateway.instance_id}: {DOCUMENT} {run.status}"
                )
            else:
                rollout.tunnels = [
                    t
                    for t in tunnel_states(
                        cloudwatch,
                        gateway_ids={gateway.instance_id},
                        deployment=ctx.deployment,
                        now=runtime.now(),
                    )
                    # Several partners: the key is this partner's; the others' tunnels are not
                    # waited for (nor blamed).
                    if partner is None or t.tunnel == partner
                ]
                fresh = tunnel_up_since(
                    cloudwatch,
                    rollout.tunnels,
                    deployment=ctx.deployment,
                    since=configured_since,
                    now=runtime.now(),
                )
                if rollout.tunnels and len(fresh) == len(rollout.tunnels):
                    progress.done()
                    rollout.result = "ready"
                    names = ", ".join(t.tunnel for t in rollout.tunnels)
                    rollout.message = (
                        f"{gateway.instance_id} ran {DOCUMENT} with the new key and reports "
                        f"{names} up"
                    )
                    return rollout
                states = ", ".join(f"{t.tunnel} {t.state}" for t in rollout.tunnels) or "none yet"
                shown = (
                    f"{gateway.instance_id}: {DOCUMENT} done; waiting for TunnelUp=1 reported "
                    f"after it (now: {states})"
                )
        progress.update(elapsed, shown)
        if elapsed >= args.timeout:
            progress.done()
            rollout.result = "timeout"
            rollout.message = f"timed out after {args.timeout:g}s; last: {shown}"
            rollout.fix = _timeout_fix(ctx, rollout, configured=configured_since is not None)
            return rollout
        runtime.sleep(min(args.interval, max(0.0, args.timeout - elapsed)) or 0.01)


def _timeout_fix(ctx: Ctx, rollout: Rollout, *, configured: bool) -> str:
    if rollout.gateway_id is None:
        return "the gateway group has no running instance: check `tunnelnat doctor`"
    if not configured:
        return (
            f"check the EventBridge rule of the stack's PskRollout (its target runs {DOCUMENT}) "
            f"and SSM's Run Command history for {rollout.gateway_id}; the association's "
            "schedule applies the key too, later"
        )
    return (
        "the tunnel is not up with the new key: check that the partner uses the same key, "
        "then `tunnelnat doctor`"
    )


# -- the command --------------------------------------------------------------------------------
def run_set(ctx: Ctx) -> int:
    psk = read_psk(ctx)  # first: a bad key changes nothing
    secret = secret_id(ctx)
    secrets = ctx.aws.client("secretsmanager")
    try:
        reply = secrets.put_secret_value(SecretId=secret, SecretString=psk)
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            raise CliError(
                f"secret {secret!r} not found in region {ctx.aws.region}: check --secret, "
                "--stack and --region"
            ) from None
        raise
    version_id = str(reply.get("VersionId", ""))
    name = str(reply.get("Name") or secret)
    when = changed_at(secrets, secret, version_id, ctx.runtime.now())
    ctx.say(
        f"stored a new version of {name} ({version_id[:8]}); the gateway applies it when "
        f"EventBridge runs {DOCUMENT} there"
    )
    ctx.after_change(
        Change("psk", (), message={"secret": name, "version_id": version_id, "changed_at": when})
    )
    rollout = Rollout(secret=name, version_id=version_id, changed_at=when)
    if ctx.args.wait:
        rollout = follow(ctx, rollout)
    else:
        rollout.message = "not waiting: `tunnelnat status` shows the tunnel (or pass --wait)"
    return _report(ctx, rollout)


def _report(ctx: Ctx, rollout: Rollout) -> int:
    code = {"stored": EXIT_OK, "ready": EXIT_OK}.get(rollout.result, EXIT_FINDINGS)
    if ctx.args.json:
        dump_json(
            {
                "schema": SCHEMA_ID,
                "secret": rollout.secret,
                "version_id": rollout.version_id,
                "changed_at": iso(rollout.changed_at),
                "result": rollout.result,
                "gateway_id": rollout.gateway_id,
                "command_id": rollout.run.command_id if rollout.run else None,
                "command_status": rollout.run.status if rollout.run else None,
                "tunnels": [{"tunnel": t.tunnel, "state": t.state} for t in rollout.tunnels],
                "message": rollout.message,
            },
            ctx.out,
        )
        return code
    if code == EXIT_OK:
        ctx.say(rollout.message)
    else:
        ctx.err.write(f"{rollout.message}\n")
        if rollout.fix:
            ctx.err.write(f"  fix: {rollout.fix}\n")
    return code
