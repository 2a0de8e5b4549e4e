"""Issue 16's one enrolment in few calls, and issue 15's pair: the new paths and their races.

- the instance lease taken with the mapping write, conditional on its epoch as read (another
  worker that took it between our read and our write wins; nothing of ours is written);
- the pool address picked from the claimed count without reading every claim, and the fallback
  when it was taken (AddressTaken: the claims are read, the lowest free one taken);
- the claimed count on meta/generation kept exact by every mapping write;
- SyncNatTable on both gateways of the pair in one command: the active's report decides, a
  standby's failure is counted (StandbySyncFailures) and never fails the enrolment.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address

import boto3
import pytest

from tests.conftest import VALID_CONFIG
from tests.lambdas.conftest import REGION, TABLE, FakeFleet
from tests.lambdas.events import Context, state_change
from tunnelnat.adapters.commands import CommandResult
from tunnelnat.adapters.ec2 import Ec2Instances
from tunnelnat.adapters.store import (
    EnrolmentStore,
    InstanceBusy,
    LeaseLost,
    MappingChange,
    StoredMapping,
)
from tunnelnat.controller import Controller
from tunnelnat.core.config import TunnelnatConfig
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}


def _store(world) -> EnrolmentStore:
    return EnrolmentStore(world.dynamodb, TABLE)


def test_a_lease_taken_by_another_worker_since_the_read_cancels_the_write(world):
    store = _store(world)
    snap = store.snapshot_many(["i-0aaaaaaaaaaaaaaaa"], leases=True)
    epoch = snap.leases["i-0aaaaaaaaaaaaaaaa"].epoch
    assert epoch is None
    # Another worker takes the lease and gives it back between our read and our write.
    store.acquire_lease("i-0aaaaaaaaaaaaaaaa", "rival")
    store.release_lease("i-0aaaaaaaaaaaaaaaa", "rival")
    change = MappingChange(
        "i-0aaaaaaaaaaaaaaaa",
        StoredMapping(
            "i-0aaaaaaaaaaaaaaaa", IPv4Address("10.10.1.21"), IPv4Address("203.0.113.10")
        ),
        None,
    )
    with pytest.raises(LeaseLost) as lost:
        store.write_mappings([change], generation=snap.desired_generation, claim=True,
                             lease_owner="us", leases={"i-0aaaaaaaaaaaaaaaa": epoch})  # fmt: skip
    assert lost.value.instances == {"i-0aaaaaaaaaaaaaaaa"}
    assert world.items("mapping") == {} and world.items("address") == {}
    # Read again, the epoch is the rival's: now the write goes through and takes the lease.
    fresh = store.snapshot_many(["i-0aaaaaaaaaaaaaaaa"], leases=True)
    epoch = fresh.leases["i-0aaaaaaaaaaaaaaaa"].epoch
    store.write_mappings([change], generation=fresh.desired_generation, claim=True,
                         lease_owner="us", leases={"i-0aaaaaaaaaaaaaaaa": epoch})  # fmt: skip
    lease = world.items("lease")["i-0aaaaaaaaaaaaaaaa"]
    assert lease["owner"]["S"] == "us" and lease["epoch"]["N"] == "2"


def test_a_worker_racing_between_our_read_and_our_write_leaves_us_busy(world, monkeypatch):
    """Through the controller: the rival un-enrols nothing but takes the instance between our
    snapshot and our mapping write; we write nothing and the queue retries us."""
    web = world.launch("10.10.1.21", tags=TAG)
    store = handler_module._get_service().controller.store
    original = EnrolmentStore.snapshot_many
    rival = EnrolmentStore(world.dynamodb, TABLE)

    def then_rival(self, ids, *args, **kwargs):
        snap = original(self, ids, *args, **kwargs)
        if kwargs.get("leases"):
            rival.acquire_lease(web, "rival")
            rival.release_lease(web, "rival")
        return snap

    monkeypatch.setattr(EnrolmentStore, "snapshot_many", then_rival)
    with pytest.raises(InstanceBusy):  # the queue delivers it again
        handler(state_change(web, "running"), Context())
    assert world.items("mapping") == {} and world.fleet.routes == {}
    monkeypatch.setattr(EnrolmentStore, "snapshot_many", original)
    [outcome] = handler(state_change(web, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert store.snapshot_many([web], leases=True).leases[web].owner is None  # given back


def test_the_guessed_address_taken_falls_back_to_the_lowest_free(world):
    """Claims fill the pool from the bottom, so the pool's k-th address is tried without a
    Query; a rival holding it (a hole below) cancels the write and the claims are read."""
    store = _store(world)
    first = world.launch("10.10.1.21", tags=TAG)
    [outcome] = handler(state_change(first, "running"), Context())["outcomes"]
    assert outcome["public_ip"] == "203.0.113.10"
    gen = world.items("meta")["generation"]
    assert gen["claimed_count"]["N"] == "1" and gen["claimed_generation"] == gen["generation"]
    # A rival claims .11 (the guess for k = 1) in a write that keeps the count, and .10 is
    # let go in another: k = 1 again, but .11 is taken and .10 is the free one.
    snap = store.snapshot_many([])
    rival = StoredMapping("i-0bbbbbbbbbbbbbbbb", IPv4Address("10.10.1.99"),
                          IPv4Address("203.0.113.11"))  # fmt: skip
    store.write_mappings([MappingChange(rival.instance_id, rival, None)],
                         generation=snap.desired_generation, claim=True,
                         claims_before=snap.claimed_count)  # fmt: skip
    world.ec2.terminate_instances(InstanceIds=[first])
    handler(state_change(first, "terminated"), Context())
    assert store.snapshot_many([]).claimed_count == 1
    second = world.launch("10.10.1.22", tags=TAG)
    [outcome] = handler(state_change(second, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled" and outcome["public_ip"] == "203.0.113.10"
    owners = {ip: i["instance_id"]["S"] for ip, i in world.items("address").items()}
    assert owners == {"203.0.113.10": second, "203.0.113.11": rival.instance_id}
    assert store.snapshot_many([]).claimed_count == 2


def test_one_enrolment_reads_no_claims_and_no_gateway_of_its_own(world, monkeypatch):
    """Once the table knows the gateway and the count: no Query, one DescribeInstances."""
    calls: list[str] = []
    session = boto3.session.Session(region_name=REGION)
    session.events.register("before-call", lambda model=None, **_: calls.append(model.name))
    fleet = world.fleet
    first = world.launch("10.10.1.21", tags=TAG)
    handler_module.use_controller(handler_module.build_controller(commands=fleet))
    handler(state_change(first, "running"), Context())
    # A cold container, counted.
    handler_module.use_controller(handler_module.build_controller(commands=fleet, session=session))
    second = world.launch("10.10.1.22", tags=TAG)
    [outcome] = handler(state_change(second, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled" and outcome["public_ip"] == "203.0.113.11"
    assert "Query" not in calls and "PutItem" not in calls
    assert calls.count("DescribeInstances") == 1
    assert calls.count("TransactWriteItems") == 2  # the mapping (with both leases), the finish


class PairFleet(FakeFleet):
    """Two gateways: the ENI's holder applies; the standby applies too, or fails."""

    standby: str = ""
    standby_fails: bool = False
    standby_applied: int = -1

    def _run(self, instance_id, document, parameters):
        if document == "SyncNatTable" and instance_id == self.standby:
            self.calls.append((instance_id, document))
            if self.standby_fails:
                return CommandResult(instance_id, document, "Failed", stderr="standby down")
            self.standby_applied = int(json.loads(
                super()._run(self.gateway_id, document, parameters).stdout
            )["applied_generation"])  # fmt: skip
            self.calls.pop()
            report = json.dumps({"applied_generation": self.standby_applied})
            return CommandResult(instance_id, document, "Success", stdout=report)
        return super()._run(instance_id, document, parameters)

    def run_many(self, instance_ids, document, parameters):
        out = {}
        for instance_id in instance_ids:
            try:
                out[instance_id] = self.run(instance_id, document, parameters)
            except Exception as exc:  # noqa: BLE001
                out[instance_id] = exc
        self.batches.append((tuple(instance_ids), document))
        return out


