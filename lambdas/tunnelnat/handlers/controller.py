"""Lambda entry point: EventBridge events, through the SQS queue (or directly), to ``converge``.

Thin on purpose: parse, hand the whole batch to the service, report per message. Events that can
never succeed are logged and dropped; anything that may succeed later is reported as a batch item
failure so SQS delivers it again, later each time; after the last attempt it goes to the
dead-letter queue with the reason.
"""

from __future__ import annotations

import functools
import os
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from botocore.config import Config

from tunnelnat.adapters.commands import CommandPort, SsmCommands
from tunnelnat.adapters.ec2 import Ec2Instances
from tunnelnat.adapters.queue import EventQueue
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.controller import Controller, Outcome
from tunnelnat.core.enrolment import Status, status_tag
from tunnelnat.core.lanes import Lane
from tunnelnat.delivery import (  # noqa: F401 - backoff_seconds: part of the handler's surface
    MAX_ATTEMPTS,
    DeliveryPolicy,
    Failure,
    backoff_seconds,
    sync_pending_delay,
)
from tunnelnat.events import InvalidEvent, Request, parse_request
from tunnelnat.handlers.tracing import OptionalTracer
from tunnelnat.partner_lanes import (
    PARTNERS_PATH_ENV,
    PartnerLanes,
    lane_settings,
    read_lanes,
)
from tunnelnat.service import Service
from tunnelnat.settings import ControllerSettings
from tunnelnat.telemetry import DEPLOYMENT_DIMENSION

if TYPE_CHECKING:  # only for annotations: the hot path never needs these at import
    from aws_lambda_powertools.utilities.typing import LambdaContext

    from tunnelnat.adapters.autoscaling import LifecyclePort

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "tunnelnat"
logger = Logger(service=SERVICE)
metrics = Metrics(
    namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "tunnelnat", service=SERVICE
)
# Report every failed message, even when the whole batch failed, rather than raise.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)

# Throttling is absorbed here first, then by the queue's redelivery.
AWS_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=5)


_service: Service | None = None
_queue: EventQueue | None = None
# Several partners: when this invocation's scheduled repair stops starting partners' repairs
# (time.monotonic(); None: no limit known). A lane's repair may wait for two commands
# (adapters/commands.py waits up to 120 s each), so the last one starts with that much left.
LANE_RESERVE_SECONDS = 240.0
_lanes_deadline: float | None = None


tracer = OptionalTracer(SERVICE)


class PowertoolsTelemetry:
    """The controller's metrics as Powertools EMF: counts and measures on the invocation's
    metric set, failures as single metrics so each carries its own ``Reason`` dimension."""

    def count(self, name: str, value: float = 1) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)

    def measure(self, name: str, value: float, unit: str) -> None:
        metrics.add_metric(name=name, unit=MetricUnit(unit), value=value)

    def failure(self, reason: str) -> None:
        if is_metrics_disabled():  # as Metrics honours it; single_metric prints regardless
            return
        with single_metric(
            name="Failures",
            unit=MetricUnit.Count,
            value=1,
            namespace=metrics.namespace,
            # The dashboard searches {namespace, Reason, service}: service always, env or not.
            default_dimensions={**metrics.default_dimensions, "service": SERVICE},
        ) as metric:
            metric.add_dimension(name="Reason", value=reason)


class PartnerTelemetry(PowertoolsTelemetry):
    """One partner's controller (several partners): its metrics as today's, so the dashboard
    and alarms sum every partner up; the free addresses of its pool also per partner
    (dimension ``Partner``): the deployment's line is the scarcest pool, this one says whose."""

    def __init__(self, partner: str) -> None:
        self.partner = partner

    def measure(self, name: str, value: float, unit: str) -> None:
        super().measure(name, value, unit)
        if name != "PoolFreeAddresses" or is_metrics_disabled():
            return
        with single_metric(
            name=name,
            unit=MetricUnit(unit),
            value=value,
            namespace=metrics.namespace,
            default_dimensions={**metrics.default_dimensions, "service": SERVICE},
        ) as metric:
            metric.add_dimension(name="Partner", value=self.partner)


