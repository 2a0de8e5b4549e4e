"""The CLI against moto's server on loopback, with the real controller handler reacting to what
the CLI does (through the CLI's ``after_change`` seam), and commands through the lambdas suite's
``FakeFleet`` (moto runs no SSM command).

The server is this suite's own; nothing here changes ``os.environ`` beyond one test
(``monkeypatch``), so the suite runs beside tests/lambdas in one process or under xdist.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber

from tests.conftest import VALID_CONFIG
from tests.lambdas.conftest import FakeFleet
from tests.lambdas.events import Context, sqs_batch, tag_change
from tools.gateway_package import build as build_package
from tools.moto_server import SerialMotoServer
from tunnelnat_cli import Runtime, main
from tunnelnat_cli.context import Change

REGION = "us-east-1"
TABLE = "tunnelnat-cli"
DEPLOYMENT = "test"
G = "10.10.1.5"
BASE = ["--table", TABLE, "--deployment", DEPLOYMENT]
# As the stack names them (stacks/monitoring.py): tunnelnat-<deployment>-...
ALARMS = (f"tunnelnat-{DEPLOYMENT}-DeadLetters", f"tunnelnat-{DEPLOYMENT}-TunnelUp-partner")
# The gateway software the fixture's stack deployed (its SSM parameter's sha256 and version).
SOFTWARE = {"sha256": "5" * 64, "version": "0.22.0+5555"}


@pytest.fixture(scope="session")
def shared_session():
    """One boto3 session for every CLI call that does not test credential resolution: loading
    the EC2 model costs ~1 s per new session."""
    return boto3.session.Session(
        region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


@pytest.fixture(scope="session")
def moto_server():
    server = SerialMotoServer()
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_server, monkeypatch, tmp_path):
    """Dummy credentials and moto's endpoint for this test only; no shared config files."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"))
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "tunnelnat")
    # What the controller's handler reads (the CLI itself is always given --table/--deployment).
    monkeypatch.setenv("TUNNELNAT_CONFIG", json.dumps(VALID_CONFIG))
    monkeypatch.setenv("TUNNELNAT_TABLE_NAME", TABLE)
    monkeypatch.setenv("TUNNELNAT_DEPLOYMENT", DEPLOYMENT)
    return moto_server


