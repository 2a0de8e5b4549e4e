"""The events the controller accepts, as Powertools Parser models, and what each one points at.

An event only says which instance to look at; nothing else in it is trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunnelnat.core.config import INSTANCE_ID

STATE_CHANGE = "EC2 Instance State-change Notification"
TAG_CHANGE = "Tag Change on Resource"
LAUNCH_ACTION = "EC2 Instance-launch Lifecycle Action"
TERMINATE_ACTION = "EC2 Instance-terminate Lifecycle Action"
SCHEDULED = "Scheduled Event"
RECONCILE_REQUEST = "tunnelnat Reconcile Request"
# Lifecycle hooks the controller answers are named exactly ``tunnelnat-<deployment>-launch`` and
# ``-terminate`` (``hook_names``); the stack's rule matches the same names, and every other hook in
# the account and region (another team's, another deployment's) is left to its owner. HOOK_PREFIX
# is what every deployment's hooks share: never enough to call a hook ours.
HOOK_PREFIX = "tunnelnat-"


def hook_prefix(deployment: str) -> str:
    """``tunnelnat-<deployment>-``: the names of this deployment's lifecycle hooks start so."""
    return f"{HOOK_PREFIX}{deployment}-"


HOOK_TRANSITIONS = ("launch", "terminate")


def hook_names(deployment: str) -> tuple[str, ...]:
    """This deployment's lifecycle hook names, exactly (the stack names its hooks so):
    ``tunnelnat-<deployment>-launch`` and ``tunnelnat-<deployment>-terminate``."""
    return tuple(f"{hook_prefix(deployment)}{t}" for t in HOOK_TRANSITIONS)


def is_our_hook(hook_name: str, deployment: str) -> bool:
    """Whether a lifecycle hook is this deployment's to complete: one of ``hook_names``, exactly.
    A prefix would not do: ``tunnelnat-acme-2-launch`` (deployment ``acme-2``) starts with
    ``tunnelnat-acme-``."""
    return hook_name in hook_names(deployment)


class InvalidEvent(ValueError):
    """The event can never be acted on; it is logged and dropped, not retried."""


def _instance_id(value: str) -> str:
    if not INSTANCE_ID.fullmatch(value):
        raise ValueError(f"not an EC2 instance ID: {value[:40]!r}")
    return value


class StateChangeDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    instance_id: str = Field(alias="instance-id")
    state: str

    _check = field_validator("instance_id")(_instance_id)


class StateChangeEvent(EventBridgeModel):
    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Instance State-change Notification"] = Field(alias="detail-type")
    detail: StateChangeDetail


class TagChangeDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    changed_tag_keys: list[str] = Field(alias="changed-tag-keys")
    service: Literal["ec2"]
    resource_type: Literal["instance"] = Field(alias="resource-type")
    tags: dict[str, str] = Field(default_factory=dict)


class TagChangeEvent(EventBridgeModel):
    source: Literal["aws.tag"]
    detail_type: Literal["Tag Change on Resource"] = Field(alias="detail-type")
    detail: TagChangeDetail


class LifecycleDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    instance_id: str = Field(alias="EC2InstanceId")
    group_name: str = Field(alias="AutoScalingGroupName", pattern=r"^[A-Za-z0-9_.:/ +=@-]{1,255}$")
    hook_name: str = Field(alias="LifecycleHookName", pattern=r"^[A-Za-z0-9_./-]{1,255}$")
    token: str = Field(alias="LifecycleActionToken", pattern=r"^[A-Za-z0-9-]{1,64}$")
    transition: Literal[
        "autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"
    ] = Field(alias="LifecycleTransition")

    _check = field_validator("instance_id")(_instance_id)

    @property
    def launching(self) -> bool:
        return self.transition == "autoscaling:EC2_INSTANCE_LAUNCHING"


class LifecycleEvent(EventBridgeModel):
    source: Literal["aws.autoscaling"]
    detail_type: Literal[
        "EC2 Instance-launch Lifecycle Action", "EC2 Instance-terminate Lifecycle Action"
    ] = Field(alias="detail-type")
    detail: LifecycleDetail


class ScheduledEvent(EventBridgeModel):
    source: Literal["aws.events", "aws.scheduler"]
    detail_type: Literal["Scheduled Event"] = Field(alias="detail-type")


