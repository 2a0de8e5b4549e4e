"""The gateway pair as AWS records it (issue 15; /work/notes/PAIR.md, docs/operations.md).

- EC2 is the truth about roles: the **active** gateway is the instance G's ENI is attached to;
  every other running gateway of the deployment is a **standby**. There is no role tag.
- The pair agents' own records in the controller's table: ``gateway/<instance-id>`` (each agent's
  readiness, written every ~30 s) and ``meta/pair`` (the active, the last failover, a count).

Two small readers, one per service: ``EniHolder`` (EC2) and ``PairRecords`` (DynamoDB). The
healer asks ``EniHolder`` where to send RestartTunnel; ``tunnelnat status``/``doctor`` read both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address
from typing import Any

READINESS_PK = "gateway"
META_PK, PAIR_SK = "meta", "pair"
ROLE_TAG = "tunnelnat:role"
DEPLOYMENT_TAG = "tunnelnat:deployment"
# Attachment states in which the ENI (and G with it) belongs to the instance.
HELD = ("attaching", "attached")


class GatewayNotHeld(RuntimeError):
    """Nobody of this deployment holds G's ENI (detached mid-failover, or held by a stranger)."""


# -- EC2: who holds G's ENI ------------------------------------------------------------------------


@dataclass(frozen=True)
class EniView:
    eni_id: str
    instance_id: str | None  # the holder, when attaching or attached
    status: str  # the attachment's status, or "detached" (the ENI is available)
    attach_time: float | None


class EniHolder:
    """G's ENI and its holder. Given ``eni_id`` (the stack's), the ENI is read by ID; given only
    G, it is the interface in the VPC (when known) carrying G as a private address."""

    def __init__(
        self,
        ec2_client: Any,
        *,
        eni_id: str | None = None,
        gateway_ip: IPv4Address | str | None = None,
        vpc_id: str | None = None,
    ) -> None:
        if eni_id is None and gateway_ip is None:
            raise ValueError("EniHolder needs G's ENI ID or G")
        self._ec2 = ec2_client
        self._eni_id = eni_id
        self._gateway_ip = str(gateway_ip) if gateway_ip is not None else None
        self._vpc_id = vpc_id

    def eni(self) -> EniView | None:
        if self._eni_id is not None:
            reply = self._ec2.describe_network_interfaces(NetworkInterfaceIds=[self._eni_id])
        else:
            filters = [{"Name": "addresses.private-ip-address", "Values": [self._gateway_ip]}]
            if self._vpc_id:
                filters.append({"Name": "vpc-id", "Values": [self._vpc_id]})
            reply = self._ec2.describe_network_interfaces(Filters=filters)
        interfaces = reply.get("NetworkInterfaces", [])
        if not interfaces:
            return None
        raw = interfaces[0]
        attachment = raw.get("Attachment") or {}
        status = attachment.get("Status") or "detached"
        attached = attachment.get("AttachTime")
        return EniView(
            eni_id=raw["NetworkInterfaceId"],
            instance_id=attachment.get("InstanceId") if status in HELD else None,
            status=status,
            attach_time=attached.timestamp() if isinstance(attached, datetime) else None,
        )

    def holder(self) -> str | None:
        view = self.eni()
        return view.instance_id if view else None

    def find_gateway(self, deployment: str) -> str:
        """The active gateway: the instance holding G's ENI, if it is a running gateway of
        ``deployment`` (the healer's GatewayLocator). A standby never qualifies: it does not
        hold the ENI, and a command sent there would restart a tunnel it must not bring up."""
        view = self.eni()
        if view is None:
            raise GatewayNotHeld(f"G's ENI {self._eni_id or self._gateway_ip} not found")
        if view.instance_id is None:
            raise GatewayNotHeld(
                f"G's ENI {view.eni_id} is {view.status}, attached to no gateway "
                "(a failover in progress?): nothing to restart"
            )
        reply = self._ec2.describe_instances(InstanceIds=[view.instance_id])
        raw = next((i for r in reply.get("Reservations", []) for i in r.get("Instances", [])), None)
        tags = {t.get("Key"): t.get("Value") for t in (raw or {}).get("Tags", [])}
        state = (raw or {}).get("State", {}).get("Name")
        if tags.get(ROLE_TAG) != "gateway" or tags.get(DEPLOYMENT_TAG) != deployment:
            raise GatewayNotHeld(
                f"G's ENI {view.eni_id} is attached to {view.instance_id}, which is not a "
                f"gateway of {deployment}: refusing to send it anything"
            )
        if state != "running":
            raise GatewayNotHeld(
                f"G's ENI {view.eni_id} is attached to {view.instance_id}, which is {state}"
            )
        return view.instance_id


