"""Split brain in the gateway pair: both gateways decide to take G's ENI at once; the ENI's
attachment decides (gateway/tunnelnat_pair.py against moto's EC2, DynamoDB, CloudWatch, SNS).

Each gateway runs its real takeover (``Agent.take_over``) in its own thread; every EC2 call goes
through ``Turns``, which lets the two gateways call EC2 strictly in turn (A, B, A, B, ... or
B first), so their describe / force-detach / attach / poll interleave call by call. Nothing sleeps.

moto attaches an ENI that is already attached (it moves it); AWS refuses with
``InvalidNetworkInterface.InUse`` ("Interface: [eni-...] in use"), which is what makes the
attachment a lock. ``AwsEc2`` adds that refusal around moto, and nothing else.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import timedelta

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from tests.lambdas.conftest import REPO, create_enrolment_table

sys.path.insert(0, str(REPO / "gateway"))
from tunnelnat_gateway import boot as boot  # noqa: E402
from tunnelnat_gateway import pair as pair  # noqa: E402

REGION = "us-east-1"
TABLE = "tunnelnat-pair"
DEPLOYMENT = "tunnelnat-pair"
HOLD_DOWN = 60.0


class AwsEc2:
    """moto's EC2 client, with AWS's refusal to attach an ENI that is in use."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def attach_network_interface(self, **kwargs):
        eni = self.real.describe_network_interfaces(
            NetworkInterfaceIds=[kwargs["NetworkInterfaceId"]]
        )["NetworkInterfaces"][0]
        if eni["Status"] != "available":
            raise ClientError(
                {
                    "Error": {
                        "Code": "InvalidNetworkInterface.InUse",
                        "Message": f"Interface: [{kwargs['NetworkInterfaceId']}] in use.",
                    }
                },
                "AttachNetworkInterface",
            )
        return self.real.attach_network_interface(**kwargs)


class Turns:
    """EC2 calls strictly in turn between the gateways in ``order`` (round robin); a gateway
    whose takeover has ended leaves the rotation."""

    def __init__(self, order: list[str]):
        self.cond = threading.Condition()
        self.order = list(order)
        self.turn = 0
        self.calls: list[tuple[str, str]] = []
        self.started = False  # before the race (each agent's start): calls pass straight

    def call(self, who: str, name: str, fn):
        if not self.started:
            return fn()
        with self.cond:
            if not self.cond.wait_for(lambda: self.order[self.turn] == who, timeout=30):
                raise AssertionError(f"{who} never got its turn")
            try:
                return fn()
            finally:
                self.calls.append((who, name))
                self.turn = (self.turn + 1) % len(self.order)
                self.cond.notify_all()

    def leave(self, who: str) -> None:
        with self.cond:
            current = self.order[self.turn]
            self.order.remove(who)
            if self.order:
                self.turn = self.order.index(current) if current != who else 0
                self.turn %= len(self.order)
            self.cond.notify_all()


class TurnEc2:
    def __init__(self, ec2, who: str, turns: Turns):
        self.ec2, self.who, self.turns = ec2, who, turns

    def __getattr__(self, name):
        method = getattr(self.ec2, name)
        return lambda **kw: self.turns.call(self.who, name, lambda: method(**kw))


class MirrorIp:
    """``ip`` on a gateway whose NIC list follows EC2 (as the hypervisor's hot-plug does, and
    the lab's ENI mirror): the ENI's link is here while EC2 says it is attached here."""

    def __init__(self, ec2, eni: str, mac: str, instance: str):
        self.ec2, self.eni, self.mac, self.instance = ec2, eni, mac, instance
        self.calls: list[list[str]] = []

    def __call__(self, argv):
        argv = list(argv)
        if argv[:3] == ["-j", "link", "show"]:
            links = [{"ifname": "ens5", "address": "02:00:00:00:00:01"}]
            got = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[self.eni])
            if (got["NetworkInterfaces"][0].get("Attachment") or {}).get(
                "InstanceId"
            ) == self.instance:
                links.append({"ifname": "ens6", "address": self.mac})
            return json.dumps(links)
        self.calls.append(argv)
        return ""


