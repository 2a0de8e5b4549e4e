"""The healer: restart a tunnel whose TunnelUp alarm fired, with back-off, a cap, and a page.

The decisions are pure (``decide``): an alarm that is OK again is left alone; a tunnel restarted
recently waits (exponential back-off between attempts); a tunnel restarted ``max_restarts`` times
within the window is not restarted again, someone is paged instead, once per window. ``Healer``
carries a decision out through small adapters (CloudWatch alarms, the DynamoDB record of
attempts, the command port, SNS), so the tests can drive every path.

The record of attempts is one DynamoDB item per tunnel (``pk = healer``, ``sk = <tunnel>``) in
the controller's table. Claiming an attempt is a conditional write on the item's version, so of
two healers that decide to restart the same tunnel at once, one restarts and the other sees the
fresh attempt and backs off.

An alarm only emits an event when its state changes: a tunnel that stays in ALARM after a failed
restart produces no new event. The healer's scheduled sweep (``sweep``) is what retries it once
the back-off has passed, and what pages when the cap is reached.

It acts only on its own deployment's TunnelUp alarms, checked here and not only by the
EventBridge rule: the alarm's name carries the deployment's prefix, and its metric is ``TunnelUp``
in the deployment's own namespace ``tunnelnat/<deployment>`` (the only one this deployment's
gateway role may publish to: issue 21) with this deployment's ``Deployment`` dimension. Anything
else, an alarm on the shared ``tunnelnat`` namespace included, is ``InvalidAlarm`` (logged and
dropped by the handler, never a restart of this gateway's tunnel).

A metric is still a weaker witness than the gateway itself (issue 21, finding 3: anyone allowed
``cloudwatch:PutMetricData`` without a namespace condition can publish a TunnelUp=0). So before
it sends RestartTunnel the healer asks two things no metric can fake:
- **which gateway**: the instance G's ENI is attached to, running, and a member of the gateway's
  Auto Scaling group by ``aws:autoscaling:groupName`` (a tag key users cannot set: the ``aws:``
  prefix is reserved), never by the ``tunnelnat:*`` labels anyone may put on an instance
  (``GroupGateway``);
- **what the gateway says**: its pair agent's own report ``gateway/<instance-id>`` (written every
  30 s; only the gateway role writes it). A fresh report of installed CHILD_SAs contradicts the
  alarm: ``gateway-reports-up``, nothing is sent (the alarm's own notification tells a human; a
  CHILD_SA that is installed but carries nothing is DPD's to clear, after which the report says
  0). A stale or missing report (a single gateway has no pair agent) lets the restart go ahead,
  and RestartTunnel itself leaves a tunnel alone that charon says is INSTALLED and receiving
  (``skipped: healthy``: recorded, not counted against the cap).

It restarts only a tunnel that has been up since the gateway last configured it: the health
agent's ``TunnelEstablished`` (docs/health.md). At a first deploy, before the PSK is set or while
the partner is not ready yet, TunnelUp's missing data is breaching and the alarm fires; a restart
cannot help there, so the healer waits (``waiting-for-partner``) and neither uses its cap nor
pages. No TunnelEstablished datapoint at all (the agent is not installed yet, or the gateway is
not reporting) is ``no-report``: no restart either, since RestartTunnel cannot reach a gateway that
cannot publish; the TunnelUp alarm's own notification is what tells a human.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from ipaddress import IPv4Address
from typing import Any, Protocol

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunnelnat.adapters.commands import CommandError, CommandPort, CommandResult
from tunnelnat.core.config import ConfigError

TUNNEL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
HEALER_PK = "healer"
# The gateways' metrics (TunnelUp, TunnelEstablished) live in tunnelnat/<deployment>; the
# healer's own metrics stay in "tunnelnat" with a Deployment dimension (the handler's).
GATEWAY_NAMESPACE_PREFIX = "tunnelnat/"
GATEWAY_NAMESPACE = re.compile(r"^tunnelnat/[A-Za-z0-9_.:-]{1,64}$")
METRIC_NAME = "TunnelUp"
ESTABLISHED_METRIC = "TunnelEstablished"
DOCUMENT = "RestartTunnel"
GROUP_TAG = "aws:autoscaling:groupName"  # set by Auto Scaling; the aws: prefix is reserved
READINESS_PK = "gateway"
# Attachment states in which G's ENI belongs to the instance (as adapters/pair.py reads them).
HELD = ("attaching", "attached")


def gateway_namespace(deployment: str) -> str:
    """Where this deployment's gateways publish TunnelUp and TunnelEstablished."""
    return GATEWAY_NAMESPACE_PREFIX + deployment


class InvalidAlarm(ValueError):
    """The alarm is not one the healer acts on (deleted, not a TunnelUp alarm, bad tunnel name)."""


# -- policy and pure decisions -------------------------------------------------------------------


class HealerPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)

    backoff_base_seconds: float = Field(default=60.0, ge=0, le=86_400)
    backoff_factor: float = Field(default=2.0, ge=1, le=10)
    backoff_max_seconds: float = Field(default=900.0, ge=0, le=86_400)
    max_restarts: int = Field(default=3, ge=1, le=100)
    window_seconds: float = Field(default=3600.0, ge=60, le=86_400)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th attempt in the window before the next."""
        if attempts <= 0:
            return 0.0
        delay = self.backoff_base_seconds * self.backoff_factor ** (attempts - 1)
        return min(self.backoff_max_seconds, delay)


@dataclass(frozen=True)
class Attempt:
    id: str
    at: float
    alarm: str
    alarm_time: str
    gateway: str = ""
    status: str = "Running"  # Running (claimed), then Success, Failed, TimedOut, Error, ...
    seconds: float = 0.0
    detail: str = ""
    # RestartTunnel found the tunnel healthy and left it alone: not a restart, not in the cap.
    skipped: bool = False

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Attempt:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class HealState:
    """One tunnel's record: recent attempts, the last page, a version for conditional writes."""

    tunnel: str
    attempts: tuple[Attempt, ...] = ()
    paged_at: float | None = None
    recovered_at: float | None = None
    version: int = 0

    def recent(self, now: float, window: float) -> tuple[Attempt, ...]:
        return tuple(a for a in self.attempts if now - a.at < window)

    def restarts(self, now: float, window: float) -> tuple[Attempt, ...]:
        """The recent attempts that restarted (or tried to): what the cap counts."""
        return tuple(a for a in self.recent(now, window) if not a.skipped)


class Action(StrEnum):
    RESTART = "restart"
    SKIP_OK = "skip-ok"  # the alarm is OK again: nothing to heal
    SKIP_NOT_ALARM = "skip-not-alarm"  # INSUFFICIENT_DATA: not a verdict either way
    # Never up since the gateway configured it (PSK not set, partner not ready): not ours to heal.
    SKIP_WAITING = "waiting-for-partner"
    SKIP_NO_REPORT = "no-report"  # no TunnelEstablished datapoint: the agent is not reporting
    # The gateway's own fresh report says its CHILD_SAs are installed: the alarm is contradicted.
    SKIP_GATEWAY_UP = "gateway-reports-up"
    WAIT = "wait"  # back-off: too soon after the previous attempt
    PAGE = "page"  # the cap is reached: stop restarting, tell a human
    ALREADY_PAGED = "already-paged"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    retry_at: float | None = None


WAITING_REASON = (
    "waiting for the partner: the tunnel has not been up since the gateway was configured "
    "(is the PSK set? is the partner's endpoint up?)"
)
NO_REPORT_REASON = (
    "no TunnelEstablished datapoint from the gateway's health agent recently (not installed "
    "yet, or the gateway is not reporting): a restart cannot help"
)


def decide(
    alarm_state: str,
    state: HealState,
    now: float,
    policy: HealerPolicy,
    *,
    established: bool | None,
) -> Decision:
    """What to do about a tunnel whose alarm is in ``alarm_state`` now. ``established``: the
    newest TunnelEstablished (True: up since configured; False: never; None: no datapoint)."""
    if alarm_state == "OK":
        return Decision(Action.SKIP_OK, "the alarm is OK again")
    if alarm_state != "ALARM":
        return Decision(Action.SKIP_NOT_ALARM, f"the alarm is {alarm_state}, not ALARM")
    if established is None:
        return Decision(Action.SKIP_NO_REPORT, NO_REPORT_REASON)
    if not established:
        return Decision(Action.SKIP_WAITING, WAITING_REASON)
    restarts = state.restarts(now, policy.window_seconds)
    if len(restarts) >= policy.max_restarts:
        window = f"{policy.window_seconds / 60:.0f} min"
        if state.paged_at is not None and now - state.paged_at < policy.window_seconds:
            return Decision(Action.ALREADY_PAGED, f"cap reached, paged within the last {window}")
        return Decision(
            Action.PAGE,
            f"{len(restarts)} restarts in the last {window} (cap {policy.max_restarts})",
        )
    # The back-off counts every attempt, those RestartTunnel skipped too: an alarm that keeps
    # contradicting a healthy tunnel costs one command per back-off, not one per sweep.
    recent = state.recent(now, policy.window_seconds)
    if recent:
        last = max(a.at for a in recent)
        ready = last + policy.backoff(len(recent))
        if now < ready:
            return Decision(
                Action.WAIT,
                f"back-off: attempt {len(recent) + 1} not before {ready - now:.0f}s from now",
                retry_at=ready,
            )
    return Decision(Action.RESTART, f"attempt {len(restarts) + 1} of {policy.max_restarts}")


@dataclass(frozen=True)
class GatewayReport:
    """The pair agent's ``gateway/<instance-id>`` item, as far as the healer reads it."""

    instance_id: str
    sas: int | None  # INSTALLED CHILD_SAs of the tunnel's children, as charon told the agent
    updated_at: float | None
    role: str | None = None


