"""Issue 14: one instance, mapping or value that cannot be served is marked, skipped and
reported; everything else converges. Nothing outside this deployment is touched."""

from __future__ import annotations

import json

import pytest

from tests.lambdas.conftest import REGION
from tests.lambdas.events import Context, sqs_batch, state_change
from tests.lambdas.test_metrics import emf, failures
from tunnelnat.adapters.ec2 import Ec2Instances, GatewayAmbiguous
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}
GATEWAY_TAGS = {"tunnelnat:role": "gateway", "tunnelnat:deployment": "test"}


def other_vpc(world, private_ip: str, tags: dict[str, str]) -> str:
    """An instance at ``private_ip`` in a second VPC with the same ranges as ours."""
    if not getattr(world, "far_subnet", None):
        vpc = world.ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
        subnet = world.ec2.create_subnet(VpcId=vpc, CidrBlock="10.10.1.0/24")["Subnet"]
        world.far_subnet = subnet["SubnetId"]
    spec = {"SubnetId": world.far_subnet, "PrivateIpAddress": private_ip}
    spec["TagSpecifications"] = [
        {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
    ]
    reply = world.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, **spec)
    return reply["Instances"][0]["InstanceId"]


def test_an_instance_of_another_vpc_is_never_enrolled(world):
    """Finding 2: its address falls in the gateway subnet's range, but it is not in our VPC."""
    ours = world.launch("10.10.1.21", tags=TAG)
    far = other_vpc(world, "10.10.1.21", TAG)
    result = handler(
        sqs_batch(state_change(far, "running"), state_change(ours, "running")), Context()
    )
    assert result == {"batchItemFailures": []}, "a clear status, never a retry"
    assert set(world.items("mapping")) == {ours}
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}
    assert all(instance != far for instance, _ in world.fleet.calls), "no command reaches it"
    assert far not in world.items("instance"), "another deployment's business: nothing written"
    [outcome] = handler(state_change(far, "running"), Context())["outcomes"]
    assert outcome["status"] == "other-vpc" and outcome["managed"] is False


@pytest.fixture
def without_vpc_check(world, monkeypatch):
    """moto keeps a terminated instance's address, so an address reused after a terminate is
    staged in a second VPC, with the VPC check (finding 2) off: the duplicate P is the point."""
    monkeypatch.delenv("TUNNELNAT_VPC_ID")
    handler_module.use_controller(handler_module.build_controller(commands=world.fleet))


def test_a_private_address_is_never_mapped_twice_and_the_rest_converges(
    world, without_vpc_check, capsys
):
    """Finding 1: both were mapped, the gateway refused the whole table and no instance of the
    fleet could be enrolled any more."""
    first = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(first, "running"), Context())
    second = other_vpc(world, "10.10.1.21", TAG)
    third = world.launch("10.10.1.22", tags=TAG)
    events = sqs_batch(state_change(second, "running"), state_change(third, "running"))
    assert handler(events, Context()) == {"batchItemFailures": []}
    assert failures(emf(capsys.readouterr().out)) == ["conflict"], "counted by its Reason"
    assert set(world.items("mapping")) == {first, third}
    assert world.items("private")["10.10.1.21"]["instance_id"]["S"] == first
    record = world.items("instance")[second]
    assert record["status"]["S"] == "conflict"
    assert first in record["reason"]["S"], "the conflict names the other party"
    assert second not in world.fleet.routes
    # The batch's addresses were picked before the transaction found the conflict (the pool's
    # next ones, without reading the claims): the third keeps the one picked for it.
    assert world.fleet.applied_pairs() == {
        ("10.10.1.21", "203.0.113.10"),
        ("10.10.1.22", "203.0.113.12"),
    }
    # The holder goes (its event lost): the scheduled reconcile frees the address, then maps it.
    world.ec2.terminate_instances(InstanceIds=[first])
    scheduled = {**state_change(first, "running"), "detail-type": "Scheduled Event"}
    scheduled.update(source="aws.events", detail={})
    handler(scheduled, Context())
    assert set(world.items("mapping")) == {second, third}
    assert world.items("instance")[second]["status"]["S"] == "enrolled"