class _Session:
    """What the controller needs of a boto3 Session (``client(name, config=...)``), on botocore
    alone: the Lambda never touches boto3's resources or S3 transfers, and importing boto3
    (with s3transfer) costs ~100 ms of cold start. Callers may still pass a boto3 Session."""

    def __init__(self, region: str) -> None:
        import botocore.session

        self._session = botocore.session.get_session()
        self._region = region

    def client(self, service: str, *, config: Config | None = None) -> Any:
        return self._session.create_client(service, region_name=self._region, config=config)


class _SharedClients:
    """A session whose ``client(name)`` is created once per service and then shared by every
    lane (they run one after the other; a client is safe to share even across threads: boto3
    guide, Low-level clients, "Multithreading or multiprocessing with clients"). Every caller
    here passes AWS_CONFIG."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._clients: dict[str, Any] = {}

    def client(self, service: str, *, config: Config | None = None) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(service, config=config)
        return self._clients[service]


@functools.cache
def _session(region: str) -> _Session:
    # A session loads every service model it touches; one per container keeps rebuilds cheap.
    return _Session(region)


def build_controller(
    settings: ControllerSettings | None = None,
    *,
    commands: CommandPort | None = None,
    session: Any = None,
    lane: Lane | None = None,
) -> Controller:
    """A controller wired to AWS (or to moto via AWS_ENDPOINT_URL); ``commands`` swaps the port.
    ``lane``: one partner's controller of a several-partner deployment (``settings`` already
    that lane's, partner_lanes.lane_settings): its status tag and its routes' scope."""
    settings = settings or ControllerSettings.from_environ()
    session = session or _session(settings.region)
    client = functools.partial(session.client, config=AWS_CONFIG)
    dynamodb, ec2 = client("dynamodb"), client("ec2")
    return Controller(
        settings.config,
        store=EnrolmentStore(dynamodb, settings.table_name),
        instances=Ec2Instances(
            ec2,
            status_tag=lane.status_tag if lane else status_tag(settings.deployment),
            gateway_ip=settings.config.gateway_private_ip,
            vpc_id=settings.vpc_id,
            gateway_group=settings.gateway_group,
        ),
        commands=commands or SsmCommands(client("ssm"), document_prefix=settings.document_prefix),
        deployment=settings.deployment,
        region=settings.region,
        telemetry=PartnerTelemetry(lane.name) if lane else PowertoolsTelemetry(),
        vpc_id=settings.vpc_id,
        routes=_route_tables(settings, ec2, dynamodb),
        allowed=settings.allow_list,
        gateway_group=settings.gateway_group,
        route_scope=lane.scope if lane else None,
        partner=lane.name if lane else None,
    )


def build_lanes(
    settings: ControllerSettings | None = None,
    *,
    path: str | None = None,
    commands: CommandPort | None = None,
    session: Any = None,
) -> PartnerLanes:
    """A several-partner deployment's controller: one per lane published under ``path``
    (TUNNELNAT_PARTNERS_PATH), read now and again every few minutes (partner_lanes.py)."""
    settings = settings or ControllerSettings.from_environ()
    path = path or os.environ[PARTNERS_PATH_ENV]
    # One client per service for every lane: creating them is most of a cold start's setup,
    # and with 50 partners it would be done 100 times.
    session = _SharedClients(session or _session(settings.region))
    ssm = session.client("ssm", config=AWS_CONFIG)
    if commands is None:
        commands = SsmCommands(ssm, document_prefix=settings.document_prefix)

    def lane_controller(lane: Lane) -> Controller:
        return build_controller(
            lane_settings(settings, lane), commands=commands, session=session, lane=lane
        )

    def load() -> tuple[Lane, ...]:
        return read_lanes(ssm, path, settings.deployment)

    return PartnerLanes(
        load(),
        lane_controller,
        store=EnrolmentStore(session.client("dynamodb", config=AWS_CONFIG), settings.table_name),
        deployment=settings.deployment,
        loader=load,
        base_tag_key=settings.config.enrolment_tag_key,
        deadline=lambda: _lanes_deadline,
    )


def _default_controller(settings: ControllerSettings) -> Controller | PartnerLanes:
    """With TUNNELNAT_PARTNERS_PATH (a partners file): one controller per partner; without it,
    exactly today's single controller."""
    if os.environ.get(PARTNERS_PATH_ENV):
        return build_lanes(settings)
    return build_controller(settings)


