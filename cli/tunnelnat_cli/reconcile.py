"""``tunnelnat reconcile [INSTANCE ...]``: ask the controller to reconcile, through its queue.

The request is an EventBridge-shaped event on the controller's SQS queue::

    {"source": "tunnelnat.cli", "detail-type": "tunnelnat Reconcile Request",
     "detail": {"instance-ids": [...]}}          # [] = full reconcile

With ``--wait`` the command snapshots the table before sending, waits until the request is
handled, and prints what changed. "Handled" is the controller's ``meta/reconcile`` item naming
this request's ``id`` when the controller writes one; otherwise the queue being drained (nothing
visible or in flight) with the gateway's applied generation caught up, on two polls in a row.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import ClientError

from tunnelnat_cli.aws import EXIT_FINDINGS, EXIT_OK, CliError, error_code
from tunnelnat_cli.context import Change, Ctx
from tunnelnat_cli.fleet import check_instance_id
from tunnelnat_cli.render import Progress, dump_json, table
from tunnelnat_cli.table import Snapshot

SOURCE = "tunnelnat.cli"
DETAIL_TYPE = "tunnelnat Reconcile Request"
SCHEMA = "tunnelnat.reconcile/v1"


def request_event(instance_ids: list[str], *, region: str, account: str, now: float) -> dict:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "source": SOURCE,
        "detail-type": DETAIL_TYPE,
        "account": account,
        "time": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [],
        "detail": {"instance-ids": instance_ids},
    }


def account_of(url: str) -> str:
    """The account in a queue URL (``https://sqs.<region>.amazonaws.com/<account>/<name>``)."""
    parts = urlparse(url).path.strip("/").split("/")
    return parts[0] if len(parts) == 2 and parts[0] else "000000000000"


def queue_url(ctx: Ctx, name: str) -> str:
    try:
        return ctx.aws.client("sqs").get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as exc:
        if error_code(exc) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
            raise CliError(
                f"queue {name!r} not found in region {ctx.aws.region}: check --deployment "
                "and --region, or pass --queue-url"
            ) from None
        raise


def run(ctx: Ctx) -> int:
    args = ctx.args
    ids = sorted({check_instance_id(i) for i in args.instances})
    url = args.queue_url or queue_url(ctx, f"{ctx.deployment}-events")
    before = ctx.reader.snapshot()
    account = account_of(url)
    event = request_event(ids, region=ctx.aws.region, account=account, now=ctx.runtime.now())
    sent = ctx.aws.client("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(event))
    scope = ", ".join(ids) if ids else "all instances"
    ctx.say(f"reconcile requested for {scope} (request {event['id']})")
    ctx.after_change(Change("reconcile", tuple(ids), message=event, queue_url=url))
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "request_id": event["id"],
        "message_id": sent.get("MessageId"),
        "queue_url": url,
        "instance_ids": ids,
        "waited": bool(args.wait),
        "completed": None,
        "changes": [],
        "generation": {"before": _gen(before), "after": None},
    }
    if not args.wait:
        if args.json:
            dump_json(doc, ctx.out)
        else:
            ctx.say("not waiting: pass --wait to see what changed")
        return EXIT_OK
    completed = _wait(ctx, url, event["id"])
    after = ctx.reader.snapshot()
    changes = diff(before, after, only=set(ids) or None)
    doc.update(completed=completed, changes=changes)
    doc["generation"]["after"] = _gen(after)
    if args.json:
        dump_json(doc, ctx.out)
    else:
        _print(ctx, doc)
    return EXIT_OK if completed else EXIT_FINDINGS


def _gen(snapshot: Snapshot) -> dict[str, int]:
    return {"desired": snapshot.desired_generation, "applied": snapshot.applied_generation}


def _wait(ctx: Ctx, url: str, request_id: str) -> bool:
    runtime, reader = ctx.runtime, ctx.reader
    sqs = ctx.aws.client("sqs")
    progress = Progress(ctx.err)
    start = runtime.monotonic()
    quiet_polls = 0
    while True:
        elapsed = runtime.monotonic() - start
        marker = reader.get("meta", "reconcile")
        if marker and marker.get("request_id", {}).get("S") == request_id:
            progress.done()
            return True
        attrs = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        ).get("Attributes", {})
        queued = int(attrs.get("ApproximateNumberOfMessages", 0))
        in_flight = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
        desired, applied = reader.generations()
        quiet = queued == 0 and in_flight == 0 and applied >= desired
        quiet_polls = quiet_polls + 1 if quiet else 0
        if quiet_polls >= 2:
            progress.done()
            return True
        progress.update(
            elapsed,
            f"queue: {queued} waiting, {in_flight} in flight; generation applied {applied} "
            f"/ desired {desired}",
        )
        if elapsed >= ctx.args.timeout:
            progress.done()
            ctx.err.write(
                f"timed out after {ctx.args.timeout:g}s waiting for the controller: check "
                "`tunnelnat doctor` (DLQ, alarms)\n"
            )
            return False
        runtime.sleep(ctx.args.interval)


def _view(snapshot: Snapshot, instance_id: str) -> dict[str, Any] | None:
    record = snapshot.records.get(instance_id)
    mapping = snapshot.mappings.get(instance_id)
    if record is None and mapping is None:
        return None
    return {
        "status": record.status if record else None,
        "reason": record.reason if record else None,
        "private_ip": (mapping.private_ip if mapping else None)
        or (record.private_ip if record else None),
        "public_ip": mapping.public_ip if mapping else None,
        "route_installed": bool(record and record.route_installed),
    }


def diff(before: Snapshot, after: Snapshot, *, only: set[str] | None = None) -> list[dict]:
    """Per-instance changes between two snapshots (``only``: restrict to these instances)."""
    ids = set(before.records) | set(before.mappings) | set(after.records) | set(after.mappings)
    if only is not None:
        ids &= only
    changes = []
    for instance_id in sorted(ids):
        old, new = _view(before, instance_id), _view(after, instance_id)
        if old == new:
            continue
        kind = "added" if old is None else "removed" if new is None else "changed"
        changes.append({"instance_id": instance_id, "change": kind, "before": old, "after": new})
    return changes


def _print(ctx: Ctx, doc: dict[str, Any]) -> None:
    gen = doc["generation"]
    if not doc["changes"]:
        ctx.say("no changes")
    else:
        rows = []
        for c in doc["changes"]:
            old, new = c["before"] or {}, c["after"] or {}
            rows.append(
                [
                    c["instance_id"],
                    c["change"],
                    f"{old.get('status') or '-'} -> {new.get('status') or '-'}",
                    f"{old.get('public_ip') or '-'} -> {new.get('public_ip') or '-'}",
                    new.get("reason") or old.get("reason"),
                ]
            )
        ctx.say(table(["INSTANCE", "CHANGE", "STATUS", "PUBLIC (S)", "REASON"], rows))
    ctx.say(
        f"generation desired {gen['before']['desired']} -> {gen['after']['desired']}, "
        f"applied {gen['before']['applied']} -> {gen['after']['applied']}"
    )
