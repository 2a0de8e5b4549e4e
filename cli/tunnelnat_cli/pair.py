"""The gateway pair for ``status`` and ``doctor`` (issue 15; docs/operations.md, Gateway pair).

The active is the running gateway G's ENI is attached to (EC2 decides, not the agents); the
others are standbys. Their readiness comes from the pair agents' ``gateway/<instance-id>``
items, the last failover from ``meta/pair`` (adapters/pair.py reads both).

Pair mode is recognised by what only the pair agents leave behind: ``meta/pair`` (the active's
agent writes it at start) or a readiness item. Two running gateways without either are a single
gateway and a stale one, as before the pair (doctor's ``gateway`` finding).

The gateway software (issue 22): the stack names the deployed package in the SSM parameter
``/tunnelnat/<deployment>/gateway-software``; each pair agent reports the package it runs in its
readiness item. A single gateway has no agent to report it: its version is unknown here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tunnelnat.adapters.pair import PairRecord, PairRecords, Readiness
from tunnelnat_cli.aws import error_code
from tunnelnat_cli.fleet import Instance

# The agents write their readiness every ~30 s (check_seconds): three missed writes is an agent
# that is not running (or cannot reach DynamoDB).
READINESS_STALE_SECONDS = 90
# The standby hears the active every 0.5 s; its item says when it last did (written every ~30 s,
# so up to that old when written, plus the item's own age).
HEARTBEAT_STALE_SECONDS = 90
# The stack's parameter naming the deployed gateway software (stacks/gateway_software.py).
SOFTWARE_PARAMETER = "/tunnelnat/{deployment}/gateway-software"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StandbyView:
    instance_id: str
    readiness: Readiness | None

    def age(self, now: float) -> float | None:
        updated = self.readiness.updated_at if self.readiness else None
        return None if updated is None else max(0.0, now - updated)

    def stale(self, now: float) -> bool:
        age = self.age(now)
        return age is None or age > READINESS_STALE_SECONDS

    def behind(self, desired_generation: int) -> bool | None:
        applied = self.readiness.applied_generation if self.readiness else None
        return None if applied is None else applied < desired_generation

    def heard(self, now: float) -> bool | None:
        if self.readiness is None:
            return None
        heard_at = self.readiness.peer_heard_at
        return heard_at is not None and now - heard_at <= HEARTBEAT_STALE_SECONDS


@dataclass(frozen=True)
class PairState:
    active: str | None
    eni_id: str | None
    standbys: list[StandbyView]
    readiness: dict[str, Readiness]
    record: PairRecord | None


def eni_holder(
    ec2: Any, gateways: list[Instance], gateway_ip: IPv4Address | None
) -> tuple[str | None, str | None]:
    """(holder, ENI ID): the running gateway G's ENI is attached to, among ``gateways``. The
    ENI is the secondary interface (device index above 0) of a gateway, carrying G when G is
    known; an ENI on anything else is not looked at."""
    if not gateways:
        return None, None
    ids = [g.instance_id for g in gateways]
    reply = ec2.describe_network_interfaces(
        Filters=[{"Name": "attachment.instance-id", "Values": ids}]
    )
    for raw in reply.get("NetworkInterfaces", []):
        attachment = raw.get("Attachment") or {}
        if attachment.get("DeviceIndex", 0) == 0 or attachment.get("InstanceId") not in ids:
            continue
        addresses = {a.get("PrivateIpAddress") for a in raw.get("PrivateIpAddresses", [])}
        addresses.add(raw.get("PrivateIpAddress"))
        if gateway_ip is not None and str(gateway_ip) not in addresses:
            continue
        if attachment.get("Status") in ("attaching", "attached"):
            return attachment["InstanceId"], raw.get("NetworkInterfaceId")
    return None, None


def pair_state(
    ec2: Any,
    dynamodb: Any,
    table: str,
    gateways: list[Instance],
    gateway_ip: IPv4Address | None,
) -> PairState | None:
    """The pair as AWS records it, or None for a single gateway."""
    records = PairRecords(dynamodb, table)
    record = records.record()
    readiness = records.readiness()
    if record is None and not readiness:
        return None
    active, eni_id = eni_holder(ec2, gateways, gateway_ip)
    running = sorted(g.instance_id for g in gateways)
    standbys = [
        StandbyView(instance_id, readiness.get(instance_id))
        for instance_id in running
        if instance_id != active
    ]
    return PairState(active, eni_id, standbys, readiness, record)


# -- the gateway software ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployedSoftware:
    """The package the stack deployed, or why it is unknown (``problem``)."""

    parameter: str
    version: str | None = None
    sha256: str | None = None
    problem: str | None = None


def deployed_software(ssm: Any, deployment: str) -> DeployedSoftware:
    """GetParameter on the stack's parameter; never raises (status shows what it can)."""
    name = SOFTWARE_PARAMETER.format(deployment=deployment)
    try:
        value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as exc:
        code = error_code(exc)
        if code == "ParameterNotFound":
            why = f"{name} does not exist: a stack deployed before the gateway package (issue 22)?"
        else:
            why = f"GetParameter {name} failed ({code})"
        return DeployedSoftware(name, problem=why)
    except BotoCoreError as exc:
        return DeployedSoftware(name, problem=f"GetParameter {name} failed ({exc})")
    try:
        data = json.loads(value)
        sha256 = data["sha256"]
    except (ValueError, TypeError, KeyError):
        sha256 = None
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        return DeployedSoftware(name, problem=f"{name} is not the gateway software's JSON")
    version = data.get("version")
    return DeployedSoftware(name, version if isinstance(version, str) else None, sha256)


@dataclass(frozen=True)
class GatewaySoftware:
    """What one gateway runs, as its pair agent last reported it (None: nobody reports it)."""

    instance_id: str
    version: str | None
    sha256: str | None
    reported: bool  # its pair agent's item carries a ``software`` map
    reported_at: float | None

    def deployed(self, deployed: DeployedSoftware) -> bool | None:
        if self.sha256 is None or deployed.sha256 is None:
            return None
        return self.sha256 == deployed.sha256


def gateway_software(gateways: list[Instance], pair: PairState | None) -> list[GatewaySoftware]:
    """Each running gateway's software, from its pair agent's readiness item."""
    found = []
    for gw in gateways:
        ready = pair.readiness.get(gw.instance_id) if pair else None
        soft = ready.software if ready else None
        found.append(
            GatewaySoftware(
                gw.instance_id,
                soft.version if soft else None,
                soft.sha256 if soft else None,
                soft is not None,
                ready.updated_at if ready else None,
            )
        )
    return found


def short(sha256: str | None) -> str:
    return sha256[:12] if sha256 else "?"
