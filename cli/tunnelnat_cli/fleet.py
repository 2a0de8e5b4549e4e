"""EC2 and deployment look-ups the commands share: instances by ID or tag, the gateway, and the
deployment's configuration (for G, the tag and the gateway's subnet)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.config import ConfigError, TunnelnatConfig, is_instance_id
from tunnelnat.core.enrolment import GROUP_TAG
from tunnelnat_cli.aws import CliError, error_code
from tunnelnat_cli.table import TableReader

LIVE_STATES = ("pending", "running", "stopping", "stopped")
FILTER_VALUES_MAX = 200  # EC2 accepts at most 200 values in one filter


@dataclass(frozen=True)
class Instance:
    instance_id: str
    state: str
    name: str | None
    private_ip: str | None
    subnet_id: str | None
    tags: dict[str, str]
    source_dest_check: bool | None
    raw: dict = field(repr=False, compare=False, default_factory=dict)


def _instance(raw: dict) -> Instance:
    tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
    return Instance(
        instance_id=raw["InstanceId"],
        state=raw.get("State", {}).get("Name", "unknown"),
        name=tags.get("Name"),
        private_ip=raw.get("PrivateIpAddress"),
        subnet_id=raw.get("SubnetId"),
        tags=tags,
        source_dest_check=raw.get("SourceDestCheck"),
        raw=raw,
    )


def check_instance_id(value: str) -> str:
    if not is_instance_id(value):
        raise CliError(
            f"not an EC2 instance ID: {value[:40]!r} (expected i- and 8 or 17 hex digits, "
            "e.g. i-0123456789abcdef0)"
        )
    return value


def describe_instances(ec2: Any, filters: list[dict]) -> list[Instance]:
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            found.extend(_instance(raw) for raw in reservation.get("Instances", []))
    return found


def instances_by_id(ec2: Any, ids: list[str]) -> dict[str, Instance]:
    """The instances EC2 still knows among ``ids`` (a filter, so a vanished ID is no error)."""
    found: dict[str, Instance] = {}
    unique = sorted(set(ids))
    for start in range(0, len(unique), FILTER_VALUES_MAX):
        chunk = unique[start : start + FILTER_VALUES_MAX]
        for inst in describe_instances(ec2, [{"Name": "instance-id", "Values": chunk}]):
            found[inst.instance_id] = inst
    return found


def require_instance(ec2: Any, instance_id: str, region: str) -> Instance:
    """The instance, or a clear error when it does not exist (in this region)."""
    check_instance_id(instance_id)
    try:
        reply = ec2.describe_instances(InstanceIds=[instance_id])
    except ClientError as exc:
        if error_code(exc) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            raise CliError(
                f"instance {instance_id} not found in region {region}: check the ID, "
                "--region and --profile"
            ) from None
        raise
    for reservation in reply.get("Reservations", []):
        for raw in reservation.get("Instances", []):
            if raw.get("InstanceId") == instance_id:
                return _instance(raw)
    raise CliError(f"instance {instance_id} not found in region {region}")


def tagged_instances(ec2: Any, key: str, value: str) -> list[Instance]:
    return describe_instances(
        ec2,
        [
            {"Name": f"tag:{key}", "Values": [value]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        ],
    )


def gateway_group(deployment: str) -> str:
    """The gateway's Auto Scaling group, as the stack names it (stacks/settings.py
    ``gateway_group_name``)."""
    return f"{deployment}-gateway"


def gateways(ec2: Any, deployment: str) -> list[Instance]:
    """Running gateways of the deployment, newest ID last (as the controller picks them): the
    members of its Auto Scaling group, by the group's own tag (aws:autoscaling:groupName, which
    nobody but Auto Scaling can set), never by the tunnelnat:* labels anyone may copy (issue
    21: `doctor` names such lookalikes)."""
    found = describe_instances(
        ec2,
        [
            {"Name": f"tag:{GROUP_TAG}", "Values": [gateway_group(deployment)]},
            {"Name": "instance-state-name", "Values": ["running"]},
        ],
    )
    return sorted(found, key=lambda i: i.instance_id)


# -- the deployment's configuration -----------------------------------------------------------
@dataclass(frozen=True)
class DeploymentConfig:
    """What the CLI knows of the controller's configuration, and where it came from."""

    config: TunnelnatConfig | None
    source: str  # "lambda:<function>", "table:meta/config", or "none"
    problem: str | None = None  # why a source could not be used
    gateway_ip_override: IPv4Address | None = None

    @property
    def gateway_ip(self) -> IPv4Address | None:
        if self.gateway_ip_override is not None:
            return self.gateway_ip_override
        return self.config.gateway_private_ip if self.config else None


def load_config(
    lambda_client: Any,
    reader: TableReader,
    *,
    function_name: str,
    gateway_ip: IPv4Address | None = None,
) -> DeploymentConfig:
    """The controller's configuration: its Lambda's ``TUNNELNAT_CONFIG`` (the one the controller
    really runs with), else a ``meta/config`` item (``config``: the same JSON) if the table has
    one. ``gateway_ip`` (``--gateway-ip``) overrides G alone."""
    problems = []
    try:
        reply = lambda_client.get_function_configuration(FunctionName=function_name)
        raw = reply.get("Environment", {}).get("Variables", {}).get("TUNNELNAT_CONFIG")
        if raw:
            return DeploymentConfig(
                _parse(raw, f"lambda:{function_name}"),
                f"lambda:{function_name}",
                gateway_ip_override=gateway_ip,
            )
        problems.append(f"{function_name} has no TUNNELNAT_CONFIG")
    except ClientError as exc:
        problems.append(f"cannot read Lambda {function_name} ({error_code(exc)})")
    item = reader.get("meta", "config")
    if item and "S" in item.get("config", {}):
        return DeploymentConfig(
            _parse(item["config"]["S"], "table:meta/config"),
            "table:meta/config",
            gateway_ip_override=gateway_ip,
        )
    problems.append("no meta/config item in the table")
    return DeploymentConfig(None, "none", "; ".join(problems), gateway_ip_override=gateway_ip)


def _parse(raw: str, source: str) -> TunnelnatConfig:
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"the configuration in {source} is not JSON: {exc}") from None
    try:
        return TunnelnatConfig.from_mapping(values, source=source)
    except ConfigError as exc:
        raise CliError(" ".join(str(exc).split())) from None