def gateway_contradicts(
    report: GatewayReport | None, now: float, max_age: float
) -> Decision | None:
    """A decision not to restart when the gateway's own fresh report says CHILD_SAs are
    installed; None when the report is missing, stale or says none (the restart goes ahead)."""
    if report is None or report.updated_at is None or report.sas is None:
        return None
    age = now - report.updated_at
    if age > max_age or age < -max_age or report.sas < 1:
        return None
    return Decision(
        Action.SKIP_GATEWAY_UP,
        f"the gateway's own report (gateway/{report.instance_id}, {max(age, 0):.0f}s old) says "
        f"{report.sas} CHILD_SA(s) installed: TunnelUp=0 contradicts it (a datapoint someone "
        "else published?); not restarting",
    )


def page_message(
    tunnel: str, alarm: str, state: HealState, now: float, policy: HealerPolicy
) -> dict:
    """What the page says: which tunnel, and every attempt the healer made in the window."""
    recent = state.recent(now, policy.window_seconds)
    restarts = state.restarts(now, policy.window_seconds)
    return {
        "summary": (
            f"tunnelnat: tunnel {tunnel} is still down after {len(restarts)} restarts in "
            f"{policy.window_seconds / 60:.0f} minutes; the healer has stopped restarting it"
        ),
        "tunnel": tunnel,
        "alarm": alarm,
        "cap": policy.max_restarts,
        "window_seconds": policy.window_seconds,
        "attempts": [
            {
                "at": _iso(a.at),
                "status": a.status,
                "seconds": a.seconds,
                "gateway": a.gateway,
                "alarm_time": a.alarm_time,
                "detail": a.detail,
                "skipped": a.skipped,
            }
            for a in recent
        ],
        "next": "investigate the gateway and the partner's endpoint; the healer resumes once "
        "the alarm has been OK or the window has passed",
    }


def parse_alarm_time(value: str) -> float:
    """CloudWatch's state timestamps ("2026-11-24T12:00:00.123+0000") as epoch seconds."""
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            return datetime.strptime(value, fmt).timestamp()
        except ValueError:
            continue
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _alarm_time(value: str) -> float:
    """parse_alarm_time, or InvalidAlarm: a malformed timestamp is dropped, never retried."""
    try:
        return parse_alarm_time(value)
    except (ValueError, TypeError, OverflowError):
        raise InvalidAlarm(f"malformed alarm state timestamp {value[:40]!r}") from None