# -- DynamoDB: the agents' records ----------------------------------------------------------------


@dataclass(frozen=True)
class Software:
    """The gateway software the agent runs (its ``software`` map, issue 22): the package's
    version and SHA-256, and whether the agent found it to be the deployed one (None: unknown)."""

    version: str | None
    sha256: str | None
    deployed_sha256: str | None = None
    deployed: bool | None = None


@dataclass(frozen=True)
class Readiness:
    """One agent's ``gateway/<instance-id>`` item (fields the agent did not write are None)."""

    instance_id: str
    role: str | None
    applied_generation: int | None
    sas: int | None
    tunnel_loaded: bool | None
    peer_heard_at: float | None
    updated_at: float | None
    software: Software | None = None  # None: an agent older than the gateway package


@dataclass(frozen=True)
class Failover:
    from_instance: str | None
    to_instance: str | None
    at: float | None
    detected_seconds: float | None
    switch_seconds: float | None
    reason: str | None


@dataclass(frozen=True)
class PairRecord:
    """``meta/pair``: the active the agents last recorded, and the last failover."""

    active: str | None
    active_since: float | None
    failovers: int
    last_failover: Failover | None


class PairRecords:
    def __init__(self, dynamodb_client: Any, table_name: str) -> None:
        self._ddb = dynamodb_client
        self._table = table_name

    def readiness(self) -> dict[str, Readiness]:
        items: list[dict] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": READINESS_PK}},
            "ConsistentRead": True,
        }
        while True:
            reply = self._ddb.query(**kwargs)
            items += reply.get("Items", [])
            if "LastEvaluatedKey" not in reply:
                break
            kwargs["ExclusiveStartKey"] = reply["LastEvaluatedKey"]
        return {r.instance_id: r for r in map(readiness_of, items)}

    def record(self) -> PairRecord | None:
        reply = self._ddb.get_item(
            TableName=self._table,
            Key={"pk": {"S": META_PK}, "sk": {"S": PAIR_SK}},
            ConsistentRead=True,
        )
        item = reply.get("Item")
        return pair_record_of(item) if item else None


def readiness_of(item: Mapping[str, Any]) -> Readiness:
    return Readiness(
        instance_id=_text(item.get("sk")) or "",
        role=_text(item.get("role")),
        applied_generation=_int(item.get("applied_generation")),
        sas=_int(item.get("sas")),
        tunnel_loaded=_bool(item.get("tunnel_loaded")),
        peer_heard_at=_time(item.get("peer_heard_at")),
        updated_at=_time(item.get("updated_at")),
        software=software_of(item.get("software")),
    )


def software_of(value: Mapping[str, Any] | None) -> Software | None:
    fields = (value or {}).get("M")
    if not isinstance(fields, Mapping):
        return None
    return Software(
        version=_text(fields.get("version")),
        sha256=_text(fields.get("sha256")),
        deployed_sha256=_text(fields.get("deployed_sha256")),
        deployed=_bool(fields.get("deployed")),
    )


def pair_record_of(item: Mapping[str, Any]) -> PairRecord:
    last = item.get("last_failover", {}).get("M")
    return PairRecord(
        active=_text(item.get("active")),
        active_since=_time(item.get("active_since")),
        failovers=_int(item.get("failovers")) or 0,
        last_failover=Failover(
            from_instance=_text(last.get("from")),
            to_instance=_text(last.get("to")),
            at=_time(last.get("at")),
            detected_seconds=_float(last.get("detected_seconds")),
            switch_seconds=_float(last.get("switch_seconds")),
            reason=_text(last.get("reason")),
        )
        if last
        else None,
    )


# The agent writes plain DynamoDB attributes; numbers may come as N or S, times as epoch seconds
# or ISO 8601: read either rather than guess which one a given agent version wrote.
def _text(value: Mapping[str, Any] | None) -> str | None:
    if not value or value.get("NULL"):
        return None
    if "S" in value:
        return str(value["S"])
    if "N" in value:
        return str(value["N"])
    return None


def _float(value: Mapping[str, Any] | None) -> float | None:
    text = _text(value)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _int(value: Mapping[str, Any] | None) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _bool(value: Mapping[str, Any] | None) -> bool | None:
    if not value:
        return None
    if "BOOL" in value:
        return bool(value["BOOL"])
    number = _float(value)
    return bool(number) if number is not None else None


def _time(value: Mapping[str, Any] | None) -> float | None:
    number = _float(value)
    if number is not None:
        return number
    text = _text(value)
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def standbys(running_gateways: Iterable[str], active: str | None) -> list[str]:
    """Every running gateway that does not hold the ENI, in ID order."""
    return sorted(g for g in running_gateways if g != active)