class Counted:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, name: str, value: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + value

    def measure(self, name: str, value: float, unit: str) -> None:
        pass

    def failure(self, reason: str) -> None:
        self.counts[f"failure:{reason}"] = self.counts.get(f"failure:{reason}", 0) + 1


GATEWAY_TAGS = {"tunnelnat:role": "gateway", "tunnelnat:deployment": "test"}


class GroupInstances(Ec2Instances):
    """moto refuses the aws: tag prefix: every tagged gateway in our VPC counts as a member
    of the gateway's group here (the group check itself is ec2.py's, tested in isolation)."""

    def _is_standby(self, raw: dict) -> bool:
        return self._is_member(raw)


def _pair(world, *, standby_fails: bool = False, standby: str | None = None):
    standby = standby or world.launch("10.10.1.11", tags=GATEWAY_TAGS)
    fleet = PairFleet(world.dynamodb, gateway_id=world.gateway_id)
    fleet.standby, fleet.standby_fails, fleet.batches = standby, standby_fails, []
    telemetry = Counted()
    controller = Controller(
        TunnelnatConfig.model_validate(VALID_CONFIG),
        store=EnrolmentStore(world.dynamodb, TABLE),
        instances=GroupInstances(
            world.ec2, gateway_ip=IPv4Address(VALID_CONFIG["gateway_private_ip"]),
            vpc_id=world.vpc_id,
        ),
        commands=fleet, deployment="test", region=REGION, telemetry=telemetry,
        vpc_id=world.vpc_id,
    )  # fmt: skip
    return controller, fleet, standby, telemetry