def restart_skipped(stdout: str) -> bool:
    """RestartTunnel's JSON line says it left a healthy tunnel alone (``"skipped": "healthy"``)."""
    for line in reversed((stdout or "").strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        return isinstance(data, dict) and data.get("skipped") == "healthy"
    return False


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _excerpt(text: str, limit: int = 400) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else "..." + text[-limit:]


# -- ports ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlarmView:
    name: str
    state: str
    tunnel: str
    state_updated: float | None = None
    deployment: str = ""  # the Deployment dimension of the alarm's TunnelUp metric


class AlarmPort(Protocol):
    """CloudWatch: the TunnelUp alarms, and the health agent's TunnelEstablished reports."""

    def current(self, name: str) -> AlarmView | None: ...

    def in_alarm(self, prefix: str) -> list[str]: ...

    def established(self, deployment: str, tunnel: str) -> bool | None: ...


class StorePort(Protocol):
    def load(self, tunnel: str) -> HealState: ...

    def save(self, state: HealState, *, expected_version: int) -> bool: ...


class PagerPort(Protocol):
    def page(self, subject: str, message: Mapping[str, Any]) -> str: ...


class GatewayLocator(Protocol):
    def find_gateway(self, deployment: str) -> str: ...


class GatewayReportPort(Protocol):
    """The gateway's own report (``gateway/<instance-id>``), None when it wrote none."""

    def report(self, instance_id: str) -> GatewayReport | None: ...


class Telemetry(Protocol):
    def count(self, name: str, value: float = 1) -> None: ...

    def seconds(self, name: str, value: float) -> None: ...


class NoTelemetry:
    def count(self, name: str, value: float = 1) -> None:
        return None

    def seconds(self, name: str, value: float) -> None:
        return None


# -- adapters ------------------------------------------------------------------------------------


class CloudWatchAlarms:
    def __init__(
        self,
        cloudwatch_client: Any,
        *,
        namespace: str,
        established_lookback_seconds: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cw = cloudwatch_client
        self._namespace = namespace  # the gateways' (tunnelnat/<deployment>)
        self._lookback = established_lookback_seconds
        self._clock = clock

    def current(self, name: str) -> AlarmView | None:
        reply = self._cw.describe_alarms(AlarmNames=[name], AlarmTypes=["MetricAlarm"])
        alarms = reply.get("MetricAlarms", [])
        if not alarms:
            return None
        raw = alarms[0]
        updated = raw.get("StateUpdatedTimestamp")
        dimensions = tunnel_up_dimensions(raw, self._namespace)
        return AlarmView(
            name=name,
            state=raw.get("StateValue", "INSUFFICIENT_DATA"),
            tunnel=tunnel_of(raw, self._namespace),
            state_updated=updated.timestamp() if isinstance(updated, datetime) else None,
            deployment=dimensions.get("Deployment", ""),
        )

    def established(self, deployment: str, tunnel: str) -> bool | None:
        """The newest TunnelEstablished (1-minute Maximum) within the lookback: True/False, or
        None when there is no datapoint at all. The window is real time, whatever the caller's
        clock: it asks whether the agent reported lately."""
        return latest_established(
            self._cw,
            deployment,
            tunnel,
            now=self._clock(),
            lookback=self._lookback,
            namespace=self._namespace,
        )

    def in_alarm(self, prefix: str) -> list[str]:
        names: list[str] = []
        pages = self._cw.get_paginator("describe_alarms").paginate(
            AlarmNamePrefix=prefix, StateValue="ALARM", AlarmTypes=["MetricAlarm"]
        )
        for page in pages:
            names.extend(a["AlarmName"] for a in page.get("MetricAlarms", []))
        return sorted(names)


def latest_established(
    cloudwatch: Any,
    deployment: str,
    tunnel: str,
    *,
    now: float,
    lookback: float,
    namespace: str | None = None,
) -> bool | None:
    """The newest ``TunnelEstablished`` (Deployment, Tunnel) datapoint in ``lookback`` seconds
    before ``now``, in the gateways' ``namespace`` (default ``tunnelnat/<deployment>``): True
    when it is 1, False when 0, None when there is none."""
    end = datetime.fromtimestamp(now, UTC)
    reply = cloudwatch.get_metric_data(
        MetricDataQueries=[
            {
                "Id": "established",
                "MetricStat": {
                    "Metric": {
                        "Namespace": namespace or gateway_namespace(deployment),
                        "MetricName": ESTABLISHED_METRIC,
                        "Dimensions": [
                            {"Name": "Deployment", "Value": deployment},
                            {"Name": "Tunnel", "Value": tunnel},
                        ],
                    },
                    "Period": 60,
                    "Stat": "Maximum",
                },
                "ReturnData": True,
            }
        ],
        StartTime=end - timedelta(seconds=lookback),
        EndTime=end + timedelta(seconds=60),  # the current, incomplete minute counts too
        ScanBy="TimestampDescending",
    )
    newest: tuple[datetime, float] | None = None
    for result in reply.get("MetricDataResults", []):
        for stamp, value in zip(
            result.get("Timestamps", []), result.get("Values", []), strict=False
        ):
            if newest is None or stamp > newest[0]:
                newest = (stamp, value)
    return None if newest is None else newest[1] >= 1


def tunnel_up_dimensions(alarm: Mapping[str, Any], namespace: str) -> dict[str, str]:
    """The dimensions of the ``TunnelUp`` metric in ``namespace`` (the gateways') an alarm
    watches (directly or in a metric query); InvalidAlarm when it watches no such metric: an
    alarm on the shared ``tunnelnat`` namespace, which anyone may publish to, is not ours."""
    metrics = [alarm]
    metrics += [m.get("MetricStat", {}).get("Metric", {}) for m in alarm.get("Metrics", []) or []]
    for metric in metrics:
        if metric.get("Namespace") != namespace or metric.get("MetricName") != METRIC_NAME:
            continue
        return {str(d.get("Name")): str(d.get("Value", "")) for d in metric.get("Dimensions", [])}
    raise InvalidAlarm(f"{alarm.get('AlarmName')}: not an alarm on {namespace} TunnelUp by Tunnel")


def tunnel_of(alarm: Mapping[str, Any], namespace: str) -> str:
    """The tunnel a TunnelUp alarm watches, from its metric's ``Tunnel`` dimension."""
    dimensions = tunnel_up_dimensions(alarm, namespace)
    if "Tunnel" not in dimensions:
        raise InvalidAlarm(
            f"{alarm.get('AlarmName')}: not an alarm on {namespace} TunnelUp by Tunnel"
        )
    value = dimensions["Tunnel"]
    if not TUNNEL_NAME.fullmatch(value):
        raise InvalidAlarm(f"alarm's Tunnel dimension {value!r} is not a tunnel name")
    return value


def _key(tunnel: str) -> dict:
    return {"pk": {"S": HEALER_PK}, "sk": {"S": tunnel}}


class DynamoHealStore:
    """``healer/<tunnel>`` items: attempts as JSON, the last page, a version for conditions."""

    def __init__(self, dynamodb_client: Any, table_name: str) -> None:
        self._db = dynamodb_client
        self._table = table_name

    def load(self, tunnel: str) -> HealState:
        reply = self._db.get_item(TableName=self._table, Key=_key(tunnel), ConsistentRead=True)
        item = reply.get("Item")
        if not item:
            return HealState(tunnel)
        attempts = tuple(Attempt.from_json(a) for a in json.loads(item["attempts"]["S"]))
        return HealState(
            tunnel=tunnel,
            attempts=attempts,
            paged_at=float(item["paged_at"]["N"]) if "paged_at" in item else None,
            recovered_at=float(item["recovered_at"]["N"]) if "recovered_at" in item else None,
            version=int(item["version"]["N"]),
        )

    def save(self, state: HealState, *, expected_version: int) -> bool:
        """Write ``state`` (version ``expected_version + 1``) unless someone wrote first."""
        item: dict[str, Any] = {
            **_key(state.tunnel),
            "attempts": {"S": json.dumps([asdict(a) for a in state.attempts])},
            "version": {"N": str(expected_version + 1)},
            "updated_at": {"N": f"{time.time():.3f}"},
        }
        if state.paged_at is not None:
            item["paged_at"] = {"N": f"{state.paged_at:.3f}"}
        if state.recovered_at is not None:
            item["recovered_at"] = {"N": f"{state.recovered_at:.3f}"}
        if expected_version == 0:
            condition, values = "attribute_not_exists(pk)", None
        else:
            condition, values = "version = :v", {":v": {"N": str(expected_version)}}
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "Item": item,
            "ConditionExpression": condition,
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        try:
            self._db.put_item(**kwargs)
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True


class GatewayNotHeld(RuntimeError):
    """G's ENI is not held by a running member of the gateway group: nothing is sent."""


class GroupGateway:
    """The active gateway as the healer may trust it: the instance G's ENI (the stack's, by ID)
    is attached to, running, in our VPC (when known) and a member of the gateway's Auto Scaling
    group by ``aws:autoscaling:groupName``. Auto Scaling sets that tag on the instances it
    launches; users cannot create or edit a tag whose key starts with ``aws:`` ("Tag
    restrictions", Amazon EC2 User Guide), so an instance labelled ``tunnelnat:role=gateway``
    or ``tunnelnat:gateway=<deployment>`` by anyone with ec2:CreateTags is not a gateway here."""

    def __init__(
        self, ec2_client: Any, *, eni_id: str, group: str, vpc_id: str | None = None
    ) -> None:
        self._ec2 = ec2_client
        self._eni_id = eni_id
        self._group = group
        self._vpc_id = vpc_id

    def find_gateway(self, deployment: str) -> str:
        reply = self._ec2.describe_network_interfaces(NetworkInterfaceIds=[self._eni_id])
        interfaces = reply.get("NetworkInterfaces", [])
        if not interfaces:
            raise GatewayNotHeld(f"G's ENI {self._eni_id} not found")
        attachment = interfaces[0].get("Attachment") or {}
        status = attachment.get("Status") or "detached"
        holder = attachment.get("InstanceId") if status in HELD else None
        if holder is None:
            raise GatewayNotHeld(
                f"G's ENI {self._eni_id} is {status}, attached to no gateway "
                "(a failover in progress?): nothing to restart"
            )
        reply = self._ec2.describe_instances(InstanceIds=[holder])
        raw = next((i for r in reply.get("Reservations", []) for i in r.get("Instances", [])), {})
        tags = {t.get("Key"): t.get("Value") for t in raw.get("Tags", [])}
        if tags.get(GROUP_TAG) != self._group or (
            self._vpc_id is not None and raw.get("VpcId") != self._vpc_id
        ):
            raise GatewayNotHeld(
                f"G's ENI {self._eni_id} is attached to {holder}, which is not a gateway of "
                f"{deployment} (not in Auto Scaling group {self._group}): refusing to send it "
                "anything"
            )
        state = raw.get("State", {}).get("Name")
        if state != "running":
            raise GatewayNotHeld(
                f"G's ENI {self._eni_id} is attached to {holder}, which is {state}"
            )
        return holder


class UnwiredGateway:
    """Without the gateway group and G's ENI the healer cannot tell the gateway from an
    instance merely tagged like one: it sends nothing, and says why."""

    def find_gateway(self, deployment: str) -> str:
        raise GatewayNotHeld(
            "the healer knows no gateway group and G's ENI (TUNNELNAT_GATEWAY_GROUP, "
            "TUNNELNAT_GATEWAY_ENI_ID): it restarts nothing rather than trust a tag"
        )


class DynamoGatewayReports:
    """``gateway/<instance-id>``: the pair agent's readiness item (gateway/tunnelnat_pair.py
    ``Records.readiness``), read for its ``sas`` and ``updated_at``."""

    def __init__(self, dynamodb_client: Any, table_name: str) -> None:
        self._db = dynamodb_client
        self._table = table_name

    def report(self, instance_id: str) -> GatewayReport | None:
        reply = self._db.get_item(
            TableName=self._table,
            Key={"pk": {"S": READINESS_PK}, "sk": {"S": instance_id}},
            ConsistentRead=True,
        )
        item = reply.get("Item")
        if not item:
            return None

        def number(name: str) -> float | None:
            value = item.get(name) or {}
            try:
                return float(value["N"]) if "N" in value else None
            except ValueError:
                return None

        sas = number("sas")
        role = (item.get("role") or {}).get("S")
        return GatewayReport(
            instance_id, None if sas is None else int(sas), number("updated_at"), role
        )


class SnsPager:
    def __init__(self, sns_client: Any, topic_arn: str) -> None:
        self._sns = sns_client
        self._topic = topic_arn

    def page(self, subject: str, message: Mapping[str, Any]) -> str:
        reply = self._sns.publish(
            TopicArn=self._topic,
            Subject=subject[:99],
            Message=json.dumps(message, indent=2, sort_keys=True),
        )
        return reply["MessageId"]


# -- settings ------------------------------------------------------------------------------------


class HealerSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    table_name: str = Field(pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    idempotency_table: str = Field(pattern=r"^[A-Za-z0-9_.-]{3,255}$")
    page_topic_arn: str = Field(
        pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$"
    )
    deployment: str = Field(default="tunnelnat", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    document_prefix: str = Field(default="tunnelnat-", pattern=r"^[A-Za-z0-9_.-]{0,100}$")
    # Default: this deployment's TunnelUp alarms only, never another deployment's in the account.
    alarm_prefix: str = Field(default="", pattern=r"^([A-Za-z0-9_.:/-]{1,200})?$")
    restart_wait_seconds: int = Field(default=30, ge=1, le=120)
    command_timeout_seconds: float = Field(default=150.0, ge=30, le=800)
    # How far back the newest TunnelEstablished may lie (at least a few agent intervals).
    established_lookback_seconds: int = Field(default=900, ge=60, le=86_400)
    # The gateways' namespace (TunnelUp, TunnelEstablished): tunnelnat/<deployment> by default.
    metric_namespace: str = Field(default="", pattern=r"^(tunnelnat/[A-Za-z0-9_.:-]{1,64})?$")
    # The pair agent writes its report every 30 s: three missed writes and it is stale.
    readiness_max_age_seconds: int = Field(default=90, ge=30, le=3600)
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    policy: HealerPolicy = Field(default_factory=HealerPolicy)
    # The gateway is the instance holding G's ENI in the gateway's Auto Scaling group (and this
    # VPC): never an impostor that only carries the tunnelnat:* tags. G itself is informative.
    gateway_ip: IPv4Address | None = None
    vpc_id: str | None = Field(default=None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    gateway_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:/ +=@-]{1,255}$")
    # G's ENI (the stack's): RestartTunnel goes to the instance holding it, the active gateway of
    # a pair (a standby holds no SA and must not initiate); without it (or the group) nothing is
    # sent anywhere.
    gateway_eni_id: str | None = Field(default=None, pattern=r"^eni-[0-9a-f]{8,17}$")

    @model_validator(mode="before")
    @classmethod
    def _deployment_alarm_prefix(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("alarm_prefix"):
            deployment = data.get("deployment") or "tunnelnat"
            data = {**data, "alarm_prefix": f"tunnelnat-{deployment}-TunnelUp-"}
        if isinstance(data, dict) and not data.get("metric_namespace"):
            data = {
                **data,
                "metric_namespace": gateway_namespace(data.get("deployment") or "tunnelnat"),
            }
        return data

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> HealerSettings:
        env = os.environ if environ is None else environ
        required = ("TUNNELNAT_TABLE_NAME", "TUNNELNAT_PAGE_TOPIC_ARN")
        missing = [k for k in required if not env.get(k)]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")
        policy_env = {
            "backoff_base_seconds": "TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS",
            "backoff_factor": "TUNNELNAT_HEALER_BACKOFF_FACTOR",
            "backoff_max_seconds": "TUNNELNAT_HEALER_BACKOFF_MAX_SECONDS",
            "max_restarts": "TUNNELNAT_HEALER_MAX_RESTARTS_PER_HOUR",
            "window_seconds": "TUNNELNAT_HEALER_WINDOW_SECONDS",
        }
        optional = {
            "deployment": "TUNNELNAT_DEPLOYMENT",
            "document_prefix": "TUNNELNAT_DOCUMENT_PREFIX",
            "alarm_prefix": "TUNNELNAT_HEALER_ALARM_PREFIX",
            "restart_wait_seconds": "TUNNELNAT_HEALER_RESTART_WAIT_SECONDS",
            "command_timeout_seconds": "TUNNELNAT_HEALER_COMMAND_TIMEOUT_SECONDS",
            "established_lookback_seconds": "TUNNELNAT_HEALER_ESTABLISHED_LOOKBACK_SECONDS",
            "metric_namespace": "TUNNELNAT_METRIC_NAMESPACE",
            "readiness_max_age_seconds": "TUNNELNAT_HEALER_READINESS_MAX_AGE_SECONDS",
            "gateway_ip": "TUNNELNAT_GATEWAY_IP",
            "vpc_id": "TUNNELNAT_VPC_ID",
            "gateway_group": "TUNNELNAT_GATEWAY_GROUP",
            "gateway_eni_id": "TUNNELNAT_GATEWAY_ENI_ID",
        }
        try:
            policy = HealerPolicy(**{k: env[v] for k, v in policy_env.items() if env.get(v)})
            return cls(
                table_name=env["TUNNELNAT_TABLE_NAME"],
                idempotency_table=env.get("TUNNELNAT_IDEMPOTENCY_TABLE")
                or env["TUNNELNAT_TABLE_NAME"],
                page_topic_arn=env["TUNNELNAT_PAGE_TOPIC_ARN"],
                region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                policy=policy,
                **{k: env[v] for k, v in optional.items() if env.get(v)},
            )
        except ValidationError as exc:
            raise ConfigError(f"healer settings: {exc}") from None


# -- the service ---------------------------------------------------------------------------------


@dataclass
class HealOutcome:
    alarm: str
    action: str
    reason: str
    tunnel: str = ""
    gateway: str = ""
    status: str = ""
    seconds: float = 0.0
    page_id: str = ""
    retry_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in ("", None, 0.0)}


@dataclass
class Healer:
    alarms: AlarmPort
    store: StorePort
    commands: CommandPort
    gateways: GatewayLocator
    pager: PagerPort
    deployment: str
    policy: HealerPolicy = field(default_factory=HealerPolicy)
    restart_wait_seconds: int = 30
    alarm_prefix: str = "tunnelnat-"
    telemetry: Telemetry = field(default_factory=NoTelemetry)
    clock: Callable[[], float] = time.time
    # The gateway's own report, read before a restart (None: no cross-check, e.g. the lab's).
    reports: GatewayReportPort | None = None
    readiness_max_age: float = 90.0

    def ours(self, alarm_name: str) -> AlarmView:
        """The alarm, re-read now, if it is one of this deployment's TunnelUp alarms: its name
        has our prefix and its metric our Deployment dimension. Else InvalidAlarm."""
        if not self.alarm_prefix or not alarm_name.startswith(self.alarm_prefix):
            raise InvalidAlarm(
                f"alarm {alarm_name!r} is not one of this deployment's TunnelUp alarms "
                f"(they are named {self.alarm_prefix}...)"
            )
        alarm = self.alarms.current(alarm_name)
        if alarm is None:
            raise InvalidAlarm(f"alarm {alarm_name} does not exist")
        if alarm.deployment != self.deployment:
            raise InvalidAlarm(
                f"alarm {alarm_name} watches TunnelUp of deployment {alarm.deployment!r}, "
                f"not {self.deployment!r}"
            )
        return alarm

    def heal(self, alarm_name: str, alarm_time: str = "") -> HealOutcome:
        """One alarm: re-read its state now, decide, and carry the decision out."""
        alarm = self.ours(alarm_name)
        out = HealOutcome(alarm=alarm_name, action="", reason="", tunnel=alarm.tunnel)
        # Read only for an alarm in ALARM: OK and INSUFFICIENT_DATA are decided without it.
        established = (
            self.alarms.established(self.deployment, alarm.tunnel)
            if alarm.state == "ALARM"
            else None
        )
        # Two tries: a lost race for the record re-reads it and decides again.
        for _ in range(2):
            state = self.store.load(alarm.tunnel)
            now = self.clock()
            decision = decide(alarm.state, state, now, self.policy, established=established)
            out.action, out.reason, out.retry_at = decision.action, decision.reason, None
            if decision.action is Action.RESTART:
                gateway, problem = self._locate()
                contradiction = self._contradicted(gateway, now)
                if contradiction is not None:
                    out.action, out.reason, out.gateway = (
                        contradiction.action,
                        contradiction.reason,
                        gateway or "",
                    )
                    self.telemetry.count("SkippedGatewayReportsUp")
                    return out
                if self._restart(alarm, alarm_time, state, now, out, gateway, problem):
                    return out
                continue
            if decision.action is Action.PAGE:
                if self._page(alarm, state, now, out):
                    return out
                continue
            out.retry_at = decision.retry_at
            self.telemetry.count(
                {
                    Action.SKIP_OK: "SkippedAlreadyOk",
                    Action.SKIP_NOT_ALARM: "SkippedNotAlarm",
                    Action.SKIP_WAITING: "SkippedWaitingForPartner",
                    Action.SKIP_NO_REPORT: "SkippedNoReport",
                    Action.WAIT: "SkippedBackoff",
                    Action.ALREADY_PAGED: "SkippedCapped",
                }[decision.action]
            )
            return out
        out.action, out.reason = "concurrent", "another healer changed the record twice; it acts"
        self.telemetry.count("SkippedConcurrent")
        return out

    def recovered(self, alarm_name: str, ok_time: str, alarm_since: str | None) -> HealOutcome:
        """The alarm went back to OK: time to recovery, measured from the ALARM transition."""
        out = HealOutcome(alarm=alarm_name, action="recovered", reason="the alarm is OK")
        ok_at = _alarm_time(ok_time)
        since = _alarm_time(alarm_since) if alarm_since else None
        alarm = self.ours(alarm_name)
        out.tunnel = alarm.tunnel
        if since is not None:
            seconds = max(0.0, ok_at - since)
            out.seconds = round(seconds, 3)
            self.telemetry.seconds("TimeToRecovery", seconds)
        for _ in range(2):
            state = self.store.load(alarm.tunnel)
            updated = replace(state, recovered_at=ok_at)
            if self.store.save(updated, expected_version=state.version):
                break
        return out

    def sweep(self) -> list[HealOutcome]:
        """Every alarm of ours still in ALARM: retry after back-off, page at the cap."""
        outcomes = []
        for name in self.alarms.in_alarm(self.alarm_prefix):
            try:
                outcomes.append(self.heal(name))
            except InvalidAlarm as exc:
                outcomes.append(HealOutcome(alarm=name, action="invalid", reason=str(exc)))
        return outcomes

    # -- steps -----------------------------------------------------------------------------------
    def _locate(self) -> tuple[str | None, str]:
        """The gateway to restart on (the group's ENI holder), or None and why not."""
        try:
            return self.gateways.find_gateway(self.deployment), ""
        except (CommandError, RuntimeError, ClientError) as exc:
            return None, str(exc)

    def _contradicted(self, gateway: str | None, now: float) -> Decision | None:
        """The gateway's own fresh report of installed CHILD_SAs, against the alarm."""
        if gateway is None or self.reports is None:
            return None
        try:
            report = self.reports.report(gateway)
        except ClientError:
            return None  # unreadable: RestartTunnel's own check still guards the tunnel
        return gateway_contradicts(report, now, self.readiness_max_age)

    def _restart(
        self,
        alarm: AlarmView,
        alarm_time: str,
        state: HealState,
        now: float,
        out: HealOutcome,
        gateway: str | None,
        problem: str,
    ) -> bool:
        attempt = Attempt(
            id=uuid.uuid4().hex,
            at=now,
            alarm=alarm.name,
            alarm_time=alarm_time or _iso(now),
            gateway=gateway or "",
        )
        kept = state.recent(now, self.policy.window_seconds)
        claimed = replace(state, attempts=(*kept, attempt))
        if not self.store.save(claimed, expected_version=state.version):
            return False  # someone else claimed first: decide again on the fresh record
        version = state.version + 1
        started = time.monotonic()
        if gateway is None:
            result = CommandResult("", DOCUMENT, "Error", stderr=problem)
        else:
            try:
                result = self.commands.run(
                    gateway,
                    DOCUMENT,
                    {"TunnelName": alarm.tunnel, "WaitSeconds": str(self.restart_wait_seconds)},
                )
            except (CommandError, RuntimeError) as exc:
                result = CommandResult(gateway, DOCUMENT, "Error", stderr=str(exc))
        seconds = round(time.monotonic() - started, 3)
        detail = _excerpt(result.stdout if result.ok else (result.stderr or result.stdout))
        skipped = result.ok and restart_skipped(result.stdout)
        attempt = replace(
            attempt, status=result.status, seconds=seconds, detail=detail, skipped=skipped
        )
        self._finish(claimed, version, attempt)
        out.gateway, out.status, out.seconds = attempt.gateway, result.status, seconds
        if skipped:
            out.reason = (
                "RestartTunnel left the tunnel alone: charon says every CHILD_SA is INSTALLED "
                "and receiving (skipped: healthy); not counted against the cap"
            )
            self.telemetry.count("RestartSkippedHealthy")
            return True
        self.telemetry.count("Restarts")
        if not result.ok:
            self.telemetry.count("RestartFailures")
        return True

    def _finish(self, claimed: HealState, version: int, attempt: Attempt) -> None:
        """Replace the claimed attempt with its result (re-reading if the record moved on)."""
        state = claimed
        for _ in range(3):
            attempts = tuple(attempt if a.id == attempt.id else a for a in state.attempts)
            if attempt.id not in {a.id for a in state.attempts}:
                attempts = (*attempts, attempt)
            if self.store.save(replace(state, attempts=attempts), expected_version=version):
                return
            state = self.store.load(claimed.tunnel)
            version = state.version

    def _page(self, alarm: AlarmView, state: HealState, now: float, out: HealOutcome) -> bool:
        if not self.store.save(replace(state, paged_at=now), expected_version=state.version):
            return False
        message = page_message(alarm.tunnel, alarm.name, state, now, self.policy)
        try:
            out.page_id = self.pager.page(
                f"tunnelnat: tunnel {alarm.tunnel} will not heal", message
            )
        except Exception:
            # Undo the mark so the next trigger pages again, then let the failure show.
            self.store.save(state, expected_version=state.version + 1)
            raise
        self.telemetry.count("Pages")
        return True
