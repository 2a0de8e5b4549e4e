"""The healer's Lambda handler against moto's server: CloudWatch alarms, DynamoDB, EC2, SNS->SQS.

moto never evaluates alarms; the tests set their state with ``set_alarm_state`` and deliver the
EventBridge event AWS would send. RestartTunnel goes through a fake command port (moto's SSM
would report Success without running anything); tests/lab runs the real document. The health
agent's TunnelEstablished is put into moto's CloudWatch as the agent would publish it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import boto3
import pytest

from tests.lambdas.conftest import REGION, TABLE
from tunnelnat.adapters.commands import CommandResult

ALARM = "tunnelnat-test-TunnelUp-partner"
ACCOUNT = "123456789012"
# The gateways' metrics: the deployment's own namespace (issue 21, 3).
NAMESPACE = "tunnelnat/test"
# The gateway group as the stack names it (<deployment>-gateway); moto's Auto Scaling tags what
# it launches aws:autoscaling:groupName, as AWS does.
GROUP = "test-gateway"


@dataclass
class Context:
    function_name: str = "tunnelnat-healer"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:tunnelnat-healer"
    aws_request_id: str = "test"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 300_000


@dataclass
class RestartPort:
    status: str = "Success"
    delay: float = 0.0
    calls: list = field(default_factory=list)

    def run(self, instance_id, document, parameters):
        self.calls.append((instance_id, document, dict(parameters)))
        time.sleep(self.delay)
        if self.status == "Success":
            out = json.dumps({"tunnel": parameters["TunnelName"], "up": True, "seconds": 0.2})
            return CommandResult(instance_id, document, "Success", stdout=out)
        return CommandResult(
            instance_id,
            document,
            self.status,
            stderr="RestartTunnel: tunnel partner did not come back",
        )


@dataclass
class Aws:
    cloudwatch: object
    dynamodb: object
    sqs: object
    queue_url: str
    gateway_id: str
    port: RestartPort
    module: object
    healer: object
    eni_id: str = ""

    def set_alarm(self, state: str) -> str:
        self.cloudwatch.set_alarm_state(AlarmName=ALARM, StateValue=state, StateReason="test")
        alarm = self.cloudwatch.describe_alarms(AlarmNames=[ALARM])["MetricAlarms"][0]
        stamp = alarm["StateUpdatedTimestamp"]
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}+0000"

    def event(self, state: str, at: str, previous: str = "OK", since: str | None = None) -> dict:
        return alarm_event(ALARM, state, at, previous, since or at)

    def invoke(self, event: dict) -> dict:
        return self.module.handler(event, Context(aws_request_id=str(time.time())))

    def pages(self) -> list[dict]:
        reply = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
        return [json.loads(json.loads(m["Body"])["Message"]) for m in reply.get("Messages", [])]

    def report_established(self, value: float, deployment: str = "test") -> None:
        """What the gateway's health agent publishes every run (gateway/tunnelnat_health.py)."""
        self.cloudwatch.put_metric_data(
            Namespace=f"tunnelnat/{deployment}",
            MetricData=[
                {
                    "MetricName": "TunnelEstablished",
                    "Dimensions": [
                        {"Name": "Deployment", "Value": deployment},
                        {"Name": "Tunnel", "Value": "partner"},
                    ],
                    "Value": value,
                    "Unit": "Count",
                }
            ],
        )

    def record(self) -> dict:
        key = {"pk": {"S": "healer"}, "sk": {"S": "partner"}}
        return self.dynamodb.get_item(TableName=TABLE, Key=key).get("Item", {})


