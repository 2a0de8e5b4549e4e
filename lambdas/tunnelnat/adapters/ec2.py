"""EC2: what an instance looks like now, and where the gateway is."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.config import parse_ipv4
from tunnelnat.core.enrolment import GATEWAY_ROLE_TAG, STATUS_TAG, ObservedInstance

DEPLOYMENT_TAG = "tunnelnat:deployment"
DESCRIBE_CHUNK = 1000  # DescribeInstances' limit on InstanceIds
_INSTANCE_IDS = re.compile(r"i-[0-9a-f]{8,17}")


class GatewayNotFound(RuntimeError):
    """No running gateway instance carries the deployment's tags (being replaced, or not up)."""


class Ec2Instances:
    def __init__(self, ec2_client: Any) -> None:
        self._ec2 = ec2_client

    def describe_many(self, instance_ids: Iterable[str]) -> dict[str, ObservedInstance]:
        """Every instance EC2 still knows among ``instance_ids``, in calls of up to 1,000 IDs."""
        wanted = list(dict.fromkeys(instance_ids))
        found: dict[str, ObservedInstance] = {}
        for start in range(0, len(wanted), DESCRIBE_CHUNK):
            chunk = wanted[start : start + DESCRIBE_CHUNK]
            while chunk:
                try:
                    pages = self._ec2.get_paginator("describe_instances").paginate(
                        InstanceIds=chunk
                    )
                    for page in pages:
                        for reservation in page.get("Reservations", []):
                            for raw in reservation.get("Instances", []):
                                found[raw["InstanceId"]] = observed(raw)
                    break
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                        raise
                    # One unknown ID fails the whole call: drop the ones named and ask again.
                    missing = set(_INSTANCE_IDS.findall(exc.response["Error"].get("Message", "")))
                    if not missing & set(chunk):
                        raise
                    chunk = [i for i in chunk if i not in missing]
        return found

    def tagged(self, tag_key: str) -> dict[str, ObservedInstance]:
        """Every not-yet-terminated instance carrying ``tag_key`` (any value)."""
        found: dict[str, ObservedInstance] = {}
        pages = self._ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": "tag-key", "Values": [tag_key]},
                {
                    "Name": "instance-state-name",
                    "Values": ["pending", "running", "stopping", "stopped", "shutting-down"],
                },
            ],
            PaginationConfig={"PageSize": 1000},
        )
        for page in pages:
            for reservation in page.get("Reservations", []):
                for raw in reservation.get("Instances", []):
                    found[raw["InstanceId"]] = observed(raw)
        return found

    def set_status_tag(self, instance: ObservedInstance, status: str) -> None:
        """Show the enrolment status in the console; skipped when the tag already says so."""
        if instance.tags.get(STATUS_TAG) == status:
            return
        try:
            self._ec2.create_tags(
                Resources=[instance.instance_id], Tags=[{"Key": STATUS_TAG, "Value": status}]
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("InvalidInstanceID.NotFound",):
                raise

    def set_status_tags(self, instances: Iterable[ObservedInstance], status: str) -> None:
        """``set_status_tag`` for many instances: one CreateTags per 1,000 whose tag differs."""
        ids = [i.instance_id for i in instances if i.tags.get(STATUS_TAG) != status]
        for start in range(0, len(ids), DESCRIBE_CHUNK):
            chunk = ids[start : start + DESCRIBE_CHUNK]
            try:
                self._ec2.create_tags(Resources=chunk, Tags=[{"Key": STATUS_TAG, "Value": status}])
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("InvalidInstanceID.NotFound",):
                    raise
                # One of them is gone (terminated meanwhile): tag the others one by one.
                for instance_id in chunk:
                    try:
                        self._ec2.create_tags(
                            Resources=[instance_id], Tags=[{"Key": STATUS_TAG, "Value": status}]
                        )
                    except ClientError as one:
                        if one.response["Error"]["Code"] != "InvalidInstanceID.NotFound":
                            raise

    def find_gateway(self, deployment: str) -> str:
        reply = self._ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{GATEWAY_ROLE_TAG}", "Values": ["gateway"]},
                {"Name": f"tag:{DEPLOYMENT_TAG}", "Values": [deployment]},
                {"Name": "instance-state-name", "Values": ["running"]},
            ]
        )
        ids = sorted(
            i["InstanceId"] for r in reply.get("Reservations", []) for i in r.get("Instances", [])
        )
        if not ids:
            raise GatewayNotFound(f"no running gateway tagged {DEPLOYMENT_TAG}={deployment}")
        # An ASG replacement can briefly show two; either pulls the same table.
        return ids[-1]


def observed(raw: dict) -> ObservedInstance:
    return ObservedInstance(
        instance_id=raw["InstanceId"],
        state=raw.get("State", {}).get("Name", "unknown"),
        private_ip=parse_ipv4(raw.get("PrivateIpAddress")),
        public_ip=parse_ipv4(raw.get("PublicIpAddress")),
        subnet_id=raw.get("SubnetId"),
        tags={t["Key"]: t["Value"] for t in raw.get("Tags", [])},
    )
