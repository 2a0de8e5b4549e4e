"""moto's server on loopback stands in for AWS; the handler talks to it over real HTTP.

moto's SSM reports every command as Success without running anything, so commands go through
``FakeFleet``: it keeps each instance's routes and the gateway's applied table in memory, and the
gateway's sync reads the real DynamoDB table with the real gateway program's reader.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from hypothesis import settings as hypothesis_settings

from tests.conftest import VALID_CONFIG
from tools.moto_server import SerialMotoServer
from tunnelnat.adapters.commands import AgentNotReady, CommandResult
from tunnelnat.core.config import DEPLOYMENT
from tunnelnat_gateway import nat_sync  # the gateway's own reader (pytest's pythonpath)

REPO = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
TABLE = "tunnelnat-test"

# The property tests at the edges (issue 14): at least 300 examples each in CI, the same ones on
# every run there (derandomized); a quick, random sample locally. A test that sets its own
# max_examples keeps it.
hypothesis_settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None)
hypothesis_settings.register_profile("dev", max_examples=30, deadline=None)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def moto_url():
    server = SerialMotoServer()
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update({**ENV, "AWS_ENDPOINT_URL": url})
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_ENDPOINT_URL": "",
    "POWERTOOLS_TRACE_DISABLED": "1",
    "POWERTOOLS_METRICS_NAMESPACE": "tunnelnat",
    "POWERTOOLS_SERVICE_NAME": "tunnelnat",
    "TUNNELNAT_TABLE_NAME": TABLE,
    "TUNNELNAT_DEPLOYMENT": "test",
    "TUNNELNAT_CONFIG": json.dumps(VALID_CONFIG),
}


@dataclass
class FakeFleet:
    """The command port, with the effects the real documents have (proved in tests/lab)."""

    dynamodb: object
    gateway_id: str = ""
    routes: dict[str, set[str]] = field(default_factory=dict)
    applied: object = None  # the NatTable the fake gateway last applied
    calls: list[tuple[str, str]] = field(default_factory=list)
    not_ready: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)
    # instance -> how many more commands fail with "agent not registered"
    not_ready_for: dict[str, int] = field(default_factory=dict)
    crash_on: set[str] = field(default_factory=set)  # documents that "kill the Lambda" once
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The instances' route state as the documents keep it: one file per deployment
    # ((instance, deployment) -> networks), shared by the fleets of two deployments.
    host: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def run(self, instance_id, document, parameters):
        with self.lock:
            return self._run(instance_id, document, parameters)

    def _run(self, instance_id, document, parameters):
        self.calls.append((instance_id, document))
        if document in self.crash_on:
            self.crash_on.discard(document)
            raise SystemExit("the Lambda runtime was killed here")
        if instance_id in self.not_ready:
            raise AgentNotReady(f"{instance_id}: SSM agent not registered")
        if self.not_ready_for.get(instance_id, 0) > 0:
            self.not_ready_for[instance_id] -= 1
            raise AgentNotReady(f"{instance_id}: SSM agent not registered")
        if document in self.failing:
            return CommandResult(instance_id, document, "Failed", stderr="boom")
        if document in ("AddHostRoute", "RemoveHostRoute"):
            # The documents' allowedPattern: the deployment names the state file.
            assert DEPLOYMENT.fullmatch(parameters["Deployment"]), parameters
            state = (instance_id, parameters["Deployment"])
        if document == "AddHostRoute":
            self.routes[instance_id] = set(parameters["Destinations"].split(","))
            self.host[state] = set(self.routes[instance_id])
            return CommandResult(instance_id, document, "Success", stdout="{}")
        if document == "RemoveHostRoute":
            self.routes.pop(instance_id, None)
            self.host.pop(state, None)  # only this deployment's file and routes
            return CommandResult(instance_id, document, "Success", stdout="{}")
        if document == "SyncNatTable":
            assert instance_id == self.gateway_id, "sync sent to something not the gateway"
            table = nat_sync.read_desired(self.dynamodb, parameters["TableName"], "dedicated")
            full = parameters.get("Full") == "true"
            action = "unchanged"  # the real program's words (no deltas here: whole tables)
            if self.applied is None or full or table.generation > self.applied.generation:
                self.applied, action = table, "full"
            report = {"applied_generation": self.applied.generation, "action": action}
            report.update(nat_sync.rejected_report(table))  # as the real program
            return CommandResult(instance_id, document, "Success", stdout=json.dumps(report))
        raise AssertionError(f"unexpected document {document}")

    def syncs(self) -> int:
        return sum(1 for _, doc in self.calls if doc == "SyncNatTable")

    def applied_pairs(self) -> set[tuple[str, str]]:
        if self.applied is None:
            return set()
        return {(str(m.private_ip), str(m.public_ip)) for m in self.applied.mappings}


@dataclass
class World:
    ec2: object
    dynamodb: object
    subnet_id: str
    gateway_id: str
    fleet: FakeFleet

    def launch(self, private_ip: str, *, tags: dict[str, str] | None = None) -> str:
        spec = {"SubnetId": self.subnet_id, "PrivateIpAddress": private_ip}
        if tags:
            spec["TagSpecifications"] = [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ]
        reply = self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, **spec)
        return reply["Instances"][0]["InstanceId"]

    def hold_g(self, instance_id: str) -> None:
        """Move G's ENI (created on first use) to ``instance_id``, as a replacement gateway's
        boot does: the gateway is the instance holding G, whatever else carries its tags."""
        if not getattr(self, "eni_id", None):
            eni = self.ec2.create_network_interface(
                SubnetId=self.subnet_id, PrivateIpAddress=VALID_CONFIG["gateway_private_ip"]
            )
            self.eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
        [interface] = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[self.eni_id])[
            "NetworkInterfaces"
        ]
        attachment = interface.get("Attachment") or {}
        if attachment.get("InstanceId") == instance_id:
            return
        if attachment.get("AttachmentId"):
            self.ec2.detach_network_interface(AttachmentId=attachment["AttachmentId"], Force=True)
        self.ec2.attach_network_interface(
            NetworkInterfaceId=self.eni_id, InstanceId=instance_id, DeviceIndex=1
        )

    def items(self, pk: str) -> dict[str, dict]:
        reply = self.dynamodb.query(
            TableName=TABLE,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
        )
        return {i["sk"]["S"]: i for i in reply["Items"]}

    def all_items(self) -> list[dict]:
        return self.dynamodb.scan(TableName=TABLE)["Items"]


def create_enrolment_table(dynamodb, name: str) -> None:
    """The controller's table as the stack defines its keys (pk, sk), on demand."""
    dynamodb.create_table(
        TableName=name,
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


@pytest.fixture
def world(moto_url, monkeypatch):
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"))
    ec2 = boto3.client("ec2", region_name=REGION)
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    create_enrolment_table(dynamodb, TABLE)
    vpc = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
    other = ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.2.0/24")["Subnet"]["SubnetId"]
    fleet = FakeFleet(dynamodb)
    w = World(ec2, dynamodb, subnet, "", fleet)
    w.other_subnet_id = other
    gateway = w.launch(
        "10.10.1.10", tags={"tunnelnat:role": "gateway", "tunnelnat:deployment": "test"}
    )
    w.gateway_id = fleet.gateway_id = gateway
    w.hold_g(gateway)
    w.vpc_id = vpc
    monkeypatch.setenv("TUNNELNAT_VPC_ID", vpc)

    from tunnelnat.handlers import controller as handler_module

    handler_module.use_controller(handler_module.build_controller(commands=fleet))
    yield w
    handler_module.use_controller(None)


@pytest.fixture
def queues(world):
    """The controller's queue and dead-letter queue in moto, the handler wired to them."""
    from tunnelnat.adapters.queue import EventQueue
    from tunnelnat.handlers import controller as handler_module

    sqs = boto3.client("sqs", region_name=REGION)
    dlq = sqs.create_queue(QueueName="tunnelnat-events-dlq")["QueueUrl"]
    main = sqs.create_queue(QueueName="tunnelnat-events")["QueueUrl"]
    handler_module.use_queue(EventQueue(sqs, dead_letter_url=dlq))
    yield sqs, main, dlq
    handler_module.use_queue(None)