def _route_tables(settings: ControllerSettings, ec2: Any, dynamodb: Any) -> Any:
    """Route-table mode's side, when the stack gave the VPC and the gateway's ENI."""
    if not settings.route_table_mode:
        return None
    from tunnelnat.adapters.route_records import RouteTableRecords
    from tunnelnat.adapters.routes import Ec2Routes
    from tunnelnat.route_sync import RouteTableSync

    assert settings.vpc_id is not None and settings.gateway_eni_id is not None
    return RouteTableSync(
        routes=Ec2Routes(ec2),
        records=RouteTableRecords(dynamodb, settings.table_name),
        vpc_id=settings.vpc_id,
        eni=settings.gateway_eni_id,
        destinations=[str(n) for n in settings.config.partner_networks],
        telemetry=PowertoolsTelemetry(),
        deployment=settings.deployment,
        listed=settings.route_tables,
    )


def build_service(
    controller: Controller | PartnerLanes | None = None,
    *,
    lifecycle: LifecyclePort | None = None,
    settings: ControllerSettings | None = None,
) -> Service:
    from tunnelnat.adapters.autoscaling import AutoScalingLifecycle  # lifecycle events only

    settings = settings or ControllerSettings.from_environ()
    session = _session(settings.region)
    return Service(
        controller or _default_controller(settings),
        lifecycle=lifecycle
        or AutoScalingLifecycle(session.client("autoscaling", config=AWS_CONFIG)),
    )


