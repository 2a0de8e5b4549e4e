"""Lambda entry point of the healer: TunnelUp alarm state changes (and a schedule) to ``Healer``.

Events (EventBridge, directly):
  - "CloudWatch Alarm State Change" from aws.cloudwatch: ALARM -> heal the alarm's tunnel
    (re-reading the alarm's current state first); OK -> record the time to recovery.
    Idempotent on (alarm name, state, state-change timestamp) with Powertools Idempotency, so a
    duplicated or redelivered event restarts nothing twice.
  - "Scheduled Event" from aws.events / aws.scheduler: sweep every alarm of ours still in ALARM
    (an alarm that stays in ALARM emits no new event; the sweep retries after the back-off and
    pages at the cap).

Thin on purpose: parse, hand over to ``tunnelnat.healer.Healer``, report. An event that can never
succeed (unparseable, a malformed state timestamp, an alarm that is gone, is not a TunnelUp alarm
or is another deployment's: ``Healer.ours``) is logged and dropped; anything else raises so
EventBridge/Lambda retries it.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import boto3
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
)
from aws_lambda_powertools.utilities.parser import ValidationError, parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config
from pydantic import BaseModel, Field, field_validator

from tunnelnat.adapters.commands import CommandPort, SsmCommands
from tunnelnat.handlers.tracing import OptionalTracer
from tunnelnat.healer import (
    CloudWatchAlarms,
    DynamoGatewayReports,
    DynamoHealStore,
    GatewayLocator,
    GroupGateway,
    Healer,
    HealerSettings,
    InvalidAlarm,
    SnsPager,
    UnwiredGateway,
    parse_alarm_time,
)

logger = Logger(service="tunnelnat")
tracer = OptionalTracer("tunnelnat")
metrics = Metrics(namespace="tunnelnat", service="tunnelnat-healer")

AWS_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 8}, connect_timeout=5)
IDEMPOTENCY_PK = "idempotency#tunnelnat-healer"
ALARM_STATE_CHANGE = "CloudWatch Alarm State Change"

_healer: Healer | None = None
_persistence: DynamoDBPersistenceLayer | None = None


# -- event models (Powertools Parser) ------------------------------------------------------------


class AlarmState(BaseModel):
    value: Literal["OK", "ALARM", "INSUFFICIENT_DATA"]
    timestamp: str = Field(min_length=10, max_length=40)
    reason: str = ""

    @field_validator("timestamp")
    @classmethod
    def _a_timestamp(cls, value: str) -> str:
        try:
            parse_alarm_time(value)
        except (ValueError, TypeError, OverflowError):
            raise ValueError(f"malformed state timestamp {value!r}") from None
        return value


class AlarmStateChangeDetail(BaseModel):
    alarmName: str = Field(pattern=r"^[^\x00-\x1f]{1,255}$")  # noqa: N815 - the event's name
    state: AlarmState
    previousState: AlarmState | None = None  # noqa: N815 - the event's name
    configuration: dict[str, Any] | None = None


class AlarmStateChangeEvent(EventBridgeModel):
    detail_type: Literal["CloudWatch Alarm State Change"] = Field(alias="detail-type")
    source: Literal["aws.cloudwatch"]
    detail: AlarmStateChangeDetail


class ScheduledSweepEvent(EventBridgeModel):
    detail_type: Literal["Scheduled Event"] = Field(alias="detail-type")
    source: Literal["aws.events", "aws.scheduler"]


class InvalidEvent(ValueError):
    """An event the healer can never act on."""


# -- wiring ----------------------------------------------------------------------------------------


class PowertoolsTelemetry:
    def count(self, name: str, value: float = 1) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)

    def seconds(self, name: str, value: float) -> None:
        metrics.add_metric(name=name, unit=MetricUnit.Seconds, value=value)


@functools.cache
def _session(region: str) -> boto3.session.Session:
    return boto3.session.Session(region_name=region)


def build_healer(
    settings: HealerSettings | None = None,
    *,
    commands: CommandPort | None = None,
    session: boto3.session.Session | None = None,
) -> tuple[Healer, DynamoDBPersistenceLayer]:
    """A healer wired to AWS (or moto via AWS_ENDPOINT_URL) and its idempotency store;
    ``commands`` swaps the command port (the lab's)."""
    settings = settings or HealerSettings.from_environ()
    session = session or _session(settings.region)
    client = lambda name: session.client(name, config=AWS_CONFIG)  # noqa: E731
    # Every metric of the healer's says whose: two deployments in one account never page
    # each other's on-call (issue 21, 4). Default dimensions outlive each flush.
    metrics.set_default_dimensions(Deployment=settings.deployment)
    gateways: GatewayLocator = UnwiredGateway()
    if settings.gateway_eni_id and settings.gateway_group:
        gateways = GroupGateway(
            client("ec2"),
            eni_id=settings.gateway_eni_id,
            group=settings.gateway_group,
            vpc_id=settings.vpc_id,
        )
    healer = Healer(
        alarms=CloudWatchAlarms(
            client("cloudwatch"),
            namespace=settings.metric_namespace,
            established_lookback_seconds=settings.established_lookback_seconds,
        ),
        store=DynamoHealStore(client("dynamodb"), settings.table_name),
        commands=commands
        or SsmCommands(
            client("ssm"),
            document_prefix=settings.document_prefix,
            timeout_seconds=settings.command_timeout_seconds,
        ),
        gateways=gateways,
        pager=SnsPager(client("sns"), settings.page_topic_arn),
        deployment=settings.deployment,
        policy=settings.policy,
        restart_wait_seconds=settings.restart_wait_seconds,
        alarm_prefix=settings.alarm_prefix,
        telemetry=PowertoolsTelemetry(),
        reports=DynamoGatewayReports(client("dynamodb"), settings.table_name),
        readiness_max_age=settings.readiness_max_age_seconds,
    )
    # The controller's table (pk/sk) holds the idempotency records too, under their own
    # partition; a separate table works the same (TUNNELNAT_IDEMPOTENCY_TABLE).
    persistence = DynamoDBPersistenceLayer(
        table_name=settings.idempotency_table,
        key_attr="pk",
        sort_key_attr="sk",
        static_pk_value=IDEMPOTENCY_PK,
        boto3_client=client("dynamodb"),
    )
    return healer, persistence


def use_healer(healer: Healer | None, persistence: DynamoDBPersistenceLayer | None = None) -> None:
    """Install the healer (and idempotency store) the handler uses; None rebuilds from env."""
    global _healer, _persistence
    _healer, _persistence = healer, persistence


def _get() -> tuple[Healer, DynamoDBPersistenceLayer]:
    global _healer, _persistence
    if _healer is None or _persistence is None:
        healer, persistence = build_healer()
        _healer = _healer or healer
        _persistence = _persistence or persistence
    return _healer, _persistence


# -- handling --------------------------------------------------------------------------------------


def _mark_duplicate(response: Any, record: Any) -> Any:
    metrics.add_metric(name="DuplicateEvents", unit=MetricUnit.Count, value=1)
    if isinstance(response, dict):
        return {**response, "duplicate": True}
    return response


def _on_alarm(alarm: dict[str, Any]) -> dict[str, Any]:
    healer, _ = _get()
    if alarm["state"] == "OK":
        return healer.recovered(alarm["alarm"], alarm["at"], alarm.get("since")).as_dict()
    return healer.heal(alarm["alarm"], alarm["at"]).as_dict()


@tracer.capture_method
def handle_alarm(event: AlarmStateChangeEvent, context: LambdaContext | None) -> dict[str, Any]:
    detail = detail_of(event)
    logger.append_keys(alarm=detail.alarmName, alarm_state=detail.state.value)
    previous = detail.previousState
    alarm = {
        "alarm": detail.alarmName,
        "state": detail.state.value,
        "at": detail.state.timestamp,
        "since": previous.timestamp if previous is not None and previous.value == "ALARM" else None,
    }
    _, persistence = _get()
    config = IdempotencyConfig(
        event_key_jmespath="[alarm, state, at]",
        raise_on_no_idempotency_key=True,
        expires_after_seconds=6 * 3600,
        response_hook=_mark_duplicate,
    )
    if context is not None:
        config.register_lambda_context(context)
    once = idempotent_function(
        data_keyword_argument="alarm", persistence_store=persistence, config=config
    )(_on_alarm)
    try:
        return once(alarm=alarm)
    except IdempotencyAlreadyInProgressError:
        # The same state change is being handled right now; that run restarts (or fails and is
        # retried itself). This one has nothing to add.
        metrics.add_metric(name="DuplicateEvents", unit=MetricUnit.Count, value=1)
        return {"alarm": detail.alarmName, "action": "duplicate", "reason": "in progress"}


def detail_of(event: AlarmStateChangeEvent) -> AlarmStateChangeDetail:
    return event.detail  # type: ignore[return-value] - the model narrows RawDictOrModel


def classify(event: Any) -> AlarmStateChangeEvent | ScheduledSweepEvent:
    problems = []
    for model in (AlarmStateChangeEvent, ScheduledSweepEvent):
        try:
            return parse(event=event, model=model)
        except (ValidationError, ValueError, TypeError) as exc:
            problems.append(exc)
    if isinstance(event, dict) and event.get("detail-type") == ALARM_STATE_CHANGE:
        # An alarm event that does not parse: say what (a malformed timestamp, a bad name).
        raise InvalidEvent(f"malformed alarm state change: {_first_error(problems[0])}")
    raise InvalidEvent("neither a CloudWatch Alarm State Change nor a Scheduled Event")


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ()))
        return f"{where}: {error.get('msg', '')}"[:300]
    return str(exc)[:300]


@logger.inject_lambda_context(correlation_id_path="id", clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        _get()  # the healer, and with it the Deployment dimension of every metric below
        parsed = classify(event)
        if isinstance(parsed, AlarmStateChangeEvent):
            outcome = handle_alarm(parsed, context)
            logger.info("alarm handled", extra={"outcome": outcome})
            return outcome
        outcomes = [o.as_dict() for o in _get()[0].sweep()]
        logger.info("sweep", extra={"outcomes": outcomes})
        return {"sweep": outcomes}
    except (InvalidEvent, InvalidAlarm) as exc:
        logger.error("dropping event that can never succeed", extra={"reason": str(exc)})
        metrics.add_metric(name="RejectedEvents", unit=MetricUnit.Count, value=1)
        return {"rejected": str(exc)}
