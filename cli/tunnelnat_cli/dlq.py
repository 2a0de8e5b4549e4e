"""``tunnelnat dlq [--redrive]``: what the controller gave up on, and sending it back.

Two kinds of messages land in the dead-letter queue: the controller's own (``{"event": <the
original body>, "instance_ids": [...], "reason": "..."}`` after its last retry) and original
events SQS moved there after ``maxReceiveCount`` deliveries. Either way the useful part is which
instances they were about: the controller is level-triggered, so ``--redrive`` sends one
reconcile request for those instances (a full one when a message named none, e.g. a scheduled
event) and deletes the messages it covered. Messages naming nothing the CLI can read stay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.config import is_instance_id
from tunnelnat_cli.aws import EXIT_FINDINGS, EXIT_OK, CliError, error_code
from tunnelnat_cli.context import Change, Ctx
from tunnelnat_cli.reconcile import account_of, queue_url, request_event
from tunnelnat_cli.render import dump_json, iso, table

SCHEMA = "tunnelnat.dlq/v1"
HIDE_SECONDS = 30  # while reading; a listing makes them visible again at once
# Long polling: a short poll (WaitTimeSeconds=0) samples a subset of SQS's servers and may return
# nothing from a small queue that holds messages (SQS developer guide, "short and long polling").
POLL_SECONDS = 1


@dataclass(frozen=True)
class Parked:
    message_id: str
    receipt_handle: str
    sent_at: float | None
    receives: int
    instance_ids: tuple[str, ...]
    full: bool  # the event asked for a full reconcile
    readable: bool
    reason: str


def read_message(message: dict) -> Parked:
    attrs = message.get("Attributes", {})
    reason = message.get("MessageAttributes", {}).get("reason", {}).get("StringValue", "")
    ids: tuple[str, ...] = ()
    full, readable = False, True
    try:
        body = json.loads(message.get("Body", ""))
    except ValueError:
        body, readable = None, False
    if isinstance(body, dict) and "event" in body and "instance_ids" in body:
        reason = str(body.get("reason") or reason)
        ids = tuple(i for i in body.get("instance_ids") or [] if is_instance_id(str(i)))
        full = not ids
    elif isinstance(body, dict):
        ids, full, readable = _event_ids(body)
    else:
        readable = False
    sent = attrs.get("SentTimestamp")
    return Parked(
        message_id=message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        sent_at=int(sent) / 1000 if sent else None,
        receives=int(attrs.get("ApproximateReceiveCount", 0)),
        instance_ids=ids,
        full=full,
        readable=readable,
        reason=" ".join(reason.split())[:300],
    )


def _event_ids(event: dict) -> tuple[tuple[str, ...], bool, bool]:
    """Instance IDs an original EventBridge event names: ``(ids, full, readable)``."""
    from tunnelnat.events import InvalidEvent, parse_request  # Powertools: only when needed

    try:
        request = parse_request(event)
    except InvalidEvent:
        return (), False, False
    return tuple(request.instance_ids), bool(request.full), True


@dataclass(frozen=True)
class Depth:
    """What SQS counts in the queue (approximate, as SQS says), read before receiving."""

    visible: int
    in_flight: int

    @property
    def total(self) -> int:
        return self.visible + self.in_flight


def depth(sqs: Any, url: str) -> Depth:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    ).get("Attributes", {})
    return Depth(
        visible=int(attrs.get("ApproximateNumberOfMessages", 0)),
        in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
    )


def receive_all(sqs: Any, url: str, limit: int) -> list[Parked]:
    """Up to ``limit`` messages (never more: a message received past it would stay hidden)."""
    parked: dict[str, Parked] = {}
    while len(parked) < limit:
        reply = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=min(10, limit - len(parked)),
            VisibilityTimeout=HIDE_SECONDS,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
            WaitTimeSeconds=POLL_SECONDS,
        )
        messages = reply.get("Messages", [])
        if not messages:
            break
        for message in messages:
            parked.setdefault(message["MessageId"], read_message(message))
    return list(parked.values())


def run(ctx: Ctx) -> int:
    args = ctx.args
    sqs = ctx.aws.client("sqs")
    name = f"{ctx.deployment}-events-dlq"
    try:
        url = args.dlq_url or sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as exc:
        if error_code(exc) not in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
            raise
        raise CliError(
            f"dead-letter queue {name!r} not found in region {ctx.aws.region}: check "
            "--deployment and --region, or pass --dlq-url (or --stack)"
        ) from None
    counted = depth(sqs, url)
    parked = receive_all(sqs, url, args.max)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "dlq_url": url,
        "messages": [
            {
                "message_id": p.message_id,
                "sent_at": iso(p.sent_at),
                "receives": p.receives,
                "instance_ids": list(p.instance_ids),
                "full_reconcile": p.full,
                "readable": p.readable,
                "reason": p.reason,
            }
            for p in parked
        ],
        "redrive": None,
    }
    # Never "empty" while SQS counts messages: others may be in flight (another reader, or a
    # listing less than HIDE_SECONDS ago that was interrupted before releasing them).
    unseen = not parked and counted.total > 0
    if not args.redrive:
        _release(sqs, url, parked)
        return _show(ctx, doc, EXIT_FINDINGS if unseen else EXIT_OK, counted)
    covered = [p for p in parked if p.readable]
    left = [p for p in parked if not p.readable]
    _release(sqs, url, left)
    if not covered:
        code = EXIT_OK if not left and not unseen else EXIT_FINDINGS
        return _show(ctx, doc, code, counted)
    ids = sorted({i for p in covered for i in p.instance_ids})
    full = any(p.full for p in covered)
    target = args.queue_url or queue_url(ctx, f"{ctx.deployment}-events")
    account = account_of(target)
    event = request_event(
        [] if full else ids, region=ctx.aws.region, account=account, now=ctx.runtime.now()
    )
    sqs.send_message(QueueUrl=target, MessageBody=json.dumps(event))
    for start in range(0, len(covered), 10):
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "ReceiptHandle": p.receipt_handle}
                for n, p in enumerate(covered[start : start + 10])
            ],
        )
    doc["redrive"] = {
        "request_id": event["id"],
        "queue_url": target,
        "instance_ids": [] if full else ids,
        "deleted": len(covered),
        "left": len(left),
    }
    ctx.after_change(Change("reconcile", tuple(ids), message=event, queue_url=target))
    return _show(ctx, doc, EXIT_OK if not left else EXIT_FINDINGS, counted)


def _release(sqs: Any, url: str, parked: list[Parked]) -> None:
    """Make messages we only looked at visible again at once."""
    for start in range(0, len(parked), 10):
        sqs.change_message_visibility_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "ReceiptHandle": p.receipt_handle, "VisibilityTimeout": 0}
                for n, p in enumerate(parked[start : start + 10])
            ],
        )


def _show(ctx: Ctx, doc: dict[str, Any], code: int, counted: Depth) -> int:
    if ctx.args.json:
        dump_json(doc, ctx.out)
        return code
    messages = doc["messages"]
    if not messages and counted.total:
        ctx.say(
            f"{doc['dlq_url']}: {counted.total} message(s) in the queue but none readable now "
            f"({counted.in_flight} in flight: another reader holds them for its visibility "
            "timeout); run this again in a minute"
        )
        return code
    if not messages:
        ctx.say(f"{doc['dlq_url']}: empty")
        return code
    ctx.say(
        table(
            ["MESSAGE", "SENT", "RECEIVES", "INSTANCES", "REASON"],
            [
                [
                    m["message_id"][:12],
                    m["sent_at"],
                    m["receives"],
                    ", ".join(m["instance_ids"])
                    or ("(full reconcile)" if m["full_reconcile"] else "(unreadable)"),
                    m["reason"],
                ]
                for m in messages
            ],
        )
    )
    if len(messages) < counted.total:
        shown = f"{len(messages)} of about {counted.total} message(s) shown"
        if len(messages) >= ctx.args.max:
            shown += f" (--max {ctx.args.max})"
        ctx.say(f"\n{shown}")
    redrive = doc["redrive"]
    if redrive is None:
        ctx.say(f"\n{len(messages)} message(s); after fixing the cause: tunnelnat dlq --redrive")
    else:
        scope = ", ".join(redrive["instance_ids"]) or "all instances"
        ctx.say(
            f"\nreconcile requested for {scope} (request {redrive['request_id']}); "
            f"deleted {redrive['deleted']} message(s), left {redrive['left']} unreadable"
        )
        ctx.say("follow it with: tunnelnat status")
    return code