def swanctl_ok(argv, **kwargs):
    import subprocess

    return subprocess.CompletedProcess(argv, 0, "", "")


@pytest.fixture
def world(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.1.0/24")["Subnet"]["SubnetId"]
        image = ec2.describe_images()["Images"][0]["ImageId"]
        tags = [
            {"Key": "tunnelnat:role", "Value": "gateway"},
            {"Key": "tunnelnat:deployment", "Value": DEPLOYMENT},
        ]
        reply = ec2.run_instances(
            ImageId=image,
            MinCount=3,
            MaxCount=3,
            SubnetId=subnet,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )
        a, b, x = (i["InstanceId"] for i in reply["Instances"])
        eni = ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress="10.10.1.20")
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        create_enrolment_table(dynamodb, TABLE)
        sns = boto3.client("sns", region_name=REGION)
        topic = sns.create_topic(Name="tunnelnat-alarms")["TopicArn"]
        sqs = boto3.client("sqs", region_name=REGION)
        queue = sqs.create_queue(QueueName="alarms")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn["Attributes"]["QueueArn"])
        yield {
            "ec2": ec2,
            "a": a,
            "b": b,
            "x": x,
            "eni": eni["NetworkInterface"]["NetworkInterfaceId"],
            "mac": eni["NetworkInterface"]["MacAddress"],
            "dynamodb": dynamodb,
            "cloudwatch": boto3.client("cloudwatch", region_name=REGION),
            "sns": sns,
            "sqs": sqs,
            "queue": queue,
            "topic": topic,
        }


def config(world) -> pair.PairConfig:
    return pair.PairConfig.from_json(
        {
            "region": REGION,
            "eni_id": world["eni"],
            "gateway": "10.10.1.20/24",
            "deployment": DEPLOYMENT,
            "table": TABLE,
            "tunnel": "partner",
            "hold_down_seconds": HOLD_DOWN,
            "topic_arn": world["topic"],
            "role_file": "/nonexistent-run/pair-role",  # never written in these tests
        }
    )


def agent(world, who: str, ec2) -> pair.Agent:
    cfg = config(world)
    records = pair.Records(cfg, world["dynamodb"], world["cloudwatch"], world["sns"])
    ip = MirrorIp(world["ec2"], world["eni"], world["mac"], world[who])
    a = pair.Agent(
        cfg,
        world[who],
        ec2,
        records,
        links=boot.Links(ip),
        run_cmd=swanctl_ok,
        sleep=lambda s: None,
    )
    a.start()
    return a


def attach(world, instance: str, *, age: float = 0.0) -> None:
    """The ENI attached to ``instance``, ``age`` seconds ago (moto stamps attachments with its
    clock; an older one is set in moto's own record)."""
    world["ec2"].attach_network_interface(
        NetworkInterfaceId=world["eni"], InstanceId=instance, DeviceIndex=1
    )
    if age:
        from moto.ec2.models import ec2_backends

        record = ec2_backends[DEFAULT_ACCOUNT_ID][REGION].enis[world["eni"]]
        record.attach_time -= timedelta(seconds=age)


def holder(world) -> str | None:
    got = world["ec2"].describe_network_interfaces(NetworkInterfaceIds=[world["eni"]])
    return (got["NetworkInterfaces"][0].get("Attachment") or {}).get("InstanceId")