def alarm_event(name: str, state: str, at: str, previous: str, since: str) -> dict:
    return {
        "version": "0",
        "id": f"evt-{name}-{state}-{at}",
        "detail-type": "CloudWatch Alarm State Change",
        "source": "aws.cloudwatch",
        "account": ACCOUNT,
        "time": "2026-11-24T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}"],
        "detail": {
            "alarmName": name,
            "state": {"value": state, "reason": "test", "timestamp": at},
            "previousState": {"value": previous, "reason": "test", "timestamp": since},
            "configuration": {
                "metrics": [
                    {
                        "id": "m1",
                        "metricStat": {
                            "metric": {
                                "namespace": NAMESPACE,
                                "name": "TunnelUp",
                                "dimensions": {"Deployment": "test", "Tunnel": "partner"},
                            },
                            "period": 60,
                            "stat": "Minimum",
                        },
                    }
                ]
            },
        },
    }


@pytest.fixture
def aws(moto_url, monkeypatch):
    yield from healer_world(moto_url, monkeypatch)


def healer_world(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    """The healer's rig on moto (a gateway, the alarm, the page topic): the ``aws`` fixture, and
    the pair's healer tests build on it."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"))
    ec2 = boto3.client("ec2", region_name=REGION)
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    dynamodb.create_table(
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
    vpc = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
    # The gateway: launched by its Auto Scaling group (labelled with the tunnelnat:* tags, which
    # nothing trusts), G's ENI attached at device index 1 as the pair agent attaches it.
    ec2.create_launch_template(
        LaunchTemplateName="tunnelnat-test-gateway",
        LaunchTemplateData={
            "ImageId": "ami-12345678",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": GATEWAY_TAGS}],
        },
    )
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=GROUP,
        LaunchTemplate={"LaunchTemplateName": "tunnelnat-test-gateway"},
        MinSize=0,
        MaxSize=3,
        DesiredCapacity=1,
        VPCZoneIdentifier=subnet,
    )
    (gateway,) = _members(ec2)
    eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.10.1.240")
    eni_id = eni["NetworkInterface"]["NetworkInterfaceId"]
    ec2.attach_network_interface(NetworkInterfaceId=eni_id, InstanceId=gateway, DeviceIndex=1)
    topic = sns.create_topic(Name="tunnelnat-page")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="pages")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    cloudwatch.put_metric_alarm(
        AlarmName=ALARM,
        Namespace=NAMESPACE,
        MetricName="TunnelUp",
        Dimensions=[
            {"Name": "Deployment", "Value": "test"},
            {"Name": "Tunnel", "Value": "partner"},
        ],
        Statistic="Minimum",
        Period=60,
        EvaluationPeriods=3,
        DatapointsToAlarm=2,
        Threshold=1,
        ComparisonOperator="LessThanThreshold",
        TreatMissingData="breaching",
    )
    monkeypatch.setenv("TUNNELNAT_PAGE_TOPIC_ARN", topic)
    monkeypatch.setenv("TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS", "60")
    monkeypatch.setenv("TUNNELNAT_HEALER_MAX_RESTARTS_PER_HOUR", "3")
    monkeypatch.setenv("TUNNELNAT_HEALER_ALARM_PREFIX", "tunnelnat-test-")
    # As the stack deploys it (Healer.serve_gateway's environment).
    monkeypatch.setenv("TUNNELNAT_GATEWAY_GROUP", GROUP)
    monkeypatch.setenv("TUNNELNAT_GATEWAY_ENI_ID", eni_id)
    monkeypatch.setenv("TUNNELNAT_VPC_ID", vpc)

    from tunnelnat.handlers import healer as module

    port = RestartPort()
    healer, persistence = module.build_healer(commands=port)
    module.use_healer(healer, persistence)
    rig = Aws(cloudwatch, dynamodb, sqs, queue_url, gateway, port, module, healer, eni_id)
    # The tunnel has been up since the gateway was configured (tests of the waiting state say
    # otherwise in their own series).
    rig.report_established(1.0)
    yield rig
    module.use_healer(None)


@pytest.fixture
def fresh(aws, moto_url):
    """``aws`` without any TunnelEstablished datapoint (moto has no DeleteMetricData): the
    same alarm and tunnel, watched by another deployment's healer and alarm."""
    aws.cloudwatch.put_metric_alarm(
        AlarmName="tunnelnat-fresh-TunnelUp-partner",
        Namespace="tunnelnat/fresh",
        MetricName="TunnelUp",
        Dimensions=[
            {"Name": "Deployment", "Value": "fresh"},
            {"Name": "Tunnel", "Value": "partner"},
        ],
        Statistic="Minimum",
        Period=60,
        EvaluationPeriods=3,
        DatapointsToAlarm=2,
        Threshold=1,
        ComparisonOperator="LessThanThreshold",
        TreatMissingData="breaching",
    )
    return aws


def test_alarm_restarts_the_tunnel_on_the_gateway(aws):
    at = aws.set_alarm("ALARM")
    out = aws.invoke(aws.event("ALARM", at))
    assert out["action"] == "restart" and out["status"] == "Success"
    assert aws.port.calls == [
        (aws.gateway_id, "RestartTunnel", {"TunnelName": "partner", "WaitSeconds": "30"})
    ]
    attempts = json.loads(aws.record()["attempts"]["S"])
    assert [(a["status"], a["alarm_time"], a["gateway"]) for a in attempts] == [
        ("Success", at, aws.gateway_id)
    ]


def test_already_ok_alarm_is_not_restarted(aws):
    at = aws.set_alarm("ALARM")
    aws.set_alarm("OK")  # recovered (strongSwan's DPD) before the event was handled
    out = aws.invoke(aws.event("ALARM", at))
    assert out["action"] == "skip-ok"
    assert aws.port.calls == []


def test_duplicate_events_restart_once(aws):
    at = aws.set_alarm("ALARM")
    event = aws.event("ALARM", at)
    first = aws.invoke(event)
    second = aws.invoke(event)
    assert len(aws.port.calls) == 1
    assert second == {**first, "duplicate": True}


def test_concurrent_duplicate_events_restart_once(aws):
    at = aws.set_alarm("ALARM")
    aws.port.delay = 0.5
    event = aws.event("ALARM", at)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(aws.invoke(event))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(aws.port.calls) == 1
    assert sorted(o["action"] for o in outs) == ["duplicate"] * 3 + ["restart"]


def test_concurrent_different_events_for_one_tunnel_restart_once(aws):
    # Two distinct state changes (say, a flap) handled at once: the record's claim decides.
    at = aws.set_alarm("ALARM")
    aws.port.delay = 0.5
    outs = []
    events = [aws.event("ALARM", at), aws.event("ALARM", at.replace("+0000", "1+0000"))]
    threads = [threading.Thread(target=lambda e=e: outs.append(aws.invoke(e))) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(aws.port.calls) == 1
    assert sorted(o["action"] for o in outs) == ["restart", "wait"]


def test_back_off_then_cap_then_page_with_the_attempts(aws):
    aws.port.status = "Failed"
    now = [time.time()]
    aws.healer.clock = lambda: now[0]
    at = aws.set_alarm("ALARM")
    assert aws.invoke(aws.event("ALARM", at))["action"] == "restart"
    # The alarm stays in ALARM: no new event. The scheduled sweep retries after the back-off.
    sweep = {
        "version": "0",
        "id": "sweep-1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT,
        "time": "2026-11-24T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/tunnelnat-healer-sweep"],
        "detail": {},
    }
    now[0] += 30
    (out,) = aws.invoke(sweep)["sweep"]
    assert out["action"] == "wait"
    now[0] += 30
    assert aws.invoke(sweep)["sweep"][0]["action"] == "restart"
    now[0] += 119
    assert aws.invoke(sweep)["sweep"][0]["action"] == "wait"
    now[0] += 1
    assert aws.invoke(sweep)["sweep"][0]["action"] == "restart"
    assert len(aws.port.calls) == 3
    assert aws.pages() == []
    now[0] += 240
    (out,) = aws.invoke(sweep)["sweep"]
    assert out["action"] == "page"
    (page,) = aws.pages()
    assert page["tunnel"] == "partner" and page["alarm"] == ALARM and page["cap"] == 3
    assert [a["status"] for a in page["attempts"]] == ["Failed"] * 3
    assert all(a["gateway"] == aws.gateway_id for a in page["attempts"])
    assert "did not come back" in page["attempts"][0]["detail"]
    # Capped: no more restarts, no second page within the hour.
    now[0] += 600
    assert aws.invoke(sweep)["sweep"][0]["action"] == "already-paged"
    assert len(aws.port.calls) == 3 and aws.pages() == []


def test_ok_event_records_time_to_recovery(aws, capsys):
    since = aws.set_alarm("ALARM")
    at = aws.set_alarm("OK")
    out = aws.invoke(aws.event("OK", at, previous="ALARM", since=since))
    assert out["action"] == "recovered" and out["tunnel"] == "partner"
    assert 0 <= out.get("seconds", 0.0) < 5
    assert "recovered_at" in aws.record()
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "_aws" in line]
    assert any("TimeToRecovery" in blob for blob in emf)


