"""Issue 6's controller budget: a batch costs a fixed number of AWS calls, one command reaches
many instances, and gateway syncs coalesce (one in flight; the others' changes ride on it)."""

from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address

import boto3
import pytest
from botocore.stub import Stubber

from tests.lambdas.conftest import REGION, TABLE
from tests.lambdas.events import Context, sqs_batch, state_change
from tunnelnat.adapters.commands import AgentNotReady, CommandResult, SsmCommands
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.controller import GatewaySyncPending
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}
A, B = "i-0123456789abcdef0", "i-0123456789abcdef1"
COMMAND = "0b9c7e1a-2f3d-4c5b-8a6e-7f8091a2b3c4"


def stubbed() -> tuple[object, SsmCommands]:
    ssm = boto3.client("ssm", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    return ssm, SsmCommands(ssm, document_prefix="tn-", sleep=lambda _: None)


def test_run_many_sends_one_command_and_polls_it_as_a_whole():
    ssm, commands = stubbed()
    with Stubber(ssm) as stub:
        stub.add_response("send_command", {"Command": {"CommandId": COMMAND}})
        stub.add_response("list_commands", {"Commands": [{"Status": "InProgress"}]})
        stub.add_response("list_commands", {"Commands": [{"Status": "Success"}]})
        results = commands.run_many([A, B], "AddHostRoute", {"Gateway": "10.10.1.5"})
    assert {i: r.status for i, r in results.items()} == {A: "Success", B: "Success"}


def test_run_many_asks_each_instance_only_when_the_command_did_not_succeed():
    ssm, commands = stubbed()
    with Stubber(ssm) as stub:
        stub.add_response("send_command", {"Command": {"CommandId": COMMAND}})
        stub.add_response("list_commands", {"Commands": [{"Status": "Failed"}]})
        stub.add_response("get_command_invocation", {"Status": "Success"})
        stub.add_response(
            "get_command_invocation", {"Status": "Failed", "StandardErrorContent": "no route"}
        )
        results = commands.run_many([A, B], "AddHostRoute", {"Gateway": "10.10.1.5"})
    assert results[A].ok and not results[B].ok and results[B].stderr == "no route"


def test_run_many_falls_back_per_instance_when_an_agent_is_not_registered():
    ssm, commands = stubbed()
    with Stubber(ssm) as stub:
        stub.add_client_error("send_command", "InvalidInstanceId")  # the whole call fails
        stub.add_response("send_command", {"Command": {"CommandId": COMMAND}})
        stub.add_response("get_command_invocation", {"Status": "Success"})
        stub.add_client_error("send_command", "InvalidInstanceId")
        results = commands.run_many([A, B], "AddHostRoute", {"Gateway": "10.10.1.5"})
    assert isinstance(results[A], CommandResult) and results[A].ok
    assert isinstance(results[B], AgentNotReady)


class Counted:
    """A boto3 session whose API calls are counted (botocore's before-call hook)."""

    def __init__(self) -> None:
        self.session = boto3.session.Session(region_name=REGION)
        self.calls: Counter[str] = Counter()
        self.session.events.register("before-call", self._count)

    def _count(self, model=None, **_kw) -> None:
        self.calls[f"{model.service_model.service_name}:{model.name}"] += 1


@pytest.fixture
def counted(world):
    counter = Counted()
    controller = handler_module.build_controller(commands=world.fleet, session=counter.session)
    handler_module.use_controller(controller)
    return counter


def test_a_batch_of_ten_enrolments_costs_a_fixed_number_of_calls(world, counted):
    ids = [world.launch(f"10.10.1.{30 + k}", tags=TAG) for k in range(10)]
    world.fleet.gateway_id = world.gateway_id
    # The pool has 3 addresses: 3 enrolled, 7 pool-exhausted; either way one batch's work.
    result = handler(sqs_batch(*[state_change(i, "running") for i in ids]), Context())
    assert result == {"batchItemFailures": []}
    calls = counted.calls
    # leases; mappings (and the sync lease); records, leases and the sync's release (checking
    # nobody wrote meanwhile)
    assert calls["dynamodb:TransactWriteItems"] == 3, calls
    # The sync lease is taken in the mapping transaction (no sync was in flight): no call.
    assert calls["dynamodb:UpdateItem"] == 0, calls
    assert calls["dynamodb:BatchGetItem"] == 1, calls
    assert calls["ec2:DescribeInstances"] == 2, calls  # the instances, the gateway (once)
    assert calls["ec2:CreateTags"] == 2, calls  # one per status value
    assert sum(calls.values()) <= 11, calls
    assert world.fleet.syncs() == 1

    # Delivered again: nothing changed, so no mapping write, no record write, no tag, no sync.
    calls.clear()
    handler(sqs_batch(*[state_change(i, "running") for i in ids]), Context())
    assert calls["ec2:CreateTags"] == 0 and world.fleet.syncs() == 1, calls
    assert calls["dynamodb:TransactWriteItems"] == 2, calls  # leases; their release alone


def test_a_sync_in_flight_makes_the_others_wait_for_it(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    store = EnrolmentStore(world.dynamodb, TABLE)
    assert store.begin_sync("another-worker") is not None
    result = handler(sqs_batch(state_change(web1, "running")), Context())
    assert result == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert set(world.items("mapping")) == {web1}, "its mapping is written, ready for the sync"
    assert world.fleet.syncs() == 0, "no second sync while one is in flight"
    assert world.items("instance") == {}, "nothing recorded as enrolled yet"
    # The holder's sync applies the table and lets go; the redelivery finds it applied.
    handler_module._get_service().controller.sync_gateway()
    store.end_sync("another-worker", applied=None, gateway_id=None)
    syncs = world.fleet.syncs()
    assert handler(sqs_batch(state_change(web1, "running")), Context()) == {"batchItemFailures": []}
    assert world.fleet.syncs() == syncs, "the redelivery needed no sync of its own"
    assert world.items("instance")[web1]["status"]["S"] == "enrolled"


def test_a_sync_pending_is_never_dead_lettered(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    EnrolmentStore(world.dynamodb, TABLE).begin_sync("another-worker")
    batch = sqs_batch(state_change(web1, "running"))
    batch["Records"][0]["attributes"]["ApproximateReceiveCount"] = str(handler_module.MAX_ATTEMPTS)
    assert handler(batch, Context()) == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert world.items("instance") == {}, "not marked failed"


def test_changes_written_during_a_sync_get_a_trailing_sync_before_the_lease_is_let_go(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    rival = EnrolmentStore(world.dynamodb, TABLE)
    original = world.fleet._run
    written = []

    def run(instance_id, document, parameters):
        reply = original(instance_id, document, parameters)
        if document == "SyncNatTable" and not written:
            # Another worker writes while our sync runs (and, finding it in flight, waits).
            rival.put_mapping("i-0aaaaaaaaaaaaaaaa", IPv4Address("10.10.1.99"),
                              IPv4Address("203.0.113.12"), claim=True, previous=None)  # fmt: skip
            written.append(True)
        return reply

    world.fleet._run = run
    handler(state_change(web1, "running"), Context())
    assert world.fleet.syncs() == 2
    assert ("10.10.1.99", "203.0.113.12") in world.fleet.applied_pairs()
    applied, _ = rival.gateway_state()
    assert applied == rival.desired_generation()
    assert "sync_owner" not in world.items("meta")["gateway"], "the lease was let go"
    # Its own work was recorded first (the release rides on the run's last write, which found
    # the generation moved: the trailing sync came after).
    assert world.items("instance")[web1]["status"]["S"] == "enrolled"


def test_sync_pending_is_a_retry_not_an_error_of_the_instance():
    assert not issubclass(GatewaySyncPending, (AgentNotReady,))


def test_a_lost_generation_bump_is_retried_with_the_generation_dynamodb_returned(world):
    from tunnelnat.adapters.store import GenerationMoved, MappingChange, StoredMapping

    ours, theirs = EnrolmentStore(world.dynamodb, TABLE), EnrolmentStore(world.dynamodb, TABLE)
    seen = ours.desired_generation()
    theirs.put_mapping("i-0bbbbbbbbbbbbbbbb", IPv4Address("10.10.1.98"),
                       IPv4Address("203.0.113.11"), claim=True, previous=None)  # fmt: skip
    mine = StoredMapping(
        "i-0aaaaaaaaaaaaaaaa", IPv4Address("10.10.1.99"), IPv4Address("203.0.113.10")
    )
    change = MappingChange(mine.instance_id, mine, None)
    with pytest.raises(GenerationMoved) as moved:
        ours.write_mappings([change], generation=seen, claim=True)
    assert moved.value.current == seen + 1
    assert ours.write_mappings([change], generation=moved.value.current, claim=True) == seen + 2
    assert set(world.items("address")) == {"203.0.113.10", "203.0.113.11"}


def test_the_sync_lease_rides_on_the_mapping_write_and_never_takes_one_held(world):
    from tunnelnat.adapters.store import MappingChange, StoredMapping, SyncLeaseBusy

    ours, theirs = EnrolmentStore(world.dynamodb, TABLE), EnrolmentStore(world.dynamodb, TABLE)
    mine = StoredMapping(
        "i-0aaaaaaaaaaaaaaaa", IPv4Address("10.10.1.99"), IPv4Address("203.0.113.10")
    )
    change = MappingChange(mine.instance_id, mine, None)
    assert theirs.begin_sync("their-sync") is not None
    assert ours.snapshot_many([]).sync_in_flight
    with pytest.raises(SyncLeaseBusy):
        ours.write_mappings([change], generation=0, claim=True, sync_owner="our-run")
    assert world.items("mapping") == {}, "nothing of the cancelled write landed"
    assert ours.write_mappings([change], generation=0, claim=True) == 1
    theirs.end_sync("their-sync", applied=None, gateway_id=None)
    assert not ours.snapshot_many([]).sync_in_flight
    other = StoredMapping(
        "i-0bbbbbbbbbbbbbbbb", IPv4Address("10.10.1.98"), IPv4Address("203.0.113.11")
    )
    gen = ours.write_mappings([MappingChange(other.instance_id, other, None)], generation=1,
                              claim=True, sync_owner="our-run")  # fmt: skip
    assert gen == 2 and ours.snapshot_many([]).sync_in_flight
    assert theirs.begin_sync("their-sync") is None, "ours now: the next sync waits"
    assert ours.begin_sync("our-run") is not None


def test_the_controller_retries_a_lost_bump_without_reading_again(world, counted, monkeypatch):
    from tunnelnat.adapters.store import GenerationMoved

    web1 = world.launch("10.10.1.21", tags=TAG)
    original = EnrolmentStore.write_mappings
    lost = []

    def racing(self, changes, *, generation, claim, **kwargs):
        if not lost:
            lost.append(generation)
            raise GenerationMoved("a rival bumped first", generation)
        return original(self, changes, generation=generation, claim=claim, **kwargs)

    monkeypatch.setattr(EnrolmentStore, "write_mappings", racing)
    assert handler(sqs_batch(state_change(web1, "running")), Context()) == {"batchItemFailures": []}
    assert counted.calls["dynamodb:BatchGetItem"] == 1, "no re-read after a lost bump"
    assert world.items("instance")[web1]["status"]["S"] == "enrolled"