def race(world, order: list[str]) -> tuple[dict[str, pair.Agent], Turns]:
    """A and B, both standby and both sure the active is dead, take over at once."""
    turns = Turns(order)
    agents = {
        who: agent(world, who, TurnEc2(AwsEc2(world["ec2"]), who, turns)) for who in ("a", "b")
    }
    for a in agents.values():
        assert a.machine.role == pair.STANDBY
    turns.started = True
    errors = []

    def take(who):
        try:
            agents[who].take_over(pair.TakeOver("test: both decided", 2.0))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            turns.leave(who)

    threads = [threading.Thread(target=take, args=(who,)) for who in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    return agents, turns


def failovers_recorded(world) -> dict:
    item = world["dynamodb"].get_item(
        TableName=TABLE, Key={"pk": {"S": "meta"}, "sk": {"S": "pair"}}
    )
    return item.get("Item", {})


def metric_samples(world, name: str) -> float:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    stats = world["cloudwatch"].get_metric_statistics(
        Namespace="tunnelnat",
        MetricName=name,
        Dimensions=[{"Name": "Deployment", "Value": DEPLOYMENT}],
        StartTime=now - timedelta(minutes=10),
        EndTime=now + timedelta(minutes=10),
        Period=60,
        Statistics=["SampleCount"],
    )
    return sum(p["SampleCount"] for p in stats["Datapoints"])


def notifications(world) -> list[dict]:
    got = world["sqs"].receive_message(QueueUrl=world["queue"], MaxNumberOfMessages=10)
    return [json.loads(json.loads(m["Body"])["Message"]) for m in got.get("Messages", [])]


def assert_one_winner(world, agents, previous):
    roles = {who: a.machine.role for who, a in agents.items()}
    winners = [who for who, role in roles.items() if role == pair.ACTIVE]
    assert len(winners) == 1, roles
    (winner,) = winners
    loser = "b" if winner == "a" else "a"
    assert holder(world) == world[winner]
    assert agents[loser].machine.role == pair.STANDBY
    assert agents[loser].machine.not_before > 0  # it backs off, it does not retry at once
    # The winner alone brought G up and recorded the failover, once.
    assert ["addr", "replace", "10.10.1.20/24", "dev", "ens6", "metric", "1000"] in (
        agents[winner].links.run.calls
    )
    assert agents[loser].links.run.calls == []
    item = failovers_recorded(world)
    assert item["active"]["S"] == world[winner] and item["failovers"]["N"] == "1"
    last = item["last_failover"]["M"]
    assert last["to"]["S"] == world[winner]
    assert last["from"]["S"] == (world[previous] if previous else "none")
    assert metric_samples(world, "Failovers") == 1
    assert metric_samples(world, "FailoverSeconds") == 1
    (message,) = notifications(world)
    assert message["to"] == world[winner] and message["deployment"] == DEPLOYMENT
    return winner


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]], ids=["a-first", "b-first"])
def test_both_take_an_available_eni_at_once_one_wins(world, order):
    """The active's instance is gone and AWS released the ENI: both standbys reach for it."""
    agents, turns = race(world, order)
    assert [name for _, name in turns.calls[:2]] == ["describe_network_interfaces"] * 2
    assert ("a", "attach_network_interface") in turns.calls
    assert ("b", "attach_network_interface") in turns.calls  # both really tried
    assert_one_winner(world, agents, previous=None)


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]], ids=["a-first", "b-first"])
def test_both_force_detach_the_dead_active_at_once_one_wins(world, order):
    """The ENI is still attached to the dead active X (for ten minutes): both force-detach the
    attachment they saw, both wait for it to be free, both attach: AWS lets one through."""
    attach(world, world["x"], age=600)
    agents, turns = race(world, order)
    detaches = [who for who, name in turns.calls if name == "detach_network_interface"]
    assert sorted(detaches) == ["a", "b"]  # the second found it already detached
    assert_one_winner(world, agents, previous="x")