@pytest.mark.parametrize(
    "event",
    [
        {"hello": "world"},
        {**alarm_event(ALARM, "ALARM", "x", "OK", "x"), "source": "aws.ec2"},
        alarm_event("tunnelnat-test-unknown", "ALARM", "2026-11-24T12:00:00.000+0000", "OK", "x"),
    ],
)
def test_events_that_can_never_succeed_are_dropped(aws, event):
    out = aws.invoke(event)
    assert "rejected" in out and aws.port.calls == []


def test_alarm_on_another_metric_is_dropped(aws):
    aws.cloudwatch.put_metric_alarm(
        AlarmName="tunnelnat-test-cpu",
        Namespace="AWS/EC2",
        MetricName="CPUUtilization",
        Statistic="Average",
        Period=60,
        EvaluationPeriods=1,
        Threshold=90,
        ComparisonOperator="GreaterThanThreshold",
    )
    aws.cloudwatch.set_alarm_state(
        AlarmName="tunnelnat-test-cpu", StateValue="ALARM", StateReason="t"
    )
    out = aws.invoke(
        alarm_event("tunnelnat-test-cpu", "ALARM", "2026-11-24T12:00:00.000+0000", "OK", "x")
    )
    assert "rejected" in out and aws.port.calls == []


# -- no healing before the first report ----------------------------------------------------------


