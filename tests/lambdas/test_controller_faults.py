"""What AWS really does to a controller: each fault converges, or ends in the DLQ with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import Stubber

from tests.lambdas.conftest import REGION
from tests.lambdas.events import Context, sqs_batch, state_change, tag_change
from tunnelnat.adapters.autoscaling import ActionState
from tunnelnat.adapters.commands import AgentNotReady, CommandError, SsmCommands
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}


def lifecycle_event(instance_id: str, *, launching: bool, age_s: float = 0) -> dict:
    kind = "launch" if launching else "terminate"
    transition = "LAUNCHING" if launching else "TERMINATING"
    when = datetime.now(UTC) - timedelta(seconds=age_s)
    return {
        "version": "0",
        "id": f"lc-{instance_id}-{kind}",
        "detail-type": f"EC2 Instance-{kind} Lifecycle Action",
        "source": "aws.autoscaling",
        "account": "123456789012",
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [],
        "detail": {
            "LifecycleActionToken": "c3b7e4a2-1111-2222-3333-444455556666",
            "AutoScalingGroupName": "web-asg",
            "LifecycleHookName": "tunnelnat-test-launch",  # deployment "test" (conftest)
            "EC2InstanceId": instance_id,
            "LifecycleTransition": f"autoscaling:EC2_INSTANCE_{transition}",
        },
    }


class FakeLifecycle:
    """moto implements neither CompleteLifecycleAction nor heartbeats, and never holds an
    instance in Pending:Wait; this records the calls and says the action is open."""

    def __init__(self):
        self.completed: list[tuple[str, str]] = []
        self.heartbeats: list[str] = []
        self.state = ActionState(waiting=True, heartbeat_timeout=3600, global_timeout=172800)

    def complete(self, action, result):
        self.completed.append((action.instance_id, result))

    def heartbeat(self, action):
        self.heartbeats.append(action.instance_id)

    def describe(self, action):
        return self.state


@pytest.fixture
def lifecycle(world):
    fake = FakeLifecycle()
    controller = handler_module._get_service().controller
    handler_module.use_controller(controller, lifecycle=fake)
    return fake


def batch_from(queue_arn: str, *events, receive_count: int = 1) -> dict:
    batch = sqs_batch(*events)
    for record in batch["Records"]:
        record["eventSourceARN"] = queue_arn
        record["attributes"]["ApproximateReceiveCount"] = str(receive_count)
    return batch


def test_agent_not_registered_for_the_first_attempts(world, queues):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready_for[web1] = 2
    arn = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"
    for attempt in (1, 2):
        result = handler(
            batch_from(arn, state_change(web1, "running"), receive_count=attempt), Context()
        )
        assert result == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
        assert world.items("instance")[web1]["status"]["S"] == "pending-ssm"
    result = handler(batch_from(arn, state_change(web1, "running"), receive_count=3), Context())
    assert result == {"batchItemFailures": []}
    assert world.items("instance")[web1]["status"]["S"] == "enrolled"
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}


def test_a_command_that_keeps_failing_lands_in_the_dlq_with_a_reason(world, queues):
    sqs, _, dlq = queues
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.failing.add("AddHostRoute")
    arn = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"
    event = state_change(web1, "running")
    assert handler(batch_from(arn, event, receive_count=1), Context())["batchItemFailures"]
    last = handler(batch_from(arn, event, receive_count=handler_module.MAX_ATTEMPTS), Context())
    assert last == {"batchItemFailures": []}, "parked in the DLQ, not retried forever"
    [message] = sqs.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"])["Messages"]
    body = json.loads(message["Body"])
    assert body["instance_ids"] == [web1]
    assert "AddHostRoute Failed" in body["reason"]
    assert json.loads(body["event"])["id"] == event["id"]
    record = world.items("instance")[web1]
    assert record["status"]["S"] == "failed"
    assert "AddHostRoute" in record["reason"]["S"]


def test_lambda_killed_between_the_table_and_the_gateway(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.crash_on.add("SyncNatTable")
    with pytest.raises(SystemExit):
        handler(state_change(web1, "running"), Context())
    assert set(world.items("mapping")) == {web1}, "the table was written"
    assert world.fleet.applied_pairs() == set(), "the gateway never heard of it"
    # SQS redelivers the same message: the next run sees the gateway behind and finishes.
    [outcome] = handler(state_change(web1, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled" and outcome["gateway_synced"] is True
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}


def test_conditional_write_conflict_moves_to_the_next_address(world, monkeypatch):
    """Another worker claims the address between our read of the pool and our write."""
    web1 = world.launch("10.10.1.21", tags=TAG)
    store = handler_module._get_service().controller.store
    original = EnrolmentStore.snapshot_many
    rival = EnrolmentStore(world.dynamodb, store.table_name)

    def then_rival(self, ids, *args, **kwargs):
        seen = original(self, ids, *args, **kwargs)
        if kwargs.get("leases") and not rival.mappings():
            from ipaddress import IPv4Address

            rival.put_mapping(
                "i-0aaaaaaaaaaaaaaaa",
                IPv4Address("10.10.1.99"),
                IPv4Address("203.0.113.10"),
                claim=True,
                previous=None,
            )
        return seen

    monkeypatch.setattr(EnrolmentStore, "snapshot_many", then_rival)
    [outcome] = handler(state_change(web1, "running"), Context())["outcomes"]
    # After a conflict any free address will do (workers that all retried the lowest one
    # would keep colliding in a burst).
    assert outcome["public_ip"] in ("203.0.113.11", "203.0.113.12")
    owners = {ip: item["instance_id"]["S"] for ip, item in world.items("address").items()}
    assert owners == {"203.0.113.10": "i-0aaaaaaaaaaaaaaaa", outcome["public_ip"]: web1}


def test_throttled_send_command_is_retryable():
    ssm = boto3.client("ssm", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    commands = SsmCommands(ssm, sleep=lambda _: None)
    with Stubber(ssm) as stub:
        stub.add_client_error("send_command", "ThrottlingException", http_status_code=400)
        with pytest.raises(CommandError) as err:
            commands.run("i-0123456789abcdef0", "AddHostRoute", {"Gateway": "10.10.1.5"})
    assert err.value.retryable
    with Stubber(ssm) as stub:
        stub.add_client_error("send_command", "InvalidInstanceId", http_status_code=400)
        with pytest.raises(AgentNotReady):
            commands.run("i-0123456789abcdef0", "AddHostRoute", {"Gateway": "10.10.1.5"})


def test_ssm_adapter_polls_until_the_command_ends():
    ssm = boto3.client("ssm", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    commands = SsmCommands(ssm, document_prefix="tn-", sleep=lambda _: None)
    with Stubber(ssm) as stub:
        stub.add_response(
            "send_command",
            {"Command": {"CommandId": "0b9c7e1a-2f3d-4c5b-8a6e-7f8091a2b3c4"}},
            {
                "InstanceIds": ["i-0123456789abcdef0"],
                "DocumentName": "tn-SyncNatTable",
                "Parameters": {"TableName": ["t1"]},
                "TimeoutSeconds": 120,
                "Comment": "tunnelnat SyncNatTable",
            },
        )
        stub.add_client_error("get_command_invocation", "InvocationDoesNotExist")
        stub.add_response("get_command_invocation", {"Status": "InProgress"})
        stub.add_response(
            "get_command_invocation",
            {"Status": "Success", "StandardOutputContent": '{"applied_generation": 3}'},
        )
        result = commands.run("i-0123456789abcdef0", "SyncNatTable", {"TableName": "t1"})
    assert result.ok and "applied_generation" in result.stdout


def test_gateway_rebooted_with_an_empty_table_is_repaired_by_the_schedule(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web1, "running"), Context())
    world.fleet.applied = None  # reboot: the kernel's table is gone
    scheduled = {**state_change(web1, "running"), "detail-type": "Scheduled Event"}
    scheduled.update(source="aws.events", detail={})
    handler(scheduled, Context())
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}


def test_gateway_replaced_keeps_every_mapping(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web1, "running"), Context())
    world.ec2.terminate_instances(InstanceIds=[world.gateway_id])
    tags = {"tunnelnat:role": "gateway", "tunnelnat:deployment": "test"}
    new_gateway = world.launch("10.10.1.11", tags=tags)
    world.hold_g(new_gateway)
    world.fleet.gateway_id = new_gateway
    world.fleet.applied = None  # a new instance: nothing applied yet
    scheduled = {**state_change(web1, "running"), "detail-type": "Scheduled Event"}
    scheduled.update(source="aws.events", detail={})
    handler(scheduled, Context())
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}
    assert world.items("meta")["gateway"]["gateway_instance_id"]["S"] == new_gateway


def test_full_reconcile_repairs_missed_events_in_both_directions(world):
    missed = world.launch("10.10.1.21", tags=TAG)  # its event was lost
    stale = world.launch("10.10.1.22", tags=TAG)
    handler(state_change(stale, "running"), Context())
    world.ec2.terminate_instances(InstanceIds=[stale])  # and that event was lost too
    scheduled = {**state_change(missed, "running"), "detail-type": "Scheduled Event"}
    scheduled.update(source="aws.events", detail={})
    handler(scheduled, Context())
    assert set(world.items("mapping")) == {missed}
    [(private, public)] = world.fleet.applied_pairs()
    assert private == "10.10.1.21"
    assert set(world.items("address")) == {public}, "the stale claim was released"


def test_manual_reconcile_request(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    request = {
        **state_change(web1, "running"),
        "source": "tunnelnat.cli",
        "detail-type": "tunnelnat Reconcile Request",
        "detail": {"instance-ids": [web1]},
    }
    [outcome] = handler(request, Context())["outcomes"]
    assert outcome["status"] == "enrolled"


def test_launch_is_held_until_enrolled_then_continued(world, lifecycle):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready_for[web1] = 1
    with pytest.raises(AgentNotReady):
        handler(lifecycle_event(web1, launching=True), Context())
    assert lifecycle.heartbeats == [web1] and lifecycle.completed == []
    handler(lifecycle_event(web1, launching=True), Context())
    assert lifecycle.completed == [(web1, "CONTINUE")]
    assert world.fleet.routes[web1] and world.fleet.applied_pairs()


def test_launch_that_cannot_enrol_is_abandoned_before_the_hook_times_out(world, lifecycle):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready.add(web1)
    # The hook's own limit (HeartbeatTimeout 6 s: GlobalTimeout 600 s) ends before the
    # controller's next try could: it abandons now rather than leave the hook's default.
    lifecycle.state = ActionState(waiting=True, heartbeat_timeout=6, global_timeout=600)
    handler(lifecycle_event(web1, launching=True), Context())
    assert lifecycle.completed == [(web1, "ABANDON")]


def test_a_delayed_launch_event_gets_a_heartbeat_not_an_abandon(world, lifecycle):
    """Issue 14, finding 6: the time left was computed from the event's time, so an event
    delivered (or redriven from the DLQ) an hour late abandoned a launch at once."""
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready.add(web1)
    with pytest.raises(AgentNotReady):
        handler(lifecycle_event(web1, launching=True, age_s=3600), Context())
    assert lifecycle.completed == [] and lifecycle.heartbeats == [web1]


def test_a_lifecycle_action_that_already_ended_is_left_alone(world, lifecycle):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready.add(web1)
    lifecycle.state = ActionState(waiting=False, heartbeat_timeout=3600, global_timeout=172800)
    with pytest.raises(AgentNotReady):  # the instance itself is still retried
        handler(lifecycle_event(web1, launching=True, age_s=3600), Context())
    assert lifecycle.completed == [] and lifecycle.heartbeats == []


def test_a_held_launch_is_abandoned_when_its_event_is_dead_lettered(world, lifecycle, queues):
    _, _, dlq = queues
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready.add(web1)
    arn = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"
    event = lifecycle_event(web1, launching=True)
    result = handler(batch_from(arn, event, receive_count=handler_module.MAX_ATTEMPTS), Context())
    assert result == {"batchItemFailures": []}
    assert lifecycle.completed == [(web1, "ABANDON")], "ended now, not at the hook's timeout"


def test_other_teams_lifecycle_hooks_are_never_answered(world, lifecycle):
    """Finding 6: every hook in the account reached the controller, which completed other
    teams' hooks (CodeDeploy, drain hooks) with CONTINUE."""
    web1 = world.launch("10.10.1.21", tags=TAG)
    event = lifecycle_event(web1, launching=True)
    event["detail"]["LifecycleHookName"] = "codedeploy-drain"
    assert "not this deployment's" in handler(event, Context())["rejected"]
    assert lifecycle.completed == [] and lifecycle.heartbeats == []
    assert world.fleet.calls == []