def test_a_stored_duplicate_no_longer_wedges_every_sync(world, without_vpc_check, capsys):
    """A table that already holds two mappings of one P (written before this version): the
    gateway leaves both rows out, reports them, and applies everything else."""
    from ipaddress import IPv4Address

    from tunnelnat.adapters.store import EnrolmentStore

    store = EnrolmentStore(world.dynamodb, "tunnelnat-test")
    store.put_mapping("i-0aaaaaaaaaaaaaaaa", IPv4Address("10.10.1.99"),
                      IPv4Address("203.0.113.11"), claim=True, previous=None)  # fmt: skip
    world.dynamodb.delete_item(  # as written before private addresses were claimed
        TableName="tunnelnat-test", Key={"pk": {"S": "private"}, "sk": {"S": "10.10.1.99"}}
    )
    store.put_mapping("i-0bbbbbbbbbbbbbbbb", IPv4Address("10.10.1.99"),
                      IPv4Address("203.0.113.12"), claim=True, previous=None)  # fmt: skip
    web = world.launch("10.10.1.21", tags=TAG)
    [outcome] = handler(state_change(web, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}
    assert failures(emf(capsys.readouterr().out)) == ["invalid-mapping"]
    assert {(r[0], r[1]) for r in world.fleet.applied.rejected} == {
        ("10.10.1.99", "203.0.113.11"),
        ("10.10.1.99", "203.0.113.12"),
    }


def test_an_impostor_tagged_like_the_gateway_receives_nothing(world):
    """Finding 5: the gateway is the instance holding G, not whatever carries its tags."""
    impostors = []
    for n in range(12):  # until one sorts after the real gateway (the old code took the last)
        impostors.append(world.launch(f"10.10.1.{60 + n}", tags=GATEWAY_TAGS))
        if impostors[-1] > world.gateway_id:
            break
    web = world.launch("10.10.1.21", tags=TAG)
    [outcome] = handler(state_change(web, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    synced = {instance for instance, doc in world.fleet.calls if doc == "SyncNatTable"}
    assert synced == {world.gateway_id}


def test_two_instances_holding_g_are_a_loud_failure(world):
    """Without a VPC to tell them apart, two instances each holding G in its own VPC."""
    far = other_vpc(world, "10.10.1.11", GATEWAY_TAGS)
    eni = world.ec2.create_network_interface(
        SubnetId=world.far_subnet, PrivateIpAddress="10.10.1.5"
    )
    world.ec2.attach_network_interface(
        NetworkInterfaceId=eni["NetworkInterface"]["NetworkInterfaceId"],
        InstanceId=far,
        DeviceIndex=1,
    )
    blind = Ec2Instances(world.ec2, gateway_ip="10.10.1.5")
    with pytest.raises(GatewayAmbiguous, match="2 instances qualify"):
        blind.find_gateway("test")
    scoped = Ec2Instances(world.ec2, gateway_ip="10.10.1.5", vpc_id=world.vpc_id)
    assert scoped.find_gateway("test") == world.gateway_id


def test_the_status_tag_names_the_deployment(world):
    """Finding 9: a tag shared by every deployment let each one's controller reach (IAM) and
    read the instances of the others."""
    web = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web, "running"), Context())
    [reservation] = world.ec2.describe_instances(InstanceIds=[web])["Reservations"]
    tags = {t["Key"]: t["Value"] for t in reservation["Instances"][0]["Tags"]}
    assert tags.get("tunnelnat:status:test") == "enrolled"
    assert "tunnelnat:status" not in tags


# -- issue 21 ----------------------------------------------------------------------------------
def test_a_tagged_instance_outside_the_allow_list_is_not_allowed(world, monkeypatch, capsys):
    monkeypatch.setenv("TUNNELNAT_ALLOWED_SUBNETS", world.other_subnet_id)
    handler_module.use_controller(handler_module.build_controller(commands=world.fleet))
    web = world.launch("10.10.1.21", tags=TAG)
    capsys.readouterr()
    [outcome] = handler(state_change(web, "running"), Context())["outcomes"]
    assert outcome["status"] == "not-allowed"
    assert world.subnet_id in outcome["reason"], "the reason names the subnet"
    assert failures(emf(capsys.readouterr().out)) == ["not-allowed"]
    assert world.items("mapping") == {} and web not in world.fleet.routes
    assert all(i != web for i, _ in world.fleet.calls), "never a command to it"
    assert world.items("instance")[web]["status"]["S"] == "not-allowed"
    tags = world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [web]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in tags}["tunnelnat:status:test"] == "not-allowed"


def test_an_enrolled_instance_outside_a_narrowed_allow_list_is_unenrolled(world, monkeypatch):
    web = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web, "running"), Context())
    assert world.fleet.routes[web]
    monkeypatch.setenv("TUNNELNAT_ALLOWED_GROUPS", "web-asg")
    handler_module.use_controller(handler_module.build_controller(commands=world.fleet))
    [outcome] = handler(state_change(web, "running"), Context())["outcomes"]
    assert outcome["status"] == "not-allowed" and "no Auto Scaling group" in outcome["reason"]
    assert web not in world.fleet.routes and world.items("mapping") == {}


def test_what_an_instance_wrote_reaches_records_and_the_dlq_without_escapes(world, queues):
    """Issue 21, finding 7: instance stderr with ANSI escapes reached operators' terminals
    (tunnelnat status, dlq)."""
    from tests.lambdas.test_controller_faults import batch_from
    from tunnelnat.adapters.commands import CommandResult

    sqs, main, dlq = queues
    web = world.launch("10.10.1.21", tags=TAG)
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[31mroute failed\x1b[0m\r\x9b1;1H"
    real = world.fleet._run

    def run(instance_id, document, parameters):
        if document == "AddHostRoute":
            return CommandResult(instance_id, document, "Failed", stderr=evil)
        return real(instance_id, document, parameters)

    world.fleet._run = run
    arn = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"
    handler(batch_from(arn, state_change(web, "running"), receive_count=10), Context())
    [message] = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=1)["Messages"]
    parked = json.loads(message["Body"])
    record = world.items("instance")[web]
    for text in (parked["reason"], record["reason"]["S"]):
        assert "route failed" in text, text
        assert not any(c in text for c in "\x1b\x07\r\x9b"), repr(text)