def _deployment_healer(aws, monkeypatch, deployment):
    monkeypatch.setenv("TUNNELNAT_DEPLOYMENT", deployment)
    monkeypatch.setenv("TUNNELNAT_HEALER_ALARM_PREFIX", f"tunnelnat-{deployment}-")
    healer, persistence = aws.module.build_healer(commands=aws.port)
    aws.module.use_healer(healer, persistence)
    return healer


def _alarm(aws, name, state):
    aws.cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")
    alarm = aws.cloudwatch.describe_alarms(AlarmNames=[name])["MetricAlarms"][0]
    stamp = alarm["StateUpdatedTimestamp"]
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}+0000"


SWEEP = {
    "version": "0",
    "id": "sweep-fresh",
    "detail-type": "Scheduled Event",
    "source": "aws.events",
    "account": ACCOUNT,
    "time": "2026-11-24T12:00:00Z",
    "region": REGION,
    "resources": [f"arn:aws:events:{REGION}:{ACCOUNT}:rule/tunnelnat-healer-sweep"],
    "detail": {},
}


def test_first_deploy_tunnel_never_up_is_waiting_no_restart_no_page(fresh, monkeypatch):
    # The agent reports the tunnel has not been up since ConfigureGateway (PSK not set yet).
    fresh.report_established(0.0, deployment="fresh")
    healer = _deployment_healer(fresh, monkeypatch, "fresh")
    now = [time.time()]
    healer.clock = lambda: now[0]
    name = "tunnelnat-fresh-TunnelUp-partner"
    at = _alarm(fresh, name, "ALARM")
    out = fresh.invoke(alarm_event(name, "ALARM", at, "OK", at))
    assert out["action"] == "waiting-for-partner" and "PSK" in out["reason"]
    for _ in range(6):  # an hour of sweeps, far past the cap of 3: nothing
        now[0] += 600
        (swept,) = fresh.invoke(SWEEP)["sweep"]
        assert swept["action"] == "waiting-for-partner"
    assert fresh.port.calls == [] and fresh.pages() == []
    key = {"pk": {"S": "healer"}, "sk": {"S": "partner"}}
    assert "Item" not in fresh.dynamodb.get_item(TableName=TABLE, Key=key)


