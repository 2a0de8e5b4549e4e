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
            Namespace="tunnelnat",
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
                                "namespace": "tunnelnat",
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
    gateway = ec2.run_instances(
        ImageId="ami-12345678",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "tunnelnat:role", "Value": "gateway"},
                    {"Key": "tunnelnat:deployment", "Value": "test"},
                ],
            }
        ],
    )["Instances"][0]["InstanceId"]
    topic = sns.create_topic(Name="tunnelnat-page")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="pages")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    cloudwatch.put_metric_alarm(
        AlarmName=ALARM,
        Namespace="tunnelnat",
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

    from tunnelnat.handlers import healer as module

    port = RestartPort()
    healer, persistence = module.build_healer(commands=port)
    module.use_healer(healer, persistence)
    rig = Aws(cloudwatch, dynamodb, sqs, queue_url, gateway, port, module, healer)
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
        Namespace="tunnelnat",
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
        Namespace="tunnelnat",
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


# -- which instance is the gateway (issue 14, finding 5, for the healer too) -----------------


G = "10.10.1.250"
GATEWAY_TAGS = [
    {"Key": "tunnelnat:role", "Value": "gateway"},
    {"Key": "tunnelnat:deployment", "Value": "test"},
]


def _serve_gateway(aws, monkeypatch, **env: str) -> None:
    """The healer as the stack deploys it (Healer.serve_gateway's environment)."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    healer, persistence = aws.module.build_healer(commands=aws.port)
    aws.module.use_healer(healer, persistence)


def _launch_tagged(ec2, subnet: str) -> str:
    # Beside the gateway moto addressed at random, never on its address nor on G.
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


def _hold_g(ec2, subnet: str, instance_id: str, g: str) -> None:
    eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=g)
    ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterface"]["NetworkInterfaceId"],
        InstanceId=instance_id,
        DeviceIndex=1,
    )


def test_the_healer_restarts_the_instance_holding_g_not_an_impostor(aws, monkeypatch):
    ec2 = boto3.client("ec2", region_name=REGION)
    [raw] = ec2.describe_instances(InstanceIds=[aws.gateway_id])["Reservations"][0]["Instances"]
    g = G if raw["PrivateIpAddress"] != G else "10.10.1.251"  # moto addresses at random
    impostor = _launch_tagged(ec2, raw["SubnetId"])
    # G on the one whose ID sorts first: by tags alone the healer took the last.
    holder, other = sorted([aws.gateway_id, impostor])
    _hold_g(ec2, raw["SubnetId"], holder, g)
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_IP=g, TUNNELNAT_VPC_ID=raw["VpcId"])
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["action"] == "restart" and out["status"] == "Success"
    assert [call[0] for call in aws.port.calls] == [holder]
    assert other not in json.dumps(out)


def test_another_vpcs_gateway_holding_its_own_g_is_not_ours(aws, monkeypatch):
    ec2 = boto3.client("ec2", region_name=REGION)
    [raw] = ec2.describe_instances(InstanceIds=[aws.gateway_id])["Reservations"][0]["Instances"]
    g = G if raw["PrivateIpAddress"] != G else "10.10.1.251"  # moto addresses at random
    _hold_g(ec2, raw["SubnetId"], aws.gateway_id, g)
    far_vpc = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    far_subnet = ec2.create_subnet(VpcId=far_vpc, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
    far = _launch_tagged(ec2, far_subnet)
    _hold_g(ec2, far_subnet, far, g)
    # Without the VPC to tell them apart: two candidates, a failed restart naming both, and no
    # RestartTunnel sent to either.
    _serve_gateway(aws, monkeypatch, TUNNELNAT_GATEWAY_IP=g)
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["action"] == "restart" and out["status"] == "Error"
    assert aws.port.calls == []
    [attempt] = json.loads(aws.record()["attempts"]["S"])
    assert "2 instances qualify" in attempt["detail"] and far in attempt["detail"]
    # As deployed (the VPC set): ours, and only ours.
    _serve_gateway(aws, monkeypatch, TUNNELNAT_VPC_ID=raw["VpcId"])
    monkeypatch.setenv("TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS", "1")
    _serve_gateway(aws, monkeypatch)
    time.sleep(1.1)
    out = aws.invoke(aws.event("ALARM", aws.set_alarm("ALARM")))
    assert out["status"] == "Success"
    assert [call[0] for call in aws.port.calls] == [aws.gateway_id]
