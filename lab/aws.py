"""The lab's AWS, served by moto: a VPC whose instances match the namespaces, the table, the PSK.

Clients here talk to moto's server on loopback only (the endpoint is always passed explicitly),
so a mistake can never reach real AWS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import boto3

from lab import topology as topo

GATEWAY_TAGS = {"tunnelnat:role": "gateway", "tunnelnat:deployment": topo.DEPLOYMENT}
ENROLMENT_TAG = ("tunnelnat", "enabled")


@dataclass
class LabAws:
    endpoint: str
    clients: dict[str, Any] = field(default_factory=dict)
    vpc_id: str = ""
    subnet_id: str = ""
    gateway_id: str = ""
    instance_ids: dict[str, str] = field(default_factory=dict)  # lab name -> instance id

    def client(self, service: str) -> Any:
        if service not in self.clients:
            self.clients[service] = boto3.session.Session().client(
                service,
                region_name=topo.REGION,
                endpoint_url=self.endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
            )
        return self.clients[service]

    # -- seeding -------------------------------------------------------------------------------
    def seed(self, lab: topo.Lab) -> None:
        ec2 = self.client("ec2")
        self.vpc_id = ec2.create_vpc(CidrBlock=topo.VPC_CIDR)["Vpc"]["VpcId"]
        self.subnet_id = ec2.create_subnet(VpcId=self.vpc_id, CidrBlock=topo.SUBNET_CIDR)["Subnet"][
            "SubnetId"
        ]
        image = ec2.describe_images()["Images"][0]["ImageId"]
        self.gateway_id = self._run_instance(image, topo.GW_PRIMARY, "gateway", GATEWAY_TAGS)
        # The gateway forwards packets that are not its own (the seed forgets this).
        ec2.modify_instance_attribute(InstanceId=self.gateway_id, SourceDestCheck={"Value": False})
        for inst in lab.instances:
            inst.instance_id = self._run_instance(image, inst.private_ip, inst.name, {})
            self.instance_ids[inst.name] = inst.instance_id
        self.client("dynamodb").create_table(
            TableName=topo.TABLE,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        self.client("secretsmanager").create_secret(Name=topo.PSK_SECRET, SecretString=lab.psk)

    def _run_instance(self, image: str, ip: str, name: str, tags: dict[str, str]) -> str:
        all_tags = [{"Key": "Name", "Value": name}] + [
            {"Key": k, "Value": v} for k, v in tags.items()
        ]
        reply = self.client("ec2").run_instances(
            ImageId=image,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            SubnetId=self.subnet_id,
            PrivateIpAddress=ip,
            TagSpecifications=[{"ResourceType": "instance", "Tags": all_tags}],
        )
        return reply["Instances"][0]["InstanceId"]

    # -- operator actions ----------------------------------------------------------------------
    def tag(
        self, instance_id: str, key: str = ENROLMENT_TAG[0], value: str = ENROLMENT_TAG[1]
    ) -> None:
        self.client("ec2").create_tags(Resources=[instance_id], Tags=[{"Key": key, "Value": value}])

    def untag(self, instance_id: str, key: str = ENROLMENT_TAG[0]) -> None:
        self.client("ec2").delete_tags(Resources=[instance_id], Tags=[{"Key": key}])

    def tags(self, instance_id: str) -> dict[str, str]:
        reply = self.client("ec2").describe_tags(
            Filters=[{"Name": "resource-id", "Values": [instance_id]}]
        )
        return {t["Key"]: t["Value"] for t in reply["Tags"]}

    def mappings(self) -> dict[str, str]:
        """private -> public, as the controller stored them (what the gateway renders)."""
        reply = self.client("dynamodb").query(
            TableName=topo.TABLE,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": "mapping"}},
            ConsistentRead=True,
        )
        return {i["private_ip"]["S"]: i["public_ip"]["S"] for i in reply["Items"]}


def tag_change_event(
    instance_id: str, changed: dict[str, str], tags: dict[str, str], *, event_id: str = "lab-1"
) -> dict[str, Any]:
    """An EventBridge "Tag Change on Resource" event for an EC2 instance, as AWS sends it."""
    arn = f"arn:aws:ec2:{topo.REGION}:123456789012:instance/{instance_id}"
    return {
        "version": "0",
        "id": event_id,
        "detail-type": "Tag Change on Resource",
        "source": "aws.tag",
        "account": "123456789012",
        "time": "2026-11-24T12:00:00Z",
        "region": topo.REGION,
        "resources": [arn],
        "detail": {
            "changed-tag-keys": list(changed),
            "service": "ec2",
            "resource-type": "instance",
            "version": 1,
            "tags": tags,
        },
    }


def controller_config() -> dict[str, Any]:
    """TUNNELNAT_CONFIG for the lab's controller."""
    return {
        "partner_endpoint": topo.PARTNER_ENDPOINT,
        "partner_networks": [topo.PARTNER_NET],
        "nat_mode": "dedicated",
        "address_pool": list(topo.POOL),
        "enrolment_tag_key": ENROLMENT_TAG[0],
        "enrolment_tag_value": ENROLMENT_TAG[1],
        "gateway_private_ip": topo.GW_ENI,
        "gateway_subnet_cidr": topo.SUBNET_CIDR,
    }


def controller_environ(lab: topo.Lab) -> dict[str, str]:
    return {
        **lab.aws_env(),
        "TUNNELNAT_CONFIG": json.dumps(controller_config()),
        "TUNNELNAT_TABLE_NAME": topo.TABLE,
        "TUNNELNAT_DEPLOYMENT": topo.DEPLOYMENT,
        "AWS_REGION": topo.REGION,
    }