def test_no_established_datapoint_at_all_is_no_report(fresh, monkeypatch):
    _deployment_healer(fresh, monkeypatch, "fresh")
    name = "tunnelnat-fresh-TunnelUp-partner"
    at = _alarm(fresh, name, "ALARM")
    out = fresh.invoke(alarm_event(name, "ALARM", at, "OK", at))
    assert out["action"] == "no-report" and fresh.port.calls == []


def test_once_established_a_down_tunnel_is_restarted(fresh, monkeypatch):
    fresh.report_established(0.0, deployment="fresh")
    fresh.report_established(1.0, deployment="fresh")  # the newest minute says: up since
    _deployment_healer(fresh, monkeypatch, "fresh")
    name = "tunnelnat-fresh-TunnelUp-partner"
    at = _alarm(fresh, name, "ALARM")
    assert fresh.invoke(alarm_event(name, "ALARM", at, "OK", at))["action"] == "restart"


# -- issue 14, finding 4: only this deployment's TunnelUp alarms ---------------------------------


def test_alarm_of_another_deployment_is_dropped_even_with_our_prefix(aws):
    # Routed to us and named like ours, but watching another deployment's TunnelUp.
    name = "tunnelnat-test-TunnelUp-prod"
    aws.cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace=NAMESPACE,
        MetricName="TunnelUp",
        Dimensions=[
            {"Name": "Deployment", "Value": "prod"},
            {"Name": "Tunnel", "Value": "partner"},
        ],
        Statistic="Minimum",
        Period=60,
        EvaluationPeriods=3,
        Threshold=1,
        ComparisonOperator="LessThanThreshold",
    )
    at = _alarm(aws, name, "ALARM")
    out = aws.invoke(alarm_event(name, "ALARM", at, "OK", at))
    assert "rejected" in out and "deployment 'prod'" in out["rejected"]
    assert aws.port.calls == []
    # The sweep lists it too (same prefix): still no restart.
    swept = {o["alarm"]: o for o in aws.invoke(SWEEP)["sweep"]}
    assert swept[name]["action"] == "invalid" and "deployment 'prod'" in swept[name]["reason"]
    assert aws.port.calls == []


def test_alarm_outside_our_prefix_is_dropped_even_on_our_metric(aws):
    name = "someone-else-TunnelUp-watch"  # any alarm routed to the healer
    aws.cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace=NAMESPACE,
        MetricName="TunnelUp",
        Dimensions=[
            {"Name": "Deployment", "Value": "test"},
            {"Name": "Tunnel", "Value": "partner"},
        ],
        Statistic="Minimum",
        Period=60,
        EvaluationPeriods=3,
        Threshold=1,
        ComparisonOperator="LessThanThreshold",
    )
    at = _alarm(aws, name, "ALARM")
    out = aws.invoke(alarm_event(name, "ALARM", at, "OK", at))
    assert "rejected" in out and "not one of this deployment's" in out["rejected"]
    assert aws.port.calls == []


@pytest.mark.parametrize(
    "ok, since",
    [
        ("2026-13-45T99:00:00.000+0000", "2026-11-24T12:00:00.000+0000"),
        ("2026-11-24T12:01:30.000+0000", "not-a-time-at-all"),
    ],
)
def test_malformed_state_timestamp_is_dropped_with_a_log_line(aws, caplog, ok, since):
    _alarm(aws, ALARM, "ALARM")
    _alarm(aws, ALARM, "OK")
    out = aws.invoke(aws.event("OK", ok, previous="ALARM", since=since))
    assert "rejected" in out and "malformed" in out["rejected"]
    dropped = [
        r for r in caplog.records if r.getMessage() == "dropping event that can never succeed"
    ]
    assert dropped and "malformed" in dropped[0].reason
    assert "recovered_at" not in aws.record()