class FakeClock:
    """Time for ``--wait``: sleeping advances it, so a 300 s timeout takes no time."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


@dataclass(frozen=True)
class GatewayPackage:
    """The gateway software built from this tree and installed in a throwaway LIB: what a
    gateway document run in place finds (``binding`` as synthesis binds it, ``env`` pointing
    package_check.sh and the installer at that LIB)."""

    binding: dict[str, str]
    env: dict[str, str]


@functools.cache
def gateway_package() -> GatewayPackage:
    built = build_package()
    lib = Path(tempfile.mkdtemp(prefix="tn-cli-lib-"))
    atexit.register(shutil.rmtree, lib, True)
    (lib / "gateway").mkdir()
    shutil.copy(built.path, lib / "gateway" / f"{built.sha256}.pyz")
    binding = {"sha256": built.sha256, "bucket": "cdk-assets", "key": "k.pyz", "region": REGION}
    return GatewayPackage(binding, {"TUNNELNAT_LIB": str(lib)})


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@dataclass
class Deployment:
    """A healthy deployment in moto: gateway with its fixed ENI, table, queues, alarms, metric,
    the controller Lambda's configuration, and the controller handler wired to a FakeFleet."""

    url: str
    ec2: object
    dynamodb: object
    sqs: object
    cloudwatch: object
    subnet_id: str = ""
    other_subnet_id: str = ""
    vpc_id: str = ""
    gateway_id: str = ""
    eni_id: str = ""
    queue_url: str = ""
    dlq_url: str = ""
    software: dict = field(default_factory=dict)  # the deployed package: sha256, version
    fleet: FakeFleet | None = None
    controller: object = None
    react: bool = True  # run the controller after the CLI's change (the deployed event path)
    changes: list[Change] = field(default_factory=list)
    clients: dict = field(default_factory=dict)  # per-service client overrides for the CLI
    clock: FakeClock = field(default_factory=FakeClock)
    session: object = None

    def primary_eni(self, instance_id: str) -> str:
        """The instance's device-index-0 interface (the one the boot turns the check off on)."""
        reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        interfaces = reply["Reservations"][0]["Instances"][0]["NetworkInterfaces"]
        (primary,) = [n for n in interfaces if n["Attachment"]["DeviceIndex"] == 0]
        return primary["NetworkInterfaceId"]

    def source_dest_check(self, instance_id: str, on: bool) -> None:
        """As the boot sets it (issue 20): on the primary ENI, never the instance's attribute,
        which EC2 refuses once G's ENI is attached."""
        self.ec2.modify_network_interface_attribute(
            NetworkInterfaceId=self.primary_eni(instance_id), SourceDestCheck={"Value": on}
        )

    def launch(
        self,
        private_ip: str,
        *,
        name: str | None = None,
        subnet: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        all_tags = dict(tags or {})
        if name:
            all_tags["Name"] = name
        spec: dict = {"SubnetId": subnet or self.subnet_id, "PrivateIpAddress": private_ip}
        if all_tags:
            spec["TagSpecifications"] = [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()],
                }
            ]
        reply = self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, **spec)
        return reply["Instances"][0]["InstanceId"]

    # -- the controller, as the deployed event path would run it ------------------------------
    def handle(self, instance_id: str) -> dict:
        from tunnelnat.handlers.controller import handler

        tags = self.tags(instance_id)
        return handler(tag_change(instance_id, tags), Context())

    def tags(self, instance_id: str) -> dict[str, str]:
        reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        raw = reply["Reservations"][0]["Instances"][0]
        return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}

    def consume_queue(self) -> int:
        """Deliver what the CLI queued to the controller's handler, as the event source mapping
        would (an SQS batch per receive)."""
        from tunnelnat.handlers.controller import handler

        handled = 0
        while True:
            reply = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
            messages = reply.get("Messages", [])
            if not messages:
                return handled
            handler(sqs_batch(*[json.loads(m["Body"]) for m in messages]), Context())
            for message in messages:
                self.sqs.delete_message(
                    QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
            handled += len(messages)

    def after_change(self, aws, change: Change) -> None:
        self.changes.append(change)
        if not self.react:
            return
        if change.action == "reconcile":
            self.consume_queue()
        else:
            for instance_id in change.instance_ids:
                self.handle(instance_id)

    # -- reading and breaking -------------------------------------------------------------------
    def items(self, pk: str) -> dict[str, dict]:
        reply = self.dynamodb.query(
            TableName=TABLE,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
        )
        return {i["sk"]["S"]: i for i in reply["Items"]}

    def put_metric(
        self,
        tunnel: str,
        value: float,
        *,
        age: timedelta = timedelta(seconds=30),
        gateway: str | None = None,
        deployment: str | None = None,
    ) -> None:
        """A TunnelUp datapoint: the gateway's series, or the deployment's with ``deployment``."""
        if deployment is not None:
            dims = [
                {"Name": "Deployment", "Value": deployment},
                {"Name": "Tunnel", "Value": tunnel},
            ]
        else:
            dims = [
                {"Name": "Tunnel", "Value": tunnel},
                {"Name": "Gateway", "Value": gateway or self.gateway_id},
            ]
        self.cloudwatch.put_metric_data(
            Namespace=f"tunnelnat/{DEPLOYMENT}",
            MetricData=[
                {
                    "MetricName": "TunnelUp",
                    "Dimensions": dims,
                    "Value": value,
                    "Timestamp": datetime.now(UTC) - age,
                }
            ],
        )

    def ssm_online(self, online: dict[str, str] | None = None) -> Stubber:
        """An SSM client (moto lacks DescribeInstanceInformation) answering with ``online``
        (instance -> PingStatus); every instance the CLI asks about is Online by default.
        Doctor's first SSM call reads the deployed gateway software (the fixture's)."""
        ssm = self.session.client("ssm", endpoint_url=self.url)
        stubber = Stubber(ssm)
        statuses = online
        if statuses is None:
            statuses = {i: "Online" for i in [self.gateway_id, *self.items("mapping")]}
        name = f"/tunnelnat/{DEPLOYMENT}/gateway-software"
        stubber.add_response(
            "get_parameter",
            {"Parameter": {"Name": name, "Type": "String", "Value": json.dumps(self.software)}},
            {"Name": name},
        )
        stubber.add_response(
            "describe_instance_information",
            {
                "InstanceInformationList": [
                    {"InstanceId": i, "PingStatus": s} for i, s in statuses.items()
                ]
            },
            {"Filters": ANY},
        )
        stubber.activate()
        self.clients["ssm"] = ssm
        return stubber

    def run(
        self,
        *argv: str,
        base: bool = True,
        react: bool | None = None,
        fresh: bool = False,
        commands=None,
    ) -> Result:
        """The CLI as an operator runs it; ``fresh`` resolves credentials like a new process;
        ``commands`` stands in for Run Command on the gateway (ShowTunnels)."""
        if react is not None:
            self.react = react
        out, err = io.StringIO(), io.StringIO()
        runtime = Runtime(
            out=out,
            err=err,
            clients=dict(self.clients),
            after_change=self.after_change,
            sleep=self.clock.sleep,
            monotonic=self.clock.monotonic,
            session=None if fresh else self.session,
            commands=commands,
        )
        code = main([*argv, *(BASE if base else [])], runtime)
        return Result(code, out.getvalue(), err.getvalue())


def _lambda_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("handler.py", "def handler(event, context):\n    return None\n")
    return buf.getvalue()


@pytest.fixture
def dep(aws_env, shared_session):
    url = aws_env
    client = lambda name: shared_session.client(name, endpoint_url=url)  # noqa: E731
    d = Deployment(url, client("ec2"), client("dynamodb"), client("sqs"), client("cloudwatch"))
    d.session = shared_session
    d.dynamodb.create_table(
        TableName=TABLE,
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
    ec2 = d.ec2
    d.vpc_id = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    d.subnet_id = ec2.create_subnet(VpcId=d.vpc_id, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
    d.other_subnet_id = ec2.create_subnet(VpcId=d.vpc_id, CidrBlock="10.10.2.0/24")["Subnet"][
        "SubnetId"
    ]
    d.gateway_id = d.launch(
        "10.10.1.10",
        name="gateway",
        # The labels, and the tag Auto Scaling puts on what it launches: what makes it the
        # gateway (issue 21). AWS lets no user set an aws: key; moto lets the fixture play
        # Auto Scaling here.
        tags={
            "tunnelnat:role": "gateway",
            "tunnelnat:deployment": DEPLOYMENT,
            "aws:autoscaling:groupName": f"{DEPLOYMENT}-gateway",
        },
    )
    d.source_dest_check(d.gateway_id, False)
    d.eni_id = ec2.create_network_interface(SubnetId=d.subnet_id, PrivateIpAddress=G)[
        "NetworkInterface"
    ]["NetworkInterfaceId"]
    ec2.attach_network_interface(
        NetworkInterfaceId=d.eni_id, InstanceId=d.gateway_id, DeviceIndex=1
    )
    ec2.modify_network_interface_attribute(
        NetworkInterfaceId=d.eni_id, SourceDestCheck={"Value": False}
    )
    d.dlq_url = d.sqs.create_queue(QueueName=f"{DEPLOYMENT}-events-dlq")["QueueUrl"]
    dlq_arn = d.sqs.get_queue_attributes(QueueUrl=d.dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    d.queue_url = d.sqs.create_queue(
        QueueName=f"{DEPLOYMENT}-events",
        Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"})
        },
    )["QueueUrl"]
    for alarm in ALARMS:
        d.cloudwatch.put_metric_alarm(
            AlarmName=alarm,
            Namespace=f"tunnelnat/{DEPLOYMENT}",
            MetricName="TunnelUp",
            Statistic="Minimum",
            Period=60,
            EvaluationPeriods=1,
            Threshold=1,
            ComparisonOperator="LessThanThreshold",
        )
        d.cloudwatch.set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="healthy")
    d.put_metric("partner", 1)
    # The deployed gateway software, as the stack names it (issue 22).
    d.software = SOFTWARE
    client("ssm").put_parameter(
        Name=f"/tunnelnat/{DEPLOYMENT}/gateway-software",
        Type="String",
        Value=json.dumps(
            SOFTWARE
            | {"bucket": "cdk-assets", "key": f"{SOFTWARE['sha256']}.pyz", "region": REGION}
        ),
    )
    iam = client("iam")
    role = iam.create_role(
        RoleName="tunnelnat-controller",
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
    client("lambda").create_function(
        FunctionName=f"{DEPLOYMENT}-controller",
        Runtime="python3.12",
        Role=role,
        Handler="handler.handler",
        Code={"ZipFile": _lambda_zip()},
        Environment={
            "Variables": {
                "TUNNELNAT_CONFIG": json.dumps(VALID_CONFIG),
                "TUNNELNAT_TABLE_NAME": TABLE,
            }
        },
    )

    from tunnelnat.adapters.ec2 import Ec2Instances
    from tunnelnat.adapters.store import EnrolmentStore
    from tunnelnat.controller import Controller
    from tunnelnat.core.config import TunnelnatConfig
    from tunnelnat.handlers import controller as handler_module

    d.fleet = FakeFleet(d.dynamodb, gateway_id=d.gateway_id)
    d.controller = Controller(
        TunnelnatConfig.from_mapping(VALID_CONFIG),
        store=EnrolmentStore(d.dynamodb, TABLE),
        instances=Ec2Instances(ec2),
        commands=d.fleet,
        deployment=DEPLOYMENT,
        region=REGION,
    )
    handler_module.use_controller(d.controller)
    yield d
    handler_module.use_controller(None)