def use_controller(
    controller: Controller | PartnerLanes | None, *, lifecycle: LifecyclePort | None = None
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


def _deployment() -> str:
    """This controller's deployment: whose lifecycle hooks are ours, the metrics' dimension."""
    if _service is not None:
        return _service.controller.deployment
    try:
        return _get_service().controller.deployment
    except Exception:  # noqa: BLE001 - reported where the service is used; the name is known
        return os.environ.get("TUNNELNAT_DEPLOYMENT") or "tunnelnat"


def _dimension() -> None:
    """Every metric of this invocation carries its deployment (``Deployment``): kept across
    invocations as a default dimension, set again each time (the lab swaps controllers)."""
    metrics.set_default_dimensions(**{DEPLOYMENT_DIMENSION: _deployment()})


def _set_deadline(context: Any) -> None:
    """This invocation's deadline for starting partners' repairs, from the time Lambda gives
    it (``get_remaining_time_in_millis``; a context without it: no limit)."""
    global _lanes_deadline
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    try:
        seconds = remaining() / 1000 if callable(remaining) else None
    except Exception:  # noqa: BLE001 - a context that cannot tell: no limit
        seconds = None
    _lanes_deadline = None if seconds is None else time.monotonic() + seconds - LANE_RESERVE_SECONDS


def _get_queue() -> EventQueue:
    global _queue
    if _queue is None:
        settings = ControllerSettings.from_environ()
        sqs = _session(settings.region).client("sqs", config=AWS_CONFIG)
        _queue = EventQueue(sqs, dead_letter_url=os.environ.get("TUNNELNAT_DLQ_URL"))
    return _queue


def _reject(reason: str) -> None:
    logger.error("dropping event that can never succeed", extra={"reason": reason})
    metrics.add_metric(name="RejectedEvents", unit=MetricUnit.Count, value=1)


@tracer.capture_method
def handle_records(records: list[SQSRecord]) -> dict[str, Exception | None]:
    """Every message of a batch through one ``process`` call; the result per message ID."""
    parsed: list[tuple[SQSRecord, Request]] = []
    results: dict[str, Exception | None] = {}
    for record in records:
        request = _parse_or_reject(record)
        if request is None:
            results[record.message_id] = None  # dropped with its reason: never retried
        else:
            parsed.append((record, request))
    requests = [request for _, request in parsed]
    # Lines logged while the batch converges name every instance and event of it.
    _context(
        instance_ids=[i for r in requests for i in r.instance_ids],
        event_ids=[r.event_id for r in requests],
    )
    try:
        errors, outcomes = _get_service().process(requests) if parsed else ([], {})
    except Exception as exc:  # noqa: BLE001 - e.g. DynamoDB unreachable: every message retries
        logger.exception("the batch could not be processed")
        errors, outcomes = [exc] * len(parsed), {}
    _enrolment_latency(requests, outcomes)
    failures: list[Failure] = []
    for (record, request), error in zip(parsed, errors, strict=True):
        _context(instance_ids=request.instance_ids, event_ids=(request.event_id,))
        results[record.message_id] = error
        if error is None:
            for instance_id in request.instance_ids:
                _log_outcome(instance_id, outcomes.get(instance_id))
        else:
            failures.append(Failure(record, request, error))
    if failures:
        results.update(_delivery().settle(failures))
    return results


def _parse_or_reject(record: SQSRecord) -> Request | None:
    """The message's request, or None when it can never be acted on (logged and counted with
    the reason). Whatever the body holds (not JSON, nested a million deep, a wrong shape), one
    message never fails the others of its batch."""
    try:
        return parse_request(record.body, deployment=_deployment())
    except InvalidEvent as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError-free surprises
        reason = f"unreadable event body ({type(exc).__name__}): {str(exc)[:200]}"
    _context(instance_ids=(), event_ids=(record.message_id,))
    _reject(reason)
    return None


def _dead_lettered(request: Request, reason: str) -> None:
    metrics.add_metric(name="DeadLettered", unit=MetricUnit.Count, value=1)
    service = _get_service()
    for instance_id in request.instance_ids:
        PowertoolsTelemetry().failure("dead-lettered")
        service.controller.record_failure(instance_id, reason)
    try:
        service.give_up(request)  # a held launch is abandoned now, not at the hook's timeout
    except Exception:  # noqa: BLE001 - the hook's own timeout still ends it
        logger.exception("could not end the lifecycle action")


def _delivery() -> DeliveryPolicy:
    return DeliveryPolicy(_get_queue, on_dead_letter=_dead_lettered, max_attempts=MAX_ATTEMPTS)


def _context(*, instance_ids: Any, event_ids: Any) -> None:
    """The instance ID(s) and the correlation ID (the event's id) on every following line: one
    value when there is one, the batch's list joined when the line is about the batch."""
    ids = list(dict.fromkeys(instance_ids))
    events = list(dict.fromkeys(event_ids))
    logger.append_keys(instance_id=ids[0] if len(ids) == 1 else ",".join(ids) or None)
    logger.set_correlation_id(events[0] if len(events) == 1 else ",".join(events) or None)


def _log_outcome(instance_id: str, result: Any) -> None:
    if isinstance(result, Outcome):
        logger.info("reconciled", extra={"outcome": result.as_dict()})
    elif isinstance(result, Exception):
        logger.warning("not converged", extra={"reason": f"{type(result).__name__}: {result}"})


def _enrolment_latency(requests: list[Request], outcomes: dict[str, Any]) -> None:
    """Seconds from the earliest event about an instance (the original event, also when it was
    redelivered) to its convergence, for each instance this batch enrolled."""
    first: dict[str, datetime] = {}
    for request in requests:
        for instance_id in request.instance_ids:
            if instance_id not in first or request.time < first[instance_id]:
                first[instance_id] = request.time
    now = time.time()
    for instance_id, when in first.items():
        result = outcomes.get(instance_id)
        if isinstance(result, Outcome) and result.status is Status.ENROLLED:
            if result.newly_enrolled:
                latency = max(0.0, now - when.timestamp())
                metrics.add_metric(name="EnrolmentLatency", unit=MetricUnit.Seconds, value=latency)


@logger.inject_lambda_context(correlation_id_path="id", clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    _set_deadline(context)
    _dimension()
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
        request = parse_request(event, deployment=_deployment())
    except Exception as exc:  # noqa: BLE001 - InvalidEvent, or anything an odd event raises
        reason = str(exc) if isinstance(exc, InvalidEvent) else f"unreadable event: {exc!r:.200}"
        _reject(reason)
        return {"rejected": reason}
    _context(instance_ids=request.instance_ids, event_ids=(request.event_id,))
    [error], results = _get_service().process([request])
    _enrolment_latency([request], results)
    outcomes = []
    for instance_id, result in results.items():
        logger.append_keys(instance_id=instance_id)
        _log_outcome(instance_id, result)
        if isinstance(result, Outcome):
            outcomes.append(result.as_dict())
    if error is not None:
        raise error  # EventBridge's own retry policy delivers it again
    return {"outcomes": outcomes}
