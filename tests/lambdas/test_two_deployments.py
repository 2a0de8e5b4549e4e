"""Issue 21, finding 4: two deployments in one account, one VPC, one moto server — two
controllers, two tables, two gateways (B's a member of its own Auto Scaling group, as the stack
builds it), instances shared where the story needs it. Neither sees, pages for, or undoes the
other.

A is the conftest's world (deployment ``test``, explicit enrolment key ``tunnelnat``, G
10.10.1.5). B is ``other``: no enrolment key configured (its default is ``tunnelnat:other``),
G 10.10.1.6, its own pool, its gateway found through TUNNELNAT_GATEWAY_GROUP.
"""

from __future__ import annotations

import json

import boto3
import pytest

from tests.conftest import VALID_CONFIG
from tests.lambdas.conftest import REGION, TABLE, FakeFleet, create_enrolment_table
from tests.lambdas.events import Context, sqs_batch, state_change, tag_change
from tests.lambdas.test_controller_faults import FakeLifecycle, lifecycle_event
from tests.lambdas.test_metrics import emf
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler
from tunnelnat.settings import ControllerSettings

A_TAG = {"tunnelnat": "enabled"}
B_TAG = {"tunnelnat:other": "enabled"}  # B's default key (no enrolment_tag_key configured)
B_TABLE = "tunnelnat-other"
B_GROUP = "other-gateway"
B_CONFIG = {
    **{k: v for k, v in VALID_CONFIG.items() if k != "enrolment_tag_key"},
    "gateway_private_ip": "10.10.1.6",
    "address_pool": ["203.0.113.20", "203.0.113.21"],
}


class Deployment:
    """One deployment's controller, its command fleet and its lifecycle port; ``run`` hands an
    event to the Lambda handler as this deployment's function would receive it."""

    def __init__(self, controller, fleet: FakeFleet, name: str):
        self.controller, self.fleet, self.name = controller, fleet, name
        self.lifecycle = FakeLifecycle()

    def run(self, event: dict) -> dict:
        handler_module.use_controller(self.controller, lifecycle=self.lifecycle)
        return handler(event, Context())

    def outcome(self, event: dict) -> dict:
        [outcome] = self.run(event)["outcomes"]
        return outcome


@pytest.fixture
def two(world, monkeypatch):
    ec2 = world.ec2
    dynamodb = world.dynamodb
    create_enrolment_table(dynamodb, B_TABLE)
    # B's gateway: the one member of B's Auto Scaling group, holding B's G.
    ec2.create_launch_template(
        LaunchTemplateName="other-gateway",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t3.micro"},
    )
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=B_GROUP,
        LaunchTemplate={"LaunchTemplateName": "other-gateway"},
        MinSize=1,
        MaxSize=1,
        DesiredCapacity=1,
        VPCZoneIdentifier=world.subnet_id,
    )
    [b_gateway] = [
        i["InstanceId"]
        for r in ec2.describe_instances(
            Filters=[{"Name": "tag:aws:autoscaling:groupName", "Values": [B_GROUP]}]
        )["Reservations"]
        for i in r["Instances"]
    ]
    eni = ec2.create_network_interface(SubnetId=world.subnet_id, PrivateIpAddress="10.10.1.6")
    ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterface"]["NetworkInterfaceId"],
        InstanceId=b_gateway,
        DeviceIndex=1,
    )
    # One instance, one file per deployment: the fleets share what the instances hold.
    b_fleet = FakeFleet(dynamodb, gateway_id=b_gateway, host=world.fleet.host)
    b_settings = ControllerSettings.from_environ(
        {
            "TUNNELNAT_CONFIG": json.dumps(B_CONFIG),
            "TUNNELNAT_TABLE_NAME": B_TABLE,
            "TUNNELNAT_DEPLOYMENT": "other",
            "TUNNELNAT_VPC_ID": world.vpc_id,
            "TUNNELNAT_GATEWAY_GROUP": B_GROUP,
            "AWS_REGION": REGION,
        }
    )
    a = Deployment(handler_module._get_service().controller, world.fleet, "test")
    b = Deployment(handler_module.build_controller(b_settings, commands=b_fleet), b_fleet, "other")
    b.gateway_id = b_gateway
    yield world, a, b


def items(world, table: str, pk: str) -> dict[str, dict]:
    reply = world.dynamodb.query(
        TableName=table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": pk}},
    )
    return {i["sk"]["S"]: i for i in reply["Items"]}


def status_tags(world, instance_id: str) -> dict[str, str]:
    tags = world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])
    return {t["Key"]: t["Value"] for t in tags["Tags"] if t["Key"].startswith("tunnelnat:status")}


