"""The lab's AWS, served by moto: a VPC whose instances match the namespaces, the table, the PSK.

Clients here talk to moto's server on loopback only (the endpoint is always passed explicitly),
so a mistake can never reach real AWS.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import boto3

from lab import constants as c
from lab.constants import ENROLMENT_TAG, GATEWAY_GROUP, GATEWAY_TAGS, WEB_TEMPLATE, Instance


@dataclass
class LabAws:
    endpoint: str
    clients: dict[str, Any] = field(default_factory=dict)
    vpc_id: str = ""
    subnet_id: str = ""
    private_subnet_id: str = ""  # the private subnet: behind the VPC router, its own route table
    private_route_table_id: str = ""  # explicitly associated with the private subnet
    main_route_table_id: str = ""  # the VPC's main table (the gateway's subnet uses it)
    gateway_id: str = ""
    eni_id: str = ""  # the gateway's dedicated ENI holding G
    eni_mac: str = ""  # its MAC address: the lab gives the gateway's ENI link this one
    image_id: str = ""
    queue_url: str = ""
    queue_arn: str = ""
    dlq_url: str = ""
    instance_ids: dict[str, str] = field(default_factory=dict)  # lab name -> instance id

    def client(self, service: str) -> Any:
        if service not in self.clients:
            self.clients[service] = boto3.session.Session().client(
                service,
                region_name=c.REGION,
                endpoint_url=self.endpoint,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
            )
        return self.clients[service]

    # -- seeding -------------------------------------------------------------------------------
    def seed(self, instances: list[Instance], private_instances: list[Instance], psk: str) -> None:
        """The lab's AWS before anything runs: the VPC with its subnets, the gateway, G's ENI, the
        instances (their IDs set on them), the table, the PSK's secret, the controller's queues
        and function. The web group comes from lab.autoscaling.create_group, after."""
        ec2 = self.client("ec2")
        self.vpc_id = ec2.create_vpc(CidrBlock=c.VPC_CIDR)["Vpc"]["VpcId"]
        self.subnet_id = ec2.create_subnet(VpcId=self.vpc_id, CidrBlock=c.SUBNET_CIDR)["Subnet"][
            "SubnetId"
        ]
        self._seed_private_subnet()
        image = self.image_id = ec2.describe_images()["Images"][0]["ImageId"]
        self.gateway_id = self._run_instance(image, c.GW_PRIMARY, "gateway", GATEWAY_TAGS)
        # The gateway forwards packets that are not its own (the seed forgets this).
        ec2.modify_instance_attribute(InstanceId=self.gateway_id, SourceDestCheck={"Value": False})
        self._seed_fixed_eni()
        for inst in instances:
            inst.instance_id = self._run_instance(image, inst.private_ip, inst.name, {})
            self.instance_ids[inst.name] = inst.instance_id
        for inst in private_instances:
            inst.instance_id = self._run_instance(
                image, inst.private_ip, inst.name, {}, subnet_id=self.private_subnet_id
            )
            self.instance_ids[inst.name] = inst.instance_id
        self.client("dynamodb").create_table(
            TableName=c.TABLE,
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
        self.client("secretsmanager").create_secret(Name=c.PSK_SECRET, SecretString=psk)
        self._seed_queues()
        self._seed_controller_function()

    def _seed_private_subnet(self) -> None:
        """The private subnet with its own route table (explicitly associated, as real private
        subnets have): only ``local`` in it until the controller adds the partner's networks.
        The gateway's subnet keeps the VPC's main table."""
        ec2 = self.client("ec2")
        self.private_subnet_id = ec2.create_subnet(VpcId=self.vpc_id, CidrBlock=c.PRIVATE_CIDR)[
            "Subnet"
        ]["SubnetId"]
        tables = ec2.describe_route_tables(
            Filters=[
                {"Name": "vpc-id", "Values": [self.vpc_id]},
                {"Name": "association.main", "Values": ["true"]},
            ]
        )["RouteTables"]
        self.main_route_table_id = tables[0]["RouteTableId"]
        self.private_route_table_id = ec2.create_route_table(
            VpcId=self.vpc_id,
            TagSpecifications=[
                {
                    "ResourceType": "route-table",
                    "Tags": [
                        {"Key": "Name", "Value": "private"},
                        # The network owner opts the table in (the controller writes only to
                        # tables tagged tunnelnat:routes=<deployment>, issue 21).
                        {"Key": "tunnelnat:routes", "Value": c.DEPLOYMENT},
                    ],
                }
            ],
        )["RouteTable"]["RouteTableId"]
        ec2.associate_route_table(
            RouteTableId=self.private_route_table_id, SubnetId=self.private_subnet_id
        )

    def routes(self, route_table_id: str) -> dict[str, str]:
        """A route table's routes in EC2: destination -> target (``local``, an ENI, ...)."""
        reply = self.client("ec2").describe_route_tables(RouteTableIds=[route_table_id])
        found = {}
        for route in reply["RouteTables"][0].get("Routes", []):
            keys = ("NetworkInterfaceId", "GatewayId", "NatGatewayId")
            target = next((route[k] for k in keys if k in route), "?")
            found[route.get("DestinationCidrBlock", "")] = target
        return found

    def run_appliance(self, ip: str) -> dict[str, str]:
        """Another team's appliance in the private subnet, as EC2 sees it (no lab machine):
        source/dest check off, so a route to its ENI forwards there (lab.vpc_router)."""
        ec2 = self.client("ec2")
        instance_id = self._run_instance(
            self.image_id, ip, "appliance", {}, subnet_id=self.private_subnet_id
        )
        ec2.modify_instance_attribute(InstanceId=instance_id, SourceDestCheck={"Value": False})
        raw = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        eni_id = raw["NetworkInterfaces"][0]["NetworkInterfaceId"]
        # The instance's attribute is its primary ENI's on AWS; moto keeps them apart.
        ec2.modify_network_interface_attribute(
            NetworkInterfaceId=eni_id, SourceDestCheck={"Value": False}
        )
        return {"instance_id": instance_id, "eni_id": eni_id}

    def add_gateway(self, ip: str) -> str:
        """A second gateway instance (the pair's standby), launched and tagged as the first."""
        instance_id = self._run_instance(self.image_id, ip, "gateway", GATEWAY_TAGS)
        self.client("ec2").modify_instance_attribute(
            InstanceId=instance_id, SourceDestCheck={"Value": False}
        )
        return instance_id

    def seed_pair(self, heartbeat_key: str, gateway_ids: list[str]) -> None:
        """What the stack adds for a pair: the heartbeat key's secret (only the gateways' role
        may read it) and the gateways' Auto Scaling group with its termination lifecycle hook
        (stacks/gateway.py). The lab's gateways are launched by the lab, then attached to the
        group (AttachInstances also tags them aws:autoscaling:groupName, as a launch does)."""
        self.client("secretsmanager").create_secret(
            Name=c.PAIR_KEY_SECRET, SecretString=heartbeat_key
        )
        asg = self.client("autoscaling")
        # The web group's template (lab.autoscaling.create_group made it at seed time).
        asg.create_auto_scaling_group(
            AutoScalingGroupName=GATEWAY_GROUP,
            LaunchTemplate={"LaunchTemplateName": WEB_TEMPLATE, "Version": "$Latest"},
            MinSize=0,
            MaxSize=4,  # two, and two more while a rolling update replaces them
            DesiredCapacity=0,
            VPCZoneIdentifier=self.subnet_id,
        )
        # HeartbeatTimeout as the stack's hook; CONTINUE: a termination is never held for ever.
        asg.put_lifecycle_hook(
            LifecycleHookName=c.GATEWAY_TERMINATE_HOOK,
            AutoScalingGroupName=GATEWAY_GROUP,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=300,  # stacks/gateway.py TERMINATING_HOOK_TIMEOUT
            DefaultResult="CONTINUE",
        )
        self.join_gateway_group(gateway_ids)

    def join_gateway_group(self, instance_ids: list[str]) -> None:
        self.client("autoscaling").attach_instances(
            AutoScalingGroupName=GATEWAY_GROUP, InstanceIds=instance_ids
        )

    def leave_gateway_group(self, instance_id: str) -> None:
        self.client("autoscaling").detach_instances(
            AutoScalingGroupName=GATEWAY_GROUP,
            InstanceIds=[instance_id],
            ShouldDecrementDesiredCapacity=True,
        )

    def _seed_fixed_eni(self) -> None:
        """G on its own ENI, standalone as the stack creates it: the gateway's boot program
        attaches it (at device index 1) and configures G on the link with its MAC."""
        ec2 = self.client("ec2")
        eni = ec2.create_network_interface(
            SubnetId=self.subnet_id,
            PrivateIpAddress=c.GW_ENI,
            Description=f"tunnelnat {c.DEPLOYMENT} fixed ENI (G)",
        )["NetworkInterface"]
        self.eni_id = eni["NetworkInterfaceId"]
        self.eni_mac = eni["MacAddress"].lower()
        # Each interface has its own switch; packets forwarded through G arrive on this one.
        ec2.modify_network_interface_attribute(
            NetworkInterfaceId=self.eni_id, SourceDestCheck={"Value": False}
        )

    def _seed_controller_function(self) -> None:
        """The controller Lambda as the stack deploys it (named ``<deployment>-controller``), so
        ``tunnelnat doctor`` reads the configuration the lab's controller really runs with. It is
        never invoked through moto (that needs Docker): the lab calls the handler in-process."""
        role = self.client("iam").create_role(
            RoleName=f"{c.DEPLOYMENT}-controller",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "lambda.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]["Arn"]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            # A placeholder: the code that runs is the repository's, in the lab's process.
            archive.writestr("index.py", "def handler(event, context):\n    return None\n")
        self.client("lambda").create_function(
            FunctionName=f"{c.DEPLOYMENT}-controller",
            Runtime="python3.13",
            Role=role,
            Handler="tunnelnat.handlers.controller.handler",
            Code={"ZipFile": buffer.getvalue()},
            Environment={
                "Variables": {
                    "TUNNELNAT_CONFIG": json.dumps(controller_config()),
                    "TUNNELNAT_TABLE_NAME": c.TABLE,
                    "TUNNELNAT_DEPLOYMENT": c.DEPLOYMENT,
                    # Route-table mode, as the stack sets it (the ENI holding G, our VPC).
                    "TUNNELNAT_VPC_ID": self.vpc_id,
                    "TUNNELNAT_GATEWAY_ENI_ID": self.eni_id,
                }
            },
        )

    def _seed_queues(self) -> None:
        """The controller's queue and dead-letter queue, named as the stack names them."""
        sqs = self.client("sqs")
        self.dlq_url = sqs.create_queue(QueueName=f"{c.DEPLOYMENT}-events-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=self.dlq_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        # The stack's redrive (queue_max_receive_count); a shorter visibility timeout than the
        # stack's, so a batch the lab's handler never answered comes back within a story.
        redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "12"})
        self.queue_url = sqs.create_queue(
            QueueName=f"{c.DEPLOYMENT}-events",
            Attributes={"VisibilityTimeout": "60", "RedrivePolicy": redrive},
        )["QueueUrl"]
        self.queue_arn = sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]

    def _run_instance(
        self, image: str, ip: str, name: str, tags: dict[str, str], *, subnet_id: str = ""
    ) -> str:
        all_tags = [{"Key": "Name", "Value": name}] + [
            {"Key": k, "Value": v} for k, v in tags.items()
        ]
        reply = self.client("ec2").run_instances(
            ImageId=image,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet_id or self.subnet_id,
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

    def meta_item(self, name: str) -> dict[str, Any] | None:
        """The table's ``meta/<name>`` item as DynamoDB returns it (None: not written yet)."""
        reply = self.client("dynamodb").get_item(
            TableName=c.TABLE,
            Key={"pk": {"S": "meta"}, "sk": {"S": name}},
            ConsistentRead=True,
        )
        return reply.get("Item")

    def mappings(self) -> dict[str, str]:
        """private -> public, as the controller stored them (what the gateway renders)."""
        reply = self.client("dynamodb").query(
            TableName=c.TABLE,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": "mapping"}},
            ConsistentRead=True,
        )
        return {i["private_ip"]["S"]: i["public_ip"]["S"] for i in reply["Items"]}


def tag_change_event(
    instance_id: str, changed: dict[str, str], tags: dict[str, str], *, event_id: str = "lab-1"
) -> dict[str, Any]:
    """An EventBridge "Tag Change on Resource" event for an EC2 instance, as AWS sends it."""
    arn = f"arn:aws:ec2:{c.REGION}:123456789012:instance/{instance_id}"
    return {
        "version": "0",
        "id": event_id,
        "detail-type": "Tag Change on Resource",
        "source": "aws.tag",
        "account": "123456789012",
        "time": "2026-11-24T12:00:00Z",
        "region": c.REGION,
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
        "partner_endpoint": c.PARTNER_ENDPOINT,
        "partner_networks": [c.PARTNER_NET],
        "nat_mode": "dedicated",
        "address_pool": list(c.POOL),
        "enrolment_tag_key": ENROLMENT_TAG[0],
        "enrolment_tag_value": ENROLMENT_TAG[1],
        "gateway_private_ip": c.GW_ENI,
        "gateway_subnet_cidr": c.SUBNET_CIDR,
    }


def controller_environ(aws_env: dict[str, str], aws: LabAws) -> dict[str, str]:
    """The controller's environment in the lab: ``aws_env`` (moto's endpoint and credentials)
    and the stack's variables for ``aws``'s resources."""
    return {
        **aws_env,
        "TUNNELNAT_CONFIG": json.dumps(controller_config()),
        "TUNNELNAT_TABLE_NAME": c.TABLE,
        "TUNNELNAT_DEPLOYMENT": c.DEPLOYMENT,
        "AWS_REGION": c.REGION,
        # Route-table mode: instances outside the gateway's subnet get a route to G's ENI in
        # their subnet's route table (no command on them).
        "TUNNELNAT_VPC_ID": aws.vpc_id,
        "TUNNELNAT_GATEWAY_ENI_ID": aws.eni_id,
        "TUNNELNAT_GATEWAY_GROUP": GATEWAY_GROUP,
    }
