"""Lambda entry point: EventBridge events, through the SQS queue (or directly), to ``converge``.

Thin on purpose: parse, hand the whole batch to the service, report per message. Events that can
never succeed are logged and dropped; anything that may succeed later is reported as a batch item
failure so SQS delivers it again, later each time; after the last attempt it goes to the
dead-letter queue with the reason.
"""

from __future__ import annotations

import functools
import os
import random
from typing import Any

import boto3
from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from tunnelnat.adapters.autoscaling import AutoScalingLifecycle, LifecyclePort
from tunnelnat.adapters.commands import CommandPort, SsmCommands
from tunnelnat.adapters.ec2 import Ec2Instances
from tunnelnat.adapters.queue import EventQueue
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.controller import Controller
from tunnelnat.events import InvalidEvent, Request, parse_request
from tunnelnat.service import Service
from tunnelnat.settings import ControllerSettings

logger = Logger(service="tunnelnat")
tracer = Tracer(service="tunnelnat")
metrics = Metrics(namespace="tunnelnat", service="tunnelnat")
# Report every failed message, even when the whole batch failed, rather than raise.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

# Throttling is absorbed here first, then by the queue's redelivery.
AWS_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=5)
MAX_ATTEMPTS = int(os.environ.get("TUNNELNAT_MAX_ATTEMPTS", "8"))

_service: Service | None = None
_queue: EventQueue | None = None


class PowertoolsTelemetry:
    def count(self, name: str, value: float = 1) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


@functools.cache
def _session(region: str) -> boto3.session.Session:
    # A session loads every service model it touches; one per container keeps rebuilds cheap.
    return boto3.session.Session(region_name=region)


def build_controller(
    settings: ControllerSettings | None = None,
    *,
    commands: CommandPort | None = None,
    session: boto3.session.Session | None = None,
) -> Controller:
    """A controller wired to AWS (or to moto via AWS_ENDPOINT_URL); ``commands`` swaps the port."""
    settings = settings or ControllerSettings.from_environ()
    session = session or _session(settings.region)
    client = functools.partial(session.client, config=AWS_CONFIG)
    return Controller(
        settings.config,
        store=EnrolmentStore(client("dynamodb"), settings.table_name),
        instances=Ec2Instances(client("ec2")),
        commands=commands or SsmCommands(client("ssm"), document_prefix=settings.document_prefix),
        deployment=settings.deployment,
        region=settings.region,
        telemetry=PowertoolsTelemetry(),
    )


def build_service(
    controller: Controller | None = None,
    *,
    lifecycle: LifecyclePort | None = None,
    settings: ControllerSettings | None = None,
) -> Service:
    settings = settings or ControllerSettings.from_environ()
    session = _session(settings.region)
    return Service(
        controller or build_controller(settings),
        lifecycle=lifecycle
        or AutoScalingLifecycle(session.client("autoscaling", config=AWS_CONFIG)),
        lifecycle_timeout=float(os.environ.get("TUNNELNAT_LIFECYCLE_TIMEOUT", "900")),
    )


def use_controller(
    controller: Controller | None, *, lifecycle: LifecyclePort | None = None
) -> None:
    """Install the controller the handler uses (the lab's, or None to rebuild from env)."""
    global _service
    _service = None if controller is None else build_service(controller, lifecycle=lifecycle)


def use_queue(queue: EventQueue | None) -> None:
    global _queue
    _queue = queue


def _get_service() -> Service:
    global _service
    if _service is None:
        _service = build_service()
    return _service


def _get_queue() -> EventQueue:
    global _queue
    if _queue is None:
        settings = ControllerSettings.from_environ()
        sqs = _session(settings.region).client("sqs", config=AWS_CONFIG)
        _queue = EventQueue(sqs, dead_letter_url=os.environ.get("TUNNELNAT_DLQ_URL"))
    return _queue


def backoff_seconds(attempt: int) -> int:
    """Redelivery delay after the ``attempt``-th failure: 15 s doubling to 15 min, with jitter."""
    base = min(900, 15 * 2 ** max(0, attempt - 1))
    return int(base * random.uniform(0.8, 1.0))  # noqa: S311 - jitter, not crypto


def _reject(reason: str) -> None:
    logger.error("dropping event that can never succeed", extra={"reason": reason})
    metrics.add_metric(name="RejectedEvents", unit=MetricUnit.Count, value=1)


@tracer.capture_method
def handle_records(records: list[SQSRecord]) -> dict[str, Exception | None]:
    """Every message of a batch through one ``process`` call; the result per message ID."""
    parsed: list[tuple[SQSRecord, Request]] = []
    results: dict[str, Exception | None] = {}
    for record in records:
        try:
            parsed.append((record, parse_request(record.body)))
        except InvalidEvent as exc:
            _reject(str(exc))
            results[record.message_id] = None
    errors, _ = _get_service().process([request for _, request in parsed]) if parsed else ([], {})
    for (record, request), error in zip(parsed, errors, strict=True):
        results[record.message_id] = error
        if error is None:
            continue
        attempt = int(record.attributes.approximate_receive_count or 1)
        reason = f"{type(error).__name__}: {error}"
        extra = {"instance_ids": list(request.instance_ids), "attempt": attempt, "reason": reason}
        if attempt >= MAX_ATTEMPTS and _get_queue().dead_letter(
            record.body, instance_ids=list(request.instance_ids), reason=reason
        ):
            logger.error("giving up: sent to the dead-letter queue", extra=extra)
            metrics.add_metric(name="DeadLettered", unit=MetricUnit.Count, value=1)
            for instance_id in request.instance_ids:
                _get_service().controller.record_failure(instance_id, reason)
            results[record.message_id] = None
            continue
        logger.warning("will retry", extra=extra)
        try:
            _get_queue().delay_retry(
                record.event_source_arn, record.receipt_handle, backoff_seconds(attempt)
            )
        except Exception:  # noqa: BLE001 - the default visibility timeout still retries it
            logger.exception("could not set the retry delay")
    return results


@logger.inject_lambda_context(correlation_id_path="id", clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if isinstance(event, dict) and "Records" in event:
        records = [SQSRecord(r) for r in event["Records"]]
        results = handle_records(records)

        def record_handler(record: SQSRecord) -> None:
            error = results.get(record.message_id)
            if error is not None:
                raise error

        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=context
        )
    try:
        request = parse_request(event)
    except InvalidEvent as exc:
        _reject(str(exc))
        return {"rejected": str(exc)}
    logger.append_keys(event_id=request.event_id, instance_ids=list(request.instance_ids))
    [error], results = _get_service().process([request])
    outcomes = []
    for instance_id, result in results.items():
        if isinstance(result, Exception):
            logger.warning(
                "not converged", extra={"instance_id": instance_id, "reason": str(result)}
            )
            continue
        logger.info("reconciled", extra={"instance_id": instance_id, "outcome": result.as_dict()})
        outcomes.append(result.as_dict())
    if error is not None:
        raise error  # EventBridge's own retry policy delivers it again
    return {"outcomes": outcomes}