# -- which instance is the gateway (issues 14, 21): G's ENI holder in the gateway group ----------


GATEWAY_TAGS = [
    {"Key": "tunnelnat:role", "Value": "gateway"},
    {"Key": "tunnelnat:deployment", "Value": "test"},
    {"Key": "tunnelnat:gateway", "Value": "test"},
]


def _members(ec2) -> list[str]:
    """The gateway group's running instances, by the tag Auto Scaling sets."""
    reply = ec2.describe_instances(
        Filters=[
            {"Name": "tag:aws:autoscaling:groupName", "Values": [GROUP]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return sorted(i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"])


def _serve_gateway(aws, monkeypatch, **env: str) -> None:
    """The healer rebuilt with ``env`` on top of the stack's environment."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    healer, persistence = aws.module.build_healer(commands=aws.port)
    aws.module.use_healer(healer, persistence)


def _launch_tagged(ec2, subnet: str) -> str:
    """An instance anyone could launch and tag like the gateway (not in the group)."""
    taken = {
        i.get("PrivateIpAddress")
        for r in ec2.describe_instances()["Reservations"]
        for i in r["Instances"]
        if i.get("SubnetId") == subnet
    }
    address = next(f"10.10.1.{n}" for n in range(60, 200) if f"10.10.1.{n}" not in taken)
    return ec2.run_instances(
        ImageId="ami-12345678",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        PrivateIpAddress=address,
        TagSpecifications=[{"ResourceType": "instance", "Tags": GATEWAY_TAGS}],
    )["Instances"][0]["InstanceId"]


def _launch_member(aws) -> str:
    """A second gateway of the group (the pair's standby), as Auto Scaling launches it."""
    ec2 = boto3.client("ec2", region_name=REGION)
    before = set(_members(ec2))
    boto3.client("autoscaling", region_name=REGION).set_desired_capacity(
        AutoScalingGroupName=GROUP, DesiredCapacity=len(before) + 1
    )
    (new,) = set(_members(ec2)) - before
    return new


def _move_eni(ec2, eni: str, instance_id: str) -> None:
    reply = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])
    attachment = reply["NetworkInterfaces"][0].get("Attachment") or {}
    if attachment.get("AttachmentId") and attachment.get("Status") in ("attaching", "attached"):
        ec2.detach_network_interface(AttachmentId=attachment["AttachmentId"])
    ec2.attach_network_interface(NetworkInterfaceId=eni, InstanceId=instance_id, DeviceIndex=1)


def test_an_impostor_tagged_like_the_gateway_holding_g_is_sent_nothing(aws):
    """Issue 21, 1/3: an instance tagged tunnelnat:role=gateway, tunnelnat:gateway=test and
    tunnelnat:deployment=test, even holding G's ENI, is not in the gateway group: no command."""
    ec2 = boto3.client("ec2", region_name=REGION)
    [raw] = ec2.describe_instances(InstanceIds=[aws.gateway_id])["Reservations"][0]["Instances"]
    impostor = _launch_tagged(ec2, raw["SubnetId"])
    _move_eni(ec2, aws.eni_id, impostor)
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["action"] == "restart" and out["status"] == "Error"
    assert aws.port.calls == []
    [attempt] = json.loads(aws.record()["attempts"]["S"])
    assert f"attached to {impostor}, which is not a gateway of test" in attempt["detail"]
    assert f"not in Auto Scaling group {GROUP}" in attempt["detail"]


def test_the_group_member_holding_g_is_restarted_not_the_tagged_one(aws):
    ec2 = boto3.client("ec2", region_name=REGION)
    [raw] = ec2.describe_instances(InstanceIds=[aws.gateway_id])["Reservations"][0]["Instances"]
    _launch_tagged(ec2, raw["SubnetId"])  # sorts wherever it sorts: never a candidate
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["status"] == "Success"
    assert [call[0] for call in aws.port.calls] == [aws.gateway_id]


def test_without_group_and_eni_the_healer_sends_nothing(aws, monkeypatch):
    monkeypatch.delenv("TUNNELNAT_GATEWAY_GROUP")
    _serve_gateway(aws, monkeypatch)
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["status"] == "Error" and aws.port.calls == []
    [attempt] = json.loads(aws.record()["attempts"]["S"])
    assert "rather than trust a tag" in attempt["detail"]


# -- issue 21, finding 3: a forged TunnelUp=0 against the gateway's own report -------------------


def _readiness(aws, instance_id: str, sas: int, age: float) -> None:
    """The pair agent's gateway/<id> item as Records.readiness writes it."""
    now = time.time()
    aws.dynamodb.put_item(
        TableName=TABLE,
        Item={
            "pk": {"S": "gateway"},
            "sk": {"S": instance_id},
            "role": {"S": "active"},
            "sas": {"N": str(sas)},
            "updated_at": {"N": f"{now - age:.3f}"},
            "expiration": {"N": str(int(now + 3600))},
        },
    )


def _forge_tunnel_down(aws, namespace: str = NAMESPACE) -> None:
    """What anyone with cloudwatch:PutMetricData on the namespace can publish."""
    aws.cloudwatch.put_metric_data(
        Namespace=namespace,
        MetricData=[
            {
                "MetricName": "TunnelUp",
                "Dimensions": [
                    {"Name": "Deployment", "Value": "test"},
                    {"Name": "Tunnel", "Value": "partner"},
                ],
                "Value": 0.0,
            }
        ],
    )


def test_forged_tunnel_down_while_the_gateway_reports_its_sa_installed_restarts_nothing(
    aws, capsys
):
    _forge_tunnel_down(aws)
    _readiness(aws, aws.gateway_id, sas=1, age=12)
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["action"] == "gateway-reports-up" and out["gateway"] == aws.gateway_id
    assert "1 CHILD_SA(s) installed" in out["reason"]
    assert aws.port.calls == [] and aws.pages() == []
    assert "attempts" not in aws.record()
    # The decision is counted under this deployment: {service, Deployment}.
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "_aws" in line]
    skipped = [blob for blob in emf if "SkippedGatewayReportsUp" in blob]
    assert skipped and skipped[0]["Deployment"] == "test"
    assert ["Deployment"] in [
        [d for d in dims if d == "Deployment"]
        for m in skipped[0]["_aws"]["CloudWatchMetrics"]
        for dims in m["Dimensions"]
    ]


def test_a_stale_report_lets_the_restart_go_ahead(aws):
    _readiness(aws, aws.gateway_id, sas=1, age=300)  # the agent stopped writing 5 min ago
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["action"] == "restart" and [c[0] for c in aws.port.calls] == [aws.gateway_id]


def test_the_standbys_report_does_not_speak_for_the_active(aws):
    standby = _launch_member(aws)
    _readiness(aws, standby, sas=1, age=5)  # an odd report; it is not the ENI holder's
    _readiness(aws, aws.gateway_id, sas=0, age=5)
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["action"] == "restart" and [c[0] for c in aws.port.calls] == [aws.gateway_id]


def test_an_alarm_on_the_shared_namespace_is_not_ours(aws):
    """Before issue 21 the alarm watched ``tunnelnat``; a TunnelUp there is anyone's."""
    name = "tunnelnat-test-TunnelUp-shared"
    aws.cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace="tunnelnat",
        MetricName="TunnelUp",
        Dimensions=[
            {"Name": "Deployment", "Value": "test"},
            {"Name": "Tunnel", "Value": "partner"},
        ],
        Statistic="Minimum",
        Period=60,
        EvaluationPeriods=3,
        Threshold=1,
        ComparisonOperator="LessThanThreshold",
    )
    at = _alarm(aws, name, "ALARM")
    out = aws.invoke(alarm_event(name, "ALARM", at, "OK", at))
    assert "rejected" in out and "tunnelnat/test" in out["rejected"] and aws.port.calls == []