def test_the_pair_is_synced_in_one_command_and_the_active_decides(world):
    controller, fleet, standby, telemetry = _pair(world)
    web = world.launch("10.10.1.21", tags=TAG)
    outcome = controller.reconcile(web)
    assert outcome.status == "enrolled"
    assert ((world.gateway_id, standby), "SyncNatTable") in fleet.batches
    assert fleet.standby_applied == outcome.generation
    meta = world.items("meta")["gateway"]
    assert meta["gateway_instance_id"]["S"] == world.gateway_id
    assert [v["S"] for v in meta["standby_ids"]["L"]] == [standby]
    # A cold container learns both from the table; after a failover (G on the standby) the
    # same DescribeInstances that observes the instances says so: the standby is the active.
    world.hold_g(standby)
    cold, fleet2, _, _ = _pair(world, standby=standby)
    fleet2.gateway_id, fleet2.standby = standby, world.gateway_id
    other = world.launch("10.10.1.22", tags=TAG)
    assert cold.reconcile(other).status == "enrolled"
    assert ((standby, world.gateway_id), "SyncNatTable") in fleet2.batches
    assert world.items("meta")["gateway"]["gateway_instance_id"]["S"] == standby


def test_a_standby_that_fails_its_sync_is_counted_and_never_fails_the_enrolment(world):
    controller, fleet, standby, telemetry = _pair(world, standby_fails=True)
    web = world.launch("10.10.1.21", tags=TAG)
    outcome = controller.reconcile(web)
    assert outcome.status == "enrolled" and outcome.gateway_synced
    assert telemetry.counts.get("StandbySyncFailures") == 1
    assert not [k for k in telemetry.counts if k.startswith("failure:")]


def test_more_than_two_gateways_are_reported_and_none_holding_g_is_not_found(world):
    controller, fleet, standby, telemetry = _pair(world)
    third = world.launch("10.10.1.12", tags=GATEWAY_TAGS)
    active, others = controller.instances.find_gateways("test")
    assert active == world.gateway_id and others == sorted([standby, third])
    controller.gateway_id(refresh=True)
    assert telemetry.counts.get("ExtraGateways") == 1
    # Nobody holds G: not found (reported), never a guess.
    from tunnelnat.adapters.ec2 import GatewayNotFound

    [interface] = world.ec2.describe_network_interfaces(NetworkInterfaceIds=[world.eni_id])[
        "NetworkInterfaces"
    ]
    world.ec2.detach_network_interface(AttachmentId=interface["Attachment"]["AttachmentId"],
                                       Force=True)  # fmt: skip
    with pytest.raises(GatewayNotFound):
        controller.instances.find_gateways("test")


def test_a_warm_controller_finds_a_gateway_added_after_its_lookup(world):
    """Issue 20: a container confirms its gateways at every sync, but only among those it knew.
    A standby that appeared after its lookup (a rolling replacement's new gateway) got no sync
    from it, fell behind the table and was never a ready standby. The list is looked up again
    once it is a minute old (one DescribeInstances a minute)."""
    from tunnelnat import gateway_sync

    controller, fleet, _, _ = _pair(world, standby="i-0000000000000dead")  # not in EC2 yet
    now = [1000.0]
    controller.gateway.clock = lambda: now[0]
    first = world.launch("10.10.1.21", tags=TAG)
    assert controller.reconcile(first).status == "enrolled"
    assert not [b for b in fleet.batches if len(b[0]) > 1]  # the active alone
    new = world.launch("10.10.1.12", tags=GATEWAY_TAGS)
    fleet.standby = new
    now[0] += gateway_sync.GATEWAYS_MAX_AGE_SECONDS / 2  # still trusted: the active alone
    second = world.launch("10.10.1.22", tags=TAG)
    assert controller.reconcile(second).status == "enrolled"
    assert not [b for b in fleet.batches if new in b[0]]
    now[0] += gateway_sync.GATEWAYS_MAX_AGE_SECONDS  # older than a minute: looked up again
    third = world.launch("10.10.1.23", tags=TAG)
    assert controller.reconcile(third).status == "enrolled"
    assert ((world.gateway_id, new), "SyncNatTable") in fleet.batches
