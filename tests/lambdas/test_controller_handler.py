from __future__ import annotations

import json

import pytest

from tests.lambdas.events import Context, sqs_batch, state_change, tag_change
from tunnelnat.adapters.commands import CommandError
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}


def test_state_change_enrols_a_tagged_instance(world):
    web1 = world.launch("10.10.1.21", tags={**TAG, "Name": "web-1"})
    result = handler(state_change(web1, "running"), Context())
    [outcome] = result["outcomes"]
    assert outcome["status"] == "enrolled"
    assert outcome["public_ip"] == "203.0.113.10"
    assert world.fleet.routes[web1] == {"192.0.2.0/24"}
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}
    assert set(world.items("address")) == {"203.0.113.10"}
    record = world.items("instance")[web1]
    assert record["status"]["S"] == "enrolled"
    assert record["route_installed"]["BOOL"] is True
    gateway = world.items("meta")["gateway"]
    assert (
        gateway["applied_generation"]["N"] == world.items("meta")["generation"]["generation"]["N"]
    )


def test_tag_change_enrols_and_untag_undoes_everything(world):
    web1 = world.launch("10.10.1.21")
    world.ec2.create_tags(Resources=[web1], Tags=[{"Key": "tunnelnat", "Value": "enabled"}])
    assert handler(tag_change(web1, TAG), Context())["outcomes"][0]["status"] == "enrolled"

    world.ec2.delete_tags(Resources=[web1], Tags=[{"Key": "tunnelnat"}])
    [outcome] = handler(tag_change(web1, {}), Context())["outcomes"]
    assert outcome["status"] == "not-tagged"
    assert web1 not in world.fleet.routes
    assert world.fleet.applied_pairs() == set()
    assert world.items("mapping") == {}
    assert world.items("address") == {}, "the address went back to the pool"
    assert world.items("instance") == {}, "nothing of ours is left on it"


def test_duplicate_events_converge_without_new_work(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    event = state_change(web1, "running")
    handler(event, Context())
    generation = world.items("meta")["generation"]["generation"]["N"]
    syncs = world.fleet.syncs()
    again = handler(event, Context())["outcomes"][0]
    assert again["status"] == "enrolled"
    assert again["gateway_synced"] is False
    assert world.items("meta")["generation"]["generation"]["N"] == generation
    assert world.fleet.syncs() == syncs
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}


def test_out_of_order_events_follow_the_real_state(world):
    """A late 'running' event after the instance stopped must not enrol it."""
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web1, "running"), Context())
    world.ec2.stop_instances(InstanceIds=[web1])
    handler(state_change(web1, "running"), Context())  # stale event, real state: stopped
    assert world.items("mapping") == {}
    record = world.items("instance")[web1]
    assert record["status"]["S"] == "not-running"
    assert record["route_installed"]["BOOL"] is True, "a stopped instance keeps its route file"
    # Started again without the tag: the controller removes the route it left behind.
    world.ec2.delete_tags(Resources=[web1], Tags=[{"Key": "tunnelnat"}])
    world.ec2.start_instances(InstanceIds=[web1])
    handler(state_change(web1, "running"), Context())
    assert web1 not in world.fleet.routes
    assert world.items("instance") == {}


def test_terminated_instance_releases_its_address(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web1, "running"), Context())
    world.ec2.terminate_instances(InstanceIds=[web1])
    [outcome] = handler(state_change(web1, "terminated"), Context())["outcomes"]
    assert outcome["status"] == "gone"
    assert world.items("address") == {} and world.items("mapping") == {}
    assert "RemoveHostRoute" not in {doc for _, doc in world.fleet.calls}
    web2 = world.launch("10.10.1.22", tags=TAG)
    assert handler(state_change(web2, "running"), Context())["outcomes"][0]["public_ip"] == (
        "203.0.113.10"
    )


def test_instance_that_disappears_mid_way(world):
    """The route command fails because the instance is going away; the retry cleans up."""
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready.add(web1)
    with pytest.raises(CommandError):
        handler(state_change(web1, "running"), Context())
    # The mapping was written first: the instance is half-way. Then it is terminated.
    assert set(world.items("mapping")) == {web1}
    world.ec2.terminate_instances(InstanceIds=[web1])
    [outcome] = handler(state_change(web1, "running"), Context())["outcomes"]
    assert outcome["status"] == "gone"
    assert world.items("mapping") == {} and world.items("address") == {}
    assert world.fleet.applied_pairs() == set()