@pytest.mark.parametrize(
    "hook",
    [
        "tunnelnat-launch",
        "tunnelnat-other-launch",
        "tunnelnat-tes",
        "tunnelnat-test-2-launch",  # deployment test-2's: a prefix match would take it
        "tunnelnat-test-web-launch",
    ],
)
def test_another_deployments_lifecycle_hooks_are_never_answered(world, lifecycle, hook):
    """Issue 21, finding 4: the rule and the code took every ``tunnelnat-*`` hook, so A's
    controller completed B's launch hook (CONTINUE: B's instance in service, never enrolled by
    B). Only ``tunnelnat-<deployment>-launch`` and ``-terminate``, exactly, are ours."""
    web1 = world.launch("10.10.1.21")  # untagged: A would have released it at once
    event = lifecycle_event(web1, launching=True)
    event["detail"]["LifecycleHookName"] = hook
    assert "not this deployment's" in handler(event, Context())["rejected"]
    assert lifecycle.completed == [] and lifecycle.heartbeats == []
    assert world.fleet.calls == []


def test_untagged_launch_is_released_at_once(world, lifecycle):
    web1 = world.launch("10.10.1.21")
    handler(lifecycle_event(web1, launching=True), Context())
    assert lifecycle.completed == [(web1, "CONTINUE")]