def test_an_instance_tagged_for_a_only_is_enrolled_by_a_only(two):
    """b08b1c8: B's default enrolment key was A's (``tunnelnat``): one tag, two enrolments
    (two addresses, two routes via two gateways, the last one winning on the instance)."""
    world, a, b = two
    web = world.launch("10.10.1.21", tags=A_TAG)
    assert a.outcome(state_change(web, "running"))["status"] == "enrolled"
    by_b = b.outcome(state_change(web, "running"))
    assert by_b["status"] == "not-tagged" and by_b["managed"] is False
    assert b.fleet.calls == [], "B sends nothing to it"
    assert web not in items(world, B_TABLE, "mapping")
    assert web not in items(world, B_TABLE, "instance")
    assert world.fleet.host == {(web, "test"): {"192.0.2.0/24"}}
    assert status_tags(world, web) == {"tunnelnat:status:test": "enrolled"}
    # B's scheduled reconcile does not find it either (B lists instances by its own key).
    b.run(state_change("i-00000000", "running") | {"detail-type": "Scheduled Event",
          "source": "aws.events", "detail": {}})  # fmt: skip
    assert all(i != web for i, _ in b.fleet.calls)


def test_bs_hook_events_are_ignored_by_a_and_answered_by_b(two):
    """b08b1c8: A took every tunnelnat-* hook as its own: it completed B's launch hook at once
    for an instance it does not enrol (not tagged for A: released), putting B's instance in
    service before B had enrolled it."""
    world, a, b = two
    web = world.launch("10.10.1.22", tags=B_TAG)
    event = lifecycle_event(web, launching=True)
    event["detail"]["LifecycleHookName"] = "tunnelnat-other-launch"
    assert "not this deployment's" in a.run(event)["rejected"]
    assert a.lifecycle.completed == [] and a.fleet.calls == []
    assert b.outcome(event)["status"] == "enrolled"
    assert b.lifecycle.completed == [(web, "CONTINUE")]
    assert world.fleet.host == {(web, "other"): {"192.0.2.0/24"}}
    # And the other way round: B never answers A's hooks.
    mine = lifecycle_event(web, launching=True)
    mine["detail"]["LifecycleHookName"] = "tunnelnat-test-launch"
    assert "not this deployment's" in b.run(mine)["rejected"]
    assert b.lifecycle.completed == [(web, "CONTINUE")]


def test_bs_untag_leaves_as_routes_on_the_shared_instance(two):
    """b08b1c8: one /etc/tunnelnat/routes per instance: B's RemoveHostRoute (or its next
    AddHostRoute) removed A's routes."""
    world, a, b = two
    shared = world.launch("10.10.1.23", tags={**A_TAG, **B_TAG})
    a.outcome(state_change(shared, "running"))
    b.outcome(state_change(shared, "running"))
    assert world.fleet.host == {
        (shared, "test"): {"192.0.2.0/24"},
        (shared, "other"): {"192.0.2.0/24"},
    }
    assert status_tags(world, shared) == {
        "tunnelnat:status:test": "enrolled",
        "tunnelnat:status:other": "enrolled",
    }
    world.ec2.delete_tags(Resources=[shared], Tags=[{"Key": "tunnelnat:other"}])
    left = b.outcome(tag_change(shared, A_TAG, changed=["tunnelnat:other"]))
    assert left["status"] == "not-tagged"
    assert (shared, "RemoveHostRoute") in b.fleet.calls
    assert world.fleet.host == {(shared, "test"): {"192.0.2.0/24"}}, "A's routes stay"
    assert set(items(world, TABLE, "mapping")) == {shared}, "A's mapping stays"
    assert items(world, B_TABLE, "mapping") == {}
    assert status_tags(world, shared) == {"tunnelnat:status:test": "enrolled"}
    # A, seeing the same tag change, keeps it enrolled (its AddHostRoute is idempotent).
    assert a.outcome(tag_change(shared, A_TAG))["status"] == "enrolled"
    assert (shared, "RemoveHostRoute") not in a.fleet.calls
    assert world.fleet.host == {(shared, "test"): {"192.0.2.0/24"}}
    # Each gateway got only its own deployment's syncs.
    assert {i for i, d in a.fleet.calls if d == "SyncNatTable"} == {world.gateway_id}
    assert {i for i, d in b.fleet.calls if d == "SyncNatTable"} == {b.gateway_id}


def test_metrics_carry_their_own_deployment(two, capsys):
    """b08b1c8: no Deployment dimension, so B's failures paged A's on-call."""
    world, a, b = two
    capsys.readouterr()
    ok = world.launch("10.10.1.24", tags=A_TAG)
    a.run(state_change(ok, "running"))
    a_points = emf(capsys.readouterr().out)
    outside = world.ec2.run_instances(
        ImageId="ami-12345678", MinCount=1, MaxCount=1, SubnetId=world.other_subnet_id,
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "tunnelnat:other", "Value": "enabled"}]}],
    )["Instances"][0]["InstanceId"]  # fmt: skip
    b.run(sqs_batch(state_change(outside, "running")))  # unsupported-subnet: a Failure
    b_points = emf(capsys.readouterr().out)
    assert a_points and b_points
    assert {p["dims"].get("Deployment") for p in a_points} == {"test"}
    assert {p["dims"].get("Deployment") for p in b_points} == {"other"}
    [failure] = [p for p in b_points if p["name"] == "Failures"]
    assert failure["dims"] == {"Deployment": "other", "Reason": "unsupported-subnet",
                               "service": "tunnelnat"}  # fmt: skip