def test_instances_get_distinct_addresses_and_the_pool_runs_out_cleanly(world):
    ids = [world.launch(f"10.10.1.{21 + i}", tags=TAG) for i in range(4)]
    outcomes = [handler(state_change(i, "running"), Context())["outcomes"][0] for i in ids]
    assert [o["status"] for o in outcomes] == ["enrolled"] * 3 + ["pool-exhausted"]
    assert len({o["public_ip"] for o in outcomes[:3]}) == 3
    assert world.items("instance")[ids[3]]["status"]["S"] == "pool-exhausted"
    assert ids[3] not in world.fleet.routes


def test_unmanaged_instance_events_write_nothing(world):
    other = world.launch("10.10.1.30", tags={"Name": "db"})
    [outcome] = handler(state_change(other, "running"), Context())["outcomes"]
    assert outcome["managed"] is False
    assert world.all_items() == []
    assert world.fleet.calls == []


def test_instance_outside_the_gateway_subnet_gets_a_clear_status(world):
    spec = {"SubnetId": world.other_subnet_id, "PrivateIpAddress": "10.10.2.21"}
    tags = [{"ResourceType": "instance", "Tags": [{"Key": "tunnelnat", "Value": "enabled"}]}]
    reply = world.ec2.run_instances(
        ImageId="ami-12345678", MinCount=1, MaxCount=1, TagSpecifications=tags, **spec
    )
    far = reply["Instances"][0]["InstanceId"]
    [outcome] = handler(state_change(far, "running"), Context())["outcomes"]
    assert outcome["status"] == "unsupported-subnet"
    assert far not in world.fleet.routes, "never a host route that cannot work"
    assert world.items("instance")[far]["status"]["S"] == "unsupported-subnet"


def test_hostile_tag_value_gets_a_status_and_reaches_no_command(world):
    web1 = world.launch("10.10.1.21", tags={"tunnelnat": "enabled; rm -rf /"})
    [outcome] = handler(state_change(web1, "running"), Context())["outcomes"]
    assert outcome["status"] == "invalid-tag"
    assert world.fleet.calls == []


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2"},
        "not json",
        {"detail-type": "Something Else", "source": "aws.s3"},
        {
            **state_change("i-0123456789abcdef0", "running"),
            "detail": {"instance-id": "i-$(reboot)", "state": "running"},
        },
        tag_change("i-0123456789abcdef0", {}) | {"resources": ["arn:aws:s3:::bucket"]},
    ],
)
def test_malformed_events_are_rejected_clearly_and_write_nothing(world, event):
    result = handler(event, Context())
    assert result["rejected"]
    assert world.all_items() == []
    assert world.fleet.calls == []


def test_sqs_batch_reports_only_retryable_failures(world):
    good = world.launch("10.10.1.21", tags=TAG)
    flaky = world.launch("10.10.1.22", tags=TAG)
    world.fleet.not_ready.add(flaky)
    batch = sqs_batch(state_change(good, "running"), "garbage", state_change(flaky, "running"))
    result = handler(batch, Context())
    # The garbage can never succeed: dropped, not retried. The flaky one is retried.
    assert result == {"batchItemFailures": [{"itemIdentifier": "m-2"}]}
    assert world.items("instance")[good]["status"]["S"] == "enrolled"


def test_failed_gateway_sync_is_raised_for_redelivery(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.failing.add("SyncNatTable")
    with pytest.raises(CommandError, match="SyncNatTable Failed"):
        handler(state_change(web1, "running"), Context())
    world.fleet.failing.clear()
    assert handler(state_change(web1, "running"), Context())["outcomes"][0]["status"] == "enrolled"
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}


def test_outcome_is_json_serialisable(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    json.dumps(handler(state_change(web1, "running"), Context()))


def test_deeply_nested_body_is_dropped_and_the_good_event_beside_it_enrols(world):
    """Issue 14, finding 3: json's parser raised RecursionError out of the handler, the whole
    batch failed and both messages ended in the DLQ without a reason."""
    good = world.launch("10.10.1.21", tags=TAG)
    nested = "[" * 100_000 + "]" * 100_000
    result = handler(sqs_batch(nested, state_change(good, "running")), Context())
    assert result == {"batchItemFailures": []}, "the nested body is dropped, never retried"
    assert world.items("instance")[good]["status"]["S"] == "enrolled"


def test_events_naming_a_zone_and_events_naming_none_share_a_batch(world):
    """Comparing a naive time with an aware one raised TypeError out of the handler."""
    web1 = world.launch("10.10.1.21", tags=TAG)
    naive = state_change(web1, "running") | {"time": "2026-11-25T12:00:00"}
    result = handler(sqs_batch(naive, state_change(web1, "running")), Context())
    assert result == {"batchItemFailures": []}
    assert world.items("instance")[web1]["status"]["S"] == "enrolled"