def test_terminate_hook_removes_the_mapping_before_continuing(world, lifecycle):
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web1, "running"), Context())
    handler(lifecycle_event(web1, launching=False), Context())
    assert lifecycle.completed == [(web1, "CONTINUE")]
    assert world.items("mapping") == {} and world.items("address") == {}
    assert world.fleet.applied_pairs() == set()


def test_burst_in_one_batch_costs_one_gateway_sync(world):
    ids = [world.launch(f"10.10.1.{30 + i}", tags=TAG) for i in range(3)]
    arn = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"
    result = handler(batch_from(arn, *[state_change(i, "running") for i in ids]), Context())
    assert result == {"batchItemFailures": []}
    assert world.fleet.syncs() == 1
    assert len(world.fleet.applied_pairs()) == 3


@pytest.mark.parametrize("value", ["203.0.113.99", "enabled && reboot", "$(curl x)", "ENABLED"])
def test_bad_tag_values_get_a_status_and_nothing_else_breaks(world, value):
    bad = world.launch("10.10.1.21", tags={"tunnelnat": value})
    good = world.launch("10.10.1.22", tags=TAG)
    arn = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"
    events = [tag_change(bad, {"tunnelnat": value}), state_change(good, "running")]
    assert handler(batch_from(arn, *events), Context()) == {"batchItemFailures": []}
    assert world.items("instance")[bad]["status"]["S"] == "invalid-tag"
    assert world.items("instance")[good]["status"]["S"] == "enrolled"
    assert all(instance != bad for instance, _ in world.fleet.calls)