def test_the_second_finds_a_young_attachment_and_leaves_it(world):
    """One took the ENI a moment ago; the other, late with the same decision, is held down."""
    attach(world, world["x"], age=600)
    first = agent(world, "a", AwsEc2(world["ec2"]))
    first.take_over(pair.TakeOver("test", 2.0))
    assert first.machine.role == pair.ACTIVE and holder(world) == world["a"]
    late = agent(world, "b", AwsEc2(world["ec2"]))
    late.take_over(pair.TakeOver("test", 2.0))
    assert late.machine.role == pair.STANDBY and holder(world) == world["a"]
    retry = late.machine.not_before - late.clock()
    assert HOLD_DOWN - 5 < retry <= HOLD_DOWN  # what is left of the hold-down
    assert late.links.run.calls == []
    assert failovers_recorded(world)["failovers"]["N"] == "1"
    assert len(notifications(world)) == 1


def test_a_young_attachment_of_a_silent_active_is_not_taken(world):
    attach(world, world["x"])  # just now
    b = agent(world, "b", AwsEc2(world["ec2"]))
    b.take_over(pair.TakeOver("test", 2.0))
    assert b.machine.role == pair.STANDBY and holder(world) == world["x"]
    assert failovers_recorded(world) == {} and notifications(world) == []


def test_both_think_they_are_active_the_attachment_decides(world):
    """A holds the ENI and is active; B, not hearing A (a partition between them), takes it.
    A is fenced by AWS: its link is gone, it steps down; there is one active."""
    attach(world, world["a"], age=600)
    a = agent(world, "a", AwsEc2(world["ec2"]))
    b = agent(world, "b", AwsEc2(world["ec2"]))
    assert (a.machine.role, b.machine.role) == (pair.ACTIVE, pair.STANDBY)
    b.take_over(pair.TakeOver("test: partitioned", 2.0))
    assert b.machine.role == pair.ACTIVE and holder(world) == world["b"]
    assert a.machine.role == pair.ACTIVE  # until it notices
    a.step()  # its next interval: the ENI's link has gone from it
    assert a.machine.role == pair.STANDBY
    # A heartbeat from the new active keeps the old one standby (no fail-back) ...
    a.peers = [pair.IPv4Address("10.10.1.11")]
    beat = pair.Heartbeat(world["b"], pair.ACTIVE, 1, None, 1, time.time()).encode()
    a.handle_datagram(beat, "10.10.1.11")
    assert a.machine.active_heard_at is not None
    # ... and the same datagram again, from any address, is a replay: ignored.
    before = a.machine.active_heard_at
    a.handle_datagram(beat, "10.10.1.99")
    assert a.machine.active_heard_at == before
    item = failovers_recorded(world)
    assert (
        item["active"]["S"] == world["b"]
        and item["last_failover"]["M"]["from"]["S"] == (world["a"])
    )


def test_an_active_that_hears_another_active_asks_ec2_and_the_holder_stays(world):
    attach(world, world["a"], age=600)
    a = agent(world, "a", AwsEc2(world["ec2"]))
    a.peers = [pair.IPv4Address("10.10.1.11")]
    beat = pair.Heartbeat(world["b"], pair.ACTIVE, 1, None, 0, time.time()).encode()
    a.handle_datagram(beat, "10.10.1.11")  # CheckEni: EC2 says A holds it
    assert a.machine.role == pair.ACTIVE


def test_readiness_items_of_both_gateways(world):
    attach(world, world["a"], age=600)
    a = agent(world, "a", AwsEc2(world["ec2"]))
    b = agent(world, "b", AwsEc2(world["ec2"]))
    a.step()
    b.step()
    items = world["dynamodb"].query(
        TableName=TABLE,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": "gateway"}},
    )["Items"]
    roles = {i["sk"]["S"]: i["role"]["S"] for i in items}
    assert roles == {world["a"]: "active", world["b"]: "standby"}
    assert all(int(i["expiration"]["N"]) > float(i["updated_at"]["N"]) for i in items)
    # Peers come from the Auto Scaling group's own tag (issue 20), never tunnelnat:* tags:
    # these instances are in no group, so no membership is known and nobody is a peer.
    assert a.members is None and a.peers == [] and b.peers == []
