"""EC2: what an instance looks like now, and where the gateway is."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from tunnelnat.core.config import parse_ipv4
from tunnelnat.core.enrolment import GATEWAY_ROLE_TAG, ObservedInstance

DEPLOYMENT_TAG = "tunnelnat:deployment"


class GatewayNotFound(RuntimeError):
    """No running gateway instance carries the deployment's tags (being replaced, or not up)."""


class Ec2Instances:
    def __init__(self, ec2_client: Any) -> None:
        self._ec2 = ec2_client

    def describe(self, instance_id: str) -> ObservedInstance | None:
        """The instance's current state, or None when EC2 no longer knows it."""
        try:
            reply = self._ec2.describe_instances(InstanceIds=[instance_id])
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("InvalidInstanceID.NotFound", "InvalidInstanceID"):
                return None
            raise
        for reservation in reply.get("Reservations", []):
            for raw in reservation.get("Instances", []):
                if raw.get("InstanceId") == instance_id:
                    return observed(raw)
        return None

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
