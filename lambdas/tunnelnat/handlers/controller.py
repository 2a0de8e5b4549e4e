"""Lambda entry point: EventBridge events, directly or through the SQS queue, to ``reconcile``.

Thin on purpose: parse, hand the instance IDs to the controller, report. Events that can never
succeed are logged and dropped; anything that may succeed later raises so it is delivered again.
"""

from __future__ import annotations

import functools
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

from tunnelnat.adapters.commands import CommandPort, SsmCommands
from tunnelnat.adapters.ec2 import Ec2Instances
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.controller import Controller, Outcome
from tunnelnat.events import InvalidEvent, instance_ids
from tunnelnat.settings import ControllerSettings

logger = Logger(service="tunnelnat")
tracer = Tracer(service="tunnelnat")
metrics = Metrics(namespace="tunnelnat", service="tunnelnat")
processor = BatchProcessor(event_type=EventType.SQS)

# Throttling is absorbed here first, then by the queue's redelivery.
AWS_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=5)

_controller: Controller | None = None


class PowertoolsTelemetry:
    def count(self, name: str, value: float = 1) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)


def build_controller(
    settings: ControllerSettings | None = None,
    *,
    commands: CommandPort | None = None,
    session: boto3.session.Session | None = None,
) -> Controller:
    """A controller wired to AWS (or to moto via AWS_ENDPOINT_URL); ``commands`` swaps the port."""
    settings = settings or ControllerSettings.from_environ()
    session = session or _session(settings.region)
    client = lambda name: session.client(name, config=AWS_CONFIG)  # noqa: E731
    return Controller(
        settings.config,
        store=EnrolmentStore(client("dynamodb"), settings.table_name),
        instances=Ec2Instances(client("ec2")),
        commands=commands or SsmCommands(client("ssm"), document_prefix=settings.document_prefix),
        deployment=settings.deployment,
        region=settings.region,
        telemetry=PowertoolsTelemetry(),
    )


@functools.cache
def _session(region: str) -> boto3.session.Session:
    # A session loads every service model it touches; one per container keeps rebuilds cheap.
    return boto3.session.Session(region_name=region)


def use_controller(controller: Controller | None) -> None:
    """Install the controller the handler uses (the lab's, or None to rebuild from env)."""
    global _controller
    _controller = controller


def _get_controller() -> Controller:
    global _controller
    if _controller is None:
        _controller = build_controller()
    return _controller


@tracer.capture_method
def handle_event(event: Any) -> list[Outcome]:
    """One EventBridge event: reconcile every instance it names."""
    event_id, ids = instance_ids(event)
    outcomes = []
    for instance_id in ids:
        logger.append_keys(instance_id=instance_id, event_id=event_id)
        outcome = _get_controller().reconcile(instance_id)
        logger.info("reconciled", extra={"outcome": outcome.as_dict()})
        outcomes.append(outcome)
    return outcomes


def _record_handler(record: SQSRecord) -> None:
    try:
        handle_event(record.body)
    except InvalidEvent as exc:
        logger.error("dropping event that can never succeed", extra={"reason": str(exc)})
        metrics.add_metric(name="RejectedEvents", unit=MetricUnit.Count, value=1)


@logger.inject_lambda_context(correlation_id_path="id", clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if isinstance(event, dict) and "Records" in event:
        return process_partial_response(
            event=event, record_handler=_record_handler, processor=processor, context=context
        )
    try:
        outcomes = handle_event(event)
    except InvalidEvent as exc:
        logger.error("dropping event that can never succeed", extra={"reason": str(exc)})
        metrics.add_metric(name="RejectedEvents", unit=MetricUnit.Count, value=1)
        return {"rejected": str(exc)}
    return {"outcomes": [o.as_dict() for o in outcomes]}