class ReconcileDetail(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    instance_ids: list[str] = Field(default_factory=list, alias="instance-ids", max_length=1000)

    @field_validator("instance_ids")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        return [_instance_id(v) for v in value]


class ReconcileRequestEvent(EventBridgeModel):
    source: Literal["tunnelnat.cli", "tunnelnat"]
    detail_type: Literal["tunnelnat Reconcile Request"] = Field(alias="detail-type")
    detail: ReconcileDetail


@dataclass(frozen=True)
class Request:
    """What one event asks of the controller."""

    event_id: str
    kind: str
    time: datetime  # timezone-aware, UTC (events that name no zone are read as UTC)
    instance_ids: tuple[str, ...] = ()
    full: bool = False
    lifecycle: LifecycleDetail | None = None

    def __post_init__(self) -> None:
        when = self.time
        try:
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
            when.timestamp()
        except (OverflowError, ValueError, OSError):
            raise InvalidEvent(f"event time out of range: {str(self.time)[:40]!r}") from None
        object.__setattr__(self, "time", when)


def _arn_instance_id(arn: str) -> str:
    # arn:aws:ec2:REGION:ACCOUNT:instance/i-0123456789abcdef0
    resource = arn.rsplit(":", 1)[-1]
    kind, _, ident = resource.partition("/")
    if kind != "instance":
        raise InvalidEvent(f"tag change on a non-instance resource: {arn[:120]!r}")
    return _instance_id(ident)


def parse_request(event: Any, *, deployment: str | None = None) -> Request:
    """What an EventBridge event (or an SQS body holding one) asks; InvalidEvent when not ours.

    ``deployment``: lifecycle actions of other deployments' hooks are InvalidEvent (never ours
    to complete). None (a reader that only shows a request, e.g. the CLI's dlq) accepts any
    tunnelnat hook."""
    if isinstance(event, str):
        try:
            event = json.loads(event)
        except ValueError as exc:
            raise InvalidEvent(f"event body is not JSON: {exc}") from None
        except RecursionError:
            # json's C parser recurses per nesting level: a body of 100,000 "[" ends here.
            raise InvalidEvent("event body is nested too deeply to be an event") from None
    if not isinstance(event, dict):
        raise InvalidEvent(f"event is a {type(event).__name__}, not an object")
    if _is_dead_letter(event):
        # Moved back from the dead-letter queue (an SQS redrive): the original event, retried.
        return parse_request(event["event"], deployment=deployment)
    kind = event.get("detail-type")
    try:
        if kind == STATE_CHANGE:
            state = parse(event=event, model=StateChangeEvent)
            return Request(state.id, kind, state.time, (state.detail.instance_id,))
        if kind == TAG_CHANGE:
            tag = parse(event=event, model=TagChangeEvent)
            ids = tuple(_arn_instance_id(arn) for arn in tag.resources)
            if not ids:
                raise InvalidEvent("tag change event names no resource")
            return Request(tag.id, kind, tag.time, ids)
        if kind in (LAUNCH_ACTION, TERMINATE_ACTION):
            action = parse(event=event, model=LifecycleEvent)
            detail = action.detail
            names = (f"{HOOK_PREFIX}...",) if deployment is None else hook_names(deployment)
            if not (detail.hook_name.startswith(HOOK_PREFIX) if deployment is None
                    else is_our_hook(detail.hook_name, deployment)):  # fmt: skip
                # Another team's hook (CodeDeploy, a drain hook) or another deployment's: never
                # ours to complete (A completing B's launch hook lets B's unenrolled instance
                # into service).
                raise InvalidEvent(
                    f"lifecycle hook {detail.hook_name!r} is not this deployment's "
                    f"(its hooks are {' and '.join(names)}): ignored"
                )
            return Request(action.id, kind, action.time, (detail.instance_id,), lifecycle=detail)
        if kind == SCHEDULED:
            scheduled = parse(event=event, model=ScheduledEvent)
            return Request(scheduled.id, kind, scheduled.time, full=True)
        if kind == RECONCILE_REQUEST:
            request = parse(event=event, model=ReconcileRequestEvent)
            ids = tuple(request.detail.instance_ids)
            return Request(request.id, kind, request.time, ids, full=not ids)
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, InvalidEvent):
            raise
        raise InvalidEvent(f"malformed {str(kind)[:80]!r} event: {_short(exc)}") from None
    raise InvalidEvent(f"unsupported event type {str(kind)[:80]!r}")


def _is_dead_letter(event: dict[str, Any]) -> bool:
    """The controller parks a message as ``{"event": <original body>, "instance_ids": [...],
    "reason": "..."}``; an original EventBridge event never has that shape."""
    return (
        "detail-type" not in event
        and set(event) == {"event", "instance_ids", "reason"}
        and isinstance(event["event"], str)
    )


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()[:3])
    # Powertools wraps pydantic's error; its text still names the field.
    return " ".join(str(exc).split())[:300]
