"""The events the controller accepts, as Powertools Parser models, and what each one points at.

An event only says which instance to look at; nothing else in it is trusted.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.parser.models import EventBridgeModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunnelnat.core.config import INSTANCE_ID

STATE_CHANGE = "EC2 Instance State-change Notification"
TAG_CHANGE = "Tag Change on Resource"


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


def _arn_instance_id(arn: str) -> str:
    # arn:aws:ec2:REGION:ACCOUNT:instance/i-0123456789abcdef0
    resource = arn.rsplit(":", 1)[-1]
    kind, _, ident = resource.partition("/")
    if kind != "instance":
        raise InvalidEvent(f"tag change on a non-instance resource: {arn[:120]!r}")
    return _instance_id(ident)


def instance_ids(event: Any) -> tuple[str, list[str]]:
    """``(event id, instance IDs)`` of an EventBridge event; InvalidEvent when not ours."""
    if isinstance(event, str):
        try:
            event = json.loads(event)
        except ValueError as exc:
            raise InvalidEvent(f"event body is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise InvalidEvent(f"event is a {type(event).__name__}, not an object")
    kind = event.get("detail-type")
    try:
        if kind == STATE_CHANGE:
            state = parse(event=event, model=StateChangeEvent)
            return state.id, [state.detail.instance_id]
        if kind == TAG_CHANGE:
            tag = parse(event=event, model=TagChangeEvent)
            ids = [_arn_instance_id(arn) for arn in tag.resources]
            if not ids:
                raise InvalidEvent("tag change event names no resource")
            return tag.id, ids
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, InvalidEvent):
            raise
        raise InvalidEvent(f"malformed {kind!r} event: {_short(exc)}") from None
    raise InvalidEvent(f"unsupported event type {str(kind)[:80]!r}")


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()[:3])
    # Powertools wraps pydantic's error; its text still names the field.
    return " ".join(str(exc).split())[:300]
