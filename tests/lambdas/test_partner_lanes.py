"""Issue 23: a deployment with several partners, the controller's side, against moto's server.

Three lanes of deployment ``test`` (core/lanes.py), published as SSM parameters under
``/tunnelnat/test/partners`` as the stack publishes them, each with its own DynamoDB table:
- bank-a: 192.0.2.0/24 by its real network, a pool of its own;
- bank-b: an IKEv1 bank, one shared S;
- bank-c: 192.0.2.0/24 too (it overlaps bank-a), reached through its alias 100.64.1.0/24.

The handler runs with TUNNELNAT_PARTNERS_PATH set: one controller per lane. Commands go through a
fleet that keeps each instance's routes per scope (``<deployment>.<partner>``: the state file and
drop-in AddHostRoute names from it) and each lane table's applied generation on the gateway.
"""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from tests.lambdas.conftest import FakeFleet, create_enrolment_table
from tests.lambdas.events import Context, state_change, tag_change
from tests.lambdas.test_controller_faults import FakeLifecycle, batch_from, lifecycle_event
from tunnelnat.adapters.commands import CommandResult
from tunnelnat.adapters.store import EnrolmentStore
from tunnelnat.core.enrolment import Status
from tunnelnat.core.lanes import Lane, LaneError, parameter_path
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler
from tunnelnat.partner_lanes import (
    PartnerLanes,
    PartnersFailed,
    PartnersPending,
    combine,
    read_lanes,
)
from tunnelnat.plan import Outcome

REPO = Path(__file__).resolve().parents[2]
SCOPE = re.compile(
    yaml.safe_load((REPO / "ssm_documents" / "AddHostRoute.yaml").read_text())["parameters"][
        "Deployment"
    ]["allowedPattern"]
)
NET = "192.0.2.0/24"
ALIAS = "100.64.1.0/24"


def _lane(name: str, index: int, **kw) -> Lane:
    values = {
        "deployment": "test",
        "name": name,
        "index": index,
        "endpoint": IPv4Address(f"198.51.100.{40 + index}"),
        "networks": (IPv4Network(NET),),
        "aliases": (),
        "nat_mode": "dedicated",
        "pool": (),
        "shared_address": None,
        "tag_key": f"tunnelnat:partner:{name}",
        "ike_version": 2,
    }
    values.update(kw)
    return Lane(**values)


A = _lane("bank-a", 1, pool=(IPv4Address("203.0.113.10"), IPv4Address("203.0.113.11")))
B = _lane(
    "bank-b",
    2,
    networks=(IPv4Network("172.16.5.0/24"),),
    nat_mode="shared",
    shared_address=IPv4Address("203.0.113.30"),
    ike_version=1,
)
C = _lane(
    "bank-c",
    3,
    aliases=(IPv4Network(ALIAS),),
    pool=(IPv4Address("203.0.113.20"), IPv4Address("203.0.113.21")),
)
LANES = (A, B, C)
TAG = {lane.name: {lane.tag_key: "enabled"} for lane in LANES}


class LaneFleet(FakeFleet):
    """FakeFleet with the lanes' documents: routes per (instance, scope), applied generation
    per lane table (the gateway's per-partner state)."""

    def __init__(self, dynamodb):
        super().__init__(dynamodb)
        self.tables: dict[str, int] = {}  # lane table -> generation the gateway applied
        self.parameters: list[tuple[str, str, dict]] = []
        self.failing_scopes: set[str] = set()  # AddHostRoute fails for these scopes

    def _run(self, instance_id, document, parameters):
        self.calls.append((instance_id, document))
        self.parameters.append((instance_id, document, dict(parameters)))
        if instance_id in self.not_ready:
            from tunnelnat.adapters.commands import AgentNotReady

            raise AgentNotReady(f"{instance_id}: SSM agent not registered")
        if document in ("AddHostRoute", "RemoveHostRoute"):
            # What the documents accept (their allowedPattern): a partner's scope.
            assert SCOPE.fullmatch(parameters["Deployment"]), parameters
            state = (instance_id, parameters["Deployment"])
            if document == "AddHostRoute" and parameters["Deployment"] in self.failing_scopes:
                return CommandResult(instance_id, document, "Failed", stderr="boom")
            if document == "AddHostRoute":
                self.host[state] = set(parameters["Destinations"].split(","))
            else:
                self.host.pop(state, None)  # only this scope's file and routes
            return CommandResult(instance_id, document, "Success", stdout="{}")
        if document == "SyncNatTable":
            assert instance_id == self.gateway_id, "sync sent to something not the gateway"
            table = parameters["TableName"]
            # The desired generation, as the gateway's sync reads it (meta/generation).
            item = self.dynamodb.get_item(
                TableName=table,
                Key={"pk": {"S": "meta"}, "sk": {"S": "generation"}},
                ConsistentRead=True,
            ).get("Item")
            desired = int(item["generation"]["N"]) if item else 0
            self.tables[table] = desired
            report = {"applied_generation": desired, "action": "full"}
            return CommandResult(instance_id, document, "Success", stdout=json.dumps(report))
        raise AssertionError(f"unexpected document {document}")

    def synced_tables(self) -> set[str]:
        return {p["TableName"] for _, d, p in self.parameters if d == "SyncNatTable"}


@pytest.fixture
def lanes(world, monkeypatch):
    """The world's deployment ``test`` with three partners: their parameters and tables."""
    ssm = _client("ssm")
    for lane in LANES:
        ssm.put_parameter(Name=lane.parameter, Value=lane.to_json(), Type="String")
        create_enrolment_table(world.dynamodb, lane.table)
    monkeypatch.setenv("TUNNELNAT_PARTNERS_PATH", parameter_path("test"))
    fleet = LaneFleet(world.dynamodb)
    fleet.gateway_id = world.gateway_id
    world.fleet = fleet
    controller = handler_module.build_lanes(commands=fleet)
    world.lifecycle = FakeLifecycle()
    handler_module.use_controller(controller, lifecycle=world.lifecycle)
    yield world
    handler_module.use_controller(None)


def _client(name: str):
    import boto3

    return boto3.client(name, region_name="us-east-1")


def run(event: dict) -> dict:
    return handler(event, Context())


def outcome(event: dict) -> dict:
    [result] = run(event)["outcomes"]
    return result


def mappings(world, table: str) -> dict[str, str]:
    return {
        m.instance_id: str(m.public_ip) for m in EnrolmentStore(world.dynamodb, table).mappings()
    }


def desired(world, table: str) -> int:
    return EnrolmentStore(world.dynamodb, table).generations()[0]


def status_tags(world, instance_id: str) -> dict[str, str]:
    tags = world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])
    return {t["Key"]: t["Value"] for t in tags["Tags"] if t["Key"].startswith("tunnelnat:status")}


def test_an_instance_joins_two_partners_each_with_its_own_s_and_routes(lanes):
    world = lanes
    web = world.launch("10.10.1.21", tags={**TAG["bank-a"], **TAG["bank-c"]})
    result = outcome(state_change(web, "running"))
    assert result["status"] == "enrolled"
    assert set(result["partners"]) == {"bank-a", "bank-c"}, "bank-b never manages it"
    assert result["partners"]["bank-a"]["public_ip"] == "203.0.113.10"
    assert result["partners"]["bank-c"]["public_ip"] == "203.0.113.20"
    # One S each, from each partner's own pool, in each partner's own table.
    assert mappings(world, A.table) == {web: "203.0.113.10"}
    assert mappings(world, C.table) == {web: "203.0.113.20"}
    assert mappings(world, B.table) == {} and mappings(world, "tunnelnat-test") == {}
    # Routes per partner: A's real network, C's alias; both via G, each in its own scope.
    fleet = world.fleet
    assert fleet.host == {(web, "test.bank-a"): {NET}, (web, "test.bank-c"): {ALIAS}}
    adds = [p for _, d, p in fleet.parameters if d == "AddHostRoute"]
    assert {p["Gateway"] for p in adds} == {"10.10.1.5"}
    # The gateway pulled each changed lane's table, and only those.
    assert fleet.synced_tables() == {A.table, C.table}
    assert fleet.tables[A.table] >= 1 and fleet.tables[C.table] >= 1
    assert {i for i, d in fleet.calls if d == "SyncNatTable"} == {world.gateway_id}
    assert status_tags(world, web) == {A.status_tag: "enrolled", C.status_tag: "enrolled"}


def test_each_partners_pool_is_measured_under_its_name(lanes, capsys):
    from tests.lambdas.test_metrics import emf

    world = lanes
    web = world.launch("10.10.1.37", tags={**TAG["bank-a"], **TAG["bank-c"]})
    capsys.readouterr()
    run(state_change(web, "running"))
    points = [p for p in emf(capsys.readouterr().out) if p["name"] == "PoolFreeAddresses"]
    by_partner = {p["dims"].get("Partner"): p["value"] for p in points if "Partner" in p["dims"]}
    assert by_partner == {"bank-a": 1.0, "bank-c": 1.0}
    assert all(p["dims"]["Deployment"] == "test" for p in points)
    # The deployment's own line (no Partner dimension) is still there: the dashboard's.
    assert any("Partner" not in p["dims"] for p in points)


def test_partners_an_instance_never_joined_cost_no_call_to_ec2(lanes, monkeypatch):
    """With many partners, an event must not ask EC2 once per partner (DescribeInstances is
    throttled per account): one description up front, then only the lanes the instance
    joined (or that served it) observe it themselves."""
    world = lanes
    observed: list[str] = []
    for name, controller in handler_module._get_service().controller.controllers.items():
        original = controller._observe

        def counting(ids, _original=original, _name=name):
            observed.append(_name)
            return _original(ids)

        monkeypatch.setattr(controller, "_observe", counting)
    legacy = world.launch("10.10.1.38", tags=TAG["bank-b"])
    result = outcome(state_change(legacy, "running"))
    assert result["status"] == "enrolled" and set(result["partners"]) == {"bank-b"}
    assert observed == ["bank-b"]
    # Untagged for bank-b: bank-b's table knows it, so bank-b (only) undoes it.
    world.ec2.delete_tags(Resources=[legacy], Tags=[{"Key": B.tag_key}])
    observed.clear()
    gone = outcome(tag_change(legacy, {}, changed=[B.tag_key]))
    assert gone["status"] == "not-tagged" and observed == ["bank-b"]
    assert mappings(world, B.table) == {} and world.fleet.host == {}
    # An instance of no partner: nobody observes it again.
    observed.clear()
    assert outcome(state_change(legacy, "running"))["managed"] is False
    assert observed == []


def test_a_second_event_changes_nothing(lanes):
    world = lanes
    web = world.launch("10.10.1.22", tags={**TAG["bank-a"], **TAG["bank-c"]})
    run(state_change(web, "running"))
    before = (mappings(world, A.table), mappings(world, C.table), dict(world.fleet.host))
    world.fleet.parameters.clear()
    again = outcome(state_change(web, "running"))
    assert again["status"] == "enrolled" and not again["newly_enrolled"]
    assert (mappings(world, A.table), mappings(world, C.table), world.fleet.host) == before
    assert world.fleet.synced_tables() == set(), "no lane's table changed: no sync"


def test_untagging_one_partner_undoes_that_partner_only(lanes):
    world = lanes
    web = world.launch("10.10.1.23", tags={**TAG["bank-a"], **TAG["bank-c"]})
    run(state_change(web, "running"))
    world.fleet.parameters.clear()
    world.ec2.delete_tags(Resources=[web], Tags=[{"Key": C.tag_key}])
    result = outcome(tag_change(web, TAG["bank-a"], changed=[C.tag_key]))
    assert result["status"] == "enrolled", "still bank-a's"
    assert result["partners"]["bank-c"]["status"] == "not-tagged"
    assert result["partners"]["bank-a"]["status"] == "enrolled"
    removes = [p for _, d, p in world.fleet.parameters if d == "RemoveHostRoute"]
    assert [(p["Deployment"], p["Destinations"]) for p in removes] == [("test.bank-c", ALIAS)]
    assert world.fleet.host == {(web, "test.bank-a"): {NET}}
    assert mappings(world, C.table) == {} and mappings(world, A.table) == {web: "203.0.113.10"}
    assert world.fleet.synced_tables() == {C.table}, "bank-a's table is not touched"
    assert status_tags(world, web) == {A.status_tag: "enrolled"}


def test_a_shared_s_partner_and_an_instance_of_one_partner_only(lanes):
    world = lanes
    legacy = world.launch("10.10.1.24", tags=TAG["bank-b"])
    result = outcome(state_change(legacy, "running"))
    assert result["status"] == "enrolled" and set(result["partners"]) == {"bank-b"}
    assert mappings(world, B.table) == {legacy: "203.0.113.30"}
    assert world.fleet.host == {(legacy, "test.bank-b"): {"172.16.5.0/24"}}
    assert mappings(world, A.table) == {} and mappings(world, C.table) == {}
    # An instance of no partner at all (the deployment's base key is no partner's): nobody's,
    # and told which keys would do.
    other = world.launch("10.10.1.25", tags={"tunnelnat": "enabled"})
    nobody = outcome(state_change(other, "running"))
    assert nobody["status"] == "not-tagged" and nobody["managed"] is False
    assert "joins no partner" in nobody["reason"] and B.tag_key in nobody["reason"]
    assert all(i != other for i, _ in world.fleet.calls)


def test_a_lane_whose_table_is_missing_fails_alone(lanes):
    """bank-c's table is gone (deleted, or not deployed yet): bank-a still enrols the instance,
    the event fails (so it comes back), and once the table is back the retry finishes bank-c
    while bank-a writes nothing new."""
    world = lanes
    world.dynamodb.delete_table(TableName=C.table)
    web = world.launch("10.10.1.26", tags={**TAG["bank-a"], **TAG["bank-c"]})
    with pytest.raises(PartnersFailed) as failed:
        run(state_change(web, "running"))
    assert set(failed.value.errors) == {"bank-c"}
    assert "ResourceNotFoundException" in str(failed.value)
    assert mappings(world, A.table) == {web: "203.0.113.10"}
    assert world.fleet.host == {(web, "test.bank-a"): {NET}}
    assert status_tags(world, web) == {A.status_tag: "enrolled"}
    create_enrolment_table(world.dynamodb, C.table)
    generation = desired(world, A.table)
    result = outcome(state_change(web, "running"))
    assert result["status"] == "enrolled" and set(result["partners"]) == {"bank-a", "bank-c"}
    assert desired(world, A.table) == generation, "bank-a wrote nothing new"
    assert world.fleet.host == {(web, "test.bank-a"): {NET}, (web, "test.bank-c"): {ALIAS}}


def test_a_lane_whose_table_is_unwritable_fails_alone(lanes, monkeypatch):
    world = lanes
    controller = handler_module._get_service().controller
    c_store = controller.controllers["bank-c"].store

    def refused(*args, **kwargs):
        raise RuntimeError("AccessDenied: not allowed to write test-bank-c")

    monkeypatch.setattr(c_store, "write_mappings", refused)
    web = world.launch("10.10.1.27", tags={**TAG["bank-a"], **TAG["bank-c"]})
    with pytest.raises(PartnersFailed, match="bank-c"):
        run(state_change(web, "running"))
    assert mappings(world, A.table) == {web: "203.0.113.10"} and mappings(world, C.table) == {}
    assert world.fleet.host == {(web, "test.bank-a"): {NET}}


def test_a_partner_that_keeps_failing_is_dead_lettered_and_marked_there_only(lanes, queues):
    """bank-c's AddHostRoute fails on every attempt: the message ends in the dead-letter queue
    naming bank-c; the instance is marked failed in bank-c's table, and stays enrolled in
    bank-a's (its traffic to bank-a flows)."""
    sqs, _, dlq = queues
    world = lanes
    world.fleet.failing_scopes.add(C.scope)
    web = world.launch("10.10.1.35", tags={**TAG["bank-a"], **TAG["bank-c"]})
    arn = "arn:aws:sqs:us-east-1:123456789012:tunnelnat-events"
    event = state_change(web, "running")
    assert run(batch_from(arn, event, receive_count=1))["batchItemFailures"]
    last = run(batch_from(arn, event, receive_count=handler_module.MAX_ATTEMPTS))
    assert last == {"batchItemFailures": []}, "parked in the DLQ, not retried forever"
    [message] = sqs.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"])["Messages"]
    reason = json.loads(message["Body"])["reason"]
    assert "partner bank-c" in reason and "bank-a" not in reason
    records = {
        name: {r.instance_id: r for r in EnrolmentStore(world.dynamodb, lane.table).records()}
        for name, lane in (("a", A), ("c", C))
    }
    assert records["c"][web].status == "failed" and "AddHostRoute" in records["c"][web].reason
    assert records["a"][web].status == "enrolled"
    assert world.fleet.host == {(web, "test.bank-a"): {NET}}


def test_the_scheduled_reconcile_covers_every_lane(lanes):
    world = lanes
    a_only = world.launch("10.10.1.28", tags=TAG["bank-a"])
    b_only = world.launch("10.10.1.29", tags=TAG["bank-b"])
    c_only = world.launch("10.10.1.30", tags=TAG["bank-c"])
    scheduled = state_change("i-00000000", "running") | {
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "detail": {},
    }
    run(scheduled)
    assert mappings(world, A.table) == {a_only: "203.0.113.10"}
    assert mappings(world, B.table) == {b_only: "203.0.113.30"}
    assert mappings(world, C.table) == {c_only: "203.0.113.20"}
    assert world.fleet.host == {
        (a_only, "test.bank-a"): {NET},
        (b_only, "test.bank-b"): {"172.16.5.0/24"},
        (c_only, "test.bank-c"): {ALIAS},
    }
    # Every lane's table re-rendered in full on the gateway (the scheduled repair).
    fulls = {p["TableName"] for _, d, p in world.fleet.parameters
             if d == "SyncNatTable" and p["Full"] == "true"}  # fmt: skip
    assert fulls == {A.table, B.table, C.table}


def test_a_launch_is_held_until_every_partner_has_it(lanes):
    """The launch hook: released once each partner it joined enrolled it; bank-c's pool
    exhausted holds it (heartbeat), although bank-a enrolled it."""
    world = lanes
    for ip in ("10.10.1.31", "10.10.1.32"):
        run(state_change(world.launch(ip, tags=TAG["bank-c"]), "running"))
    assert len(mappings(world, C.table)) == 2  # bank-c's pool is full now
    web = world.launch("10.10.1.33", tags={**TAG["bank-a"], **TAG["bank-c"]})
    event = lifecycle_event(web, launching=True)
    event["detail"]["LifecycleHookName"] = "tunnelnat-test-launch"
    with pytest.raises(Exception, match="pool-exhausted"):
        run(event)
    assert world.lifecycle.completed == []
    assert mappings(world, A.table)[web] == "203.0.113.10"
    assert status_tags(world, web) == {A.status_tag: "enrolled", C.status_tag: "pool-exhausted"}
    launched = world.launch("10.10.1.34", tags=TAG["bank-a"])
    event = lifecycle_event(launched, launching=True)
    event["detail"]["LifecycleHookName"] = "tunnelnat-test-launch"
    assert outcome(event)["status"] == "enrolled"
    assert world.lifecycle.completed == [(launched, "CONTINUE")]


def test_a_terminate_hook_lets_every_partner_go_before_continuing(lanes):
    world = lanes
    web = world.launch("10.10.1.36", tags={**TAG["bank-a"], **TAG["bank-b"], **TAG["bank-c"]})
    run(state_change(web, "running"))
    assert all(web in mappings(world, lane.table) for lane in LANES)
    world.fleet.parameters.clear()
    result = outcome(lifecycle_event(web, launching=False))
    assert result["status"] == "gone"
    assert world.lifecycle.completed == [(web, "CONTINUE")]
    assert all(mappings(world, lane.table) == {} for lane in LANES)
    assert world.fleet.synced_tables() == {lane.table for lane in LANES}


def test_reading_the_lanes_refuses_what_cannot_be_a_partners_set(lanes):
    ssm = _client("ssm")
    assert [lane.name for lane in read_lanes(ssm, parameter_path("test"), "test")] == [
        "bank-a",
        "bank-b",
        "bank-c",
    ]
    with pytest.raises(LaneError, match="no partner lanes"):
        read_lanes(ssm, parameter_path("other"), "other")
    with pytest.raises(LaneError, match="is not"):
        read_lanes(ssm, parameter_path("test"), "other")
    ssm.put_parameter(Name=parameter_path("test") + "/broken", Value="{", Type="String")
    with pytest.raises(LaneError, match="not JSON"):
        read_lanes(ssm, parameter_path("test"), "test")


def test_without_any_lane_published_the_controller_refuses_to_start(world, monkeypatch):
    """TUNNELNAT_PARTNERS_PATH set and nothing there: never 'no partners, nothing to do'."""
    monkeypatch.setenv("TUNNELNAT_PARTNERS_PATH", parameter_path("test"))
    with pytest.raises(LaneError):
        handler_module.build_lanes(commands=world.fleet)


# -- pure parts ---------------------------------------------------------------------------------


def _outcome(status, *, managed=True, public_ip=None, newly=False) -> Outcome:
    return Outcome("i-1", status, "why", public_ip=public_ip, managed=managed,
                   newly_enrolled=newly)  # fmt: skip


def test_combine_sums_the_lanes_up():
    enrolled = _outcome(Status.ENROLLED, public_ip="203.0.113.10", newly=True)
    untagged = _outcome(Status.NOT_TAGGED, managed=False)
    both = combine("i-1", {"bank-a": enrolled, "bank-b": untagged})
    assert both.status is Status.ENROLLED and both.newly_enrolled and both.managed
    assert set(both.partners) == {"bank-a"} and both.public_ip == "203.0.113.10"
    held = combine("i-1", {"bank-a": enrolled, "bank-c": _outcome(Status.POOL_EXHAUSTED)})
    assert held.status is Status.POOL_EXHAUSTED
    nobody = combine("i-1", {"bank-a": untagged, "bank-b": untagged})
    assert nobody.status is Status.NOT_TAGGED and not nobody.managed and nobody.partners is None
    left = combine("i-1", {"bank-a": _outcome(Status.NOT_TAGGED)})
    assert left.status is Status.NOT_TAGGED and left.managed


def test_combine_fails_the_instance_when_any_lane_failed():
    from tunnelnat.gateway_sync import GatewaySyncPending

    ok = _outcome(Status.ENROLLED)
    failed = combine("i-1", {"bank-a": ok, "bank-c": RuntimeError("boom")})
    assert isinstance(failed, PartnersFailed) and "partner bank-c: RuntimeError: boom" in str(
        failed
    )
    waits = combine("i-1", {"bank-a": GatewaySyncPending("x"), "bank-c": ok})
    assert isinstance(waits, PartnersPending) and isinstance(waits, GatewaySyncPending)
    mixed = combine("i-1", {"bank-a": GatewaySyncPending("x"), "bank-c": RuntimeError("boom")})
    assert isinstance(mixed, PartnersFailed)


class _Stub:
    def __init__(self, lane):
        self.lane = lane


def test_lanes_are_read_again_and_only_changed_ones_rebuilt():
    now = [0.0]
    published = [(A, B)]
    built: list[str] = []

    def factory(lane):
        built.append(lane.name)
        return _Stub(lane)

    lanes = PartnerLanes(
        published[0],
        factory,
        store=None,
        deployment="test",
        loader=lambda: published[0],
        max_age=300,
        clock=lambda: now[0],
    )
    assert built == ["bank-a", "bank-b"]
    kept = lanes.controllers["bank-a"]
    published[0] = (A, C)
    now[0] = 299
    lanes.refresh()
    assert list(lanes.controllers) == ["bank-a", "bank-b"], "not yet"
    now[0] = 301
    lanes.refresh()
    assert list(lanes.controllers) == ["bank-a", "bank-c"] and built[-1] == "bank-c"
    assert lanes.controllers["bank-a"] is kept, "an unchanged lane keeps its controller"

    def unreadable():
        raise RuntimeError("throttled")

    lanes._loader = unreadable
    now[0] = 700
    lanes.refresh()
    assert list(lanes.controllers) == ["bank-a", "bank-c"], "kept when they cannot be read"


def test_each_lane_of_a_partners_file_is_a_valid_controller_configuration():
    """docs/partners.md's example, through Partners.lanes() as the stack publishes them: each
    lane's configuration has its partner's networks as instances address them (the alias for
    the overlapping clearing house), its NAT and its own tag key."""
    from tests.conftest import VALID_CONFIG
    from tunnelnat.core.config import TunnelnatConfig
    from tunnelnat.core.partners import Partners
    from tunnelnat.partner_lanes import lane_config

    text = (REPO / "docs" / "partners.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    partners = Partners.from_mapping(
        yaml.safe_load(block), vpc_cidr="10.10.0.0/16", gateway_subnet="10.10.1.0/24"
    )
    base = TunnelnatConfig.from_mapping(dict(VALID_CONFIG))
    configs = {
        lane.name: lane_config(base, lane) for lane in partners.lanes("acme", "tunnelnat:acme")
    }
    assert {n: [str(x) for x in c.partner_networks] for n, c in configs.items()} == {
        "card-processor": ["10.0.0.0/24"],
        "bank": ["172.20.0.0/24", "172.20.5.0/28"],
        "clearing-house": ["100.64.0.0/24"],
    }
    assert {n: c.nat_mode.value for n, c in configs.items()} == {
        "card-processor": "dedicated",
        "bank": "shared",
        "clearing-house": "dedicated",
    }
    assert configs["bank"].enrolment_tag_key == "tunnelnat:acme:partner:bank"
    assert all(c.gateway_private_ip == base.gateway_private_ip for c in configs.values())
    # The instances' own addresses (nat_mode instance): their public IPs, listed as the pool.
    lane = _lane("own", 4, nat_mode="instance", pool=(IPv4Address("203.0.113.40"),))
    assert lane_config(base, lane).nat_mode.value == "instance"


def test_route_table_mode_with_partners_is_refused_and_lanes_stay_in_their_deployment():
    from tests.conftest import VALID_CONFIG
    from tunnelnat.core.config import ConfigError
    from tunnelnat.partner_lanes import lane_settings
    from tunnelnat.settings import ControllerSettings

    env = {
        "TUNNELNAT_CONFIG": json.dumps(VALID_CONFIG),
        "TUNNELNAT_TABLE_NAME": "tunnelnat-test",
        "TUNNELNAT_DEPLOYMENT": "test",
        "AWS_REGION": "us-east-1",
        "TUNNELNAT_VPC_ID": "vpc-0123456789abcdef0",
    }
    settings = ControllerSettings.from_environ(env)
    mine = lane_settings(settings, C)
    assert mine.table_name == "test-bank-c" and mine.deployment == "test"
    assert [str(n) for n in mine.config.partner_networks] == [ALIAS]
    assert mine.config.enrolment_tag_key == C.tag_key
    routed = ControllerSettings.from_environ(
        {**env, "TUNNELNAT_GATEWAY_ENI_ID": "eni-0123456789abcdef0"}
    )
    with pytest.raises(ConfigError, match="route-table mode"):
        lane_settings(routed, A)
    other = ControllerSettings.from_environ({**env, "TUNNELNAT_DEPLOYMENT": "other"})
    with pytest.raises(ConfigError, match="not other"):
        lane_settings(other, A)


def test_the_scheduled_repair_of_many_partners_spreads_over_runs():
    """Each partner's repair re-renders it on the gateway (a command each): what does not fit
    one invocation is postponed, reported, and starts the next run; every partner is repaired
    within a few runs, none starved."""
    from tunnelnat.partner_lanes import LanePostponed

    now = [0.0]
    repaired: list[str] = []

    class Repairing:
        def __init__(self, lane):
            self.name = lane.name

        def reconcile_all(self):
            repaired.append(self.name)
            now[0] += 10.0  # each partner's repair: 10 s
            return {f"i-{self.name}": _outcome(Status.ENROLLED)}

    many = [_lane(f"p{i:02d}", i, pool=(IPv4Address(f"203.0.113.{i}"),)) for i in range(1, 11)]
    deadline = [25.0]
    lanes = PartnerLanes(many, Repairing, store=None, deployment="test",
                         deadline=lambda: deadline[0], clock=lambda: now[0])  # fmt: skip
    first = lanes.reconcile_all()
    assert repaired == ["p01", "p02", "p03"]
    postponed = {k for k, v in first.items() if isinstance(v, LanePostponed)}
    assert postponed == {f"partner:p{i:02d}" for i in range(4, 11)}
    assert first["i-p01"].status is Status.ENROLLED
    repaired.clear()
    deadline[0] = now[0] + 25.0
    lanes.reconcile_all()
    assert repaired == ["p04", "p05", "p06"], "the postponed ones first"
    repaired.clear()
    deadline[0] = None  # no limit known: all of them, starting where it stopped
    rest = lanes.reconcile_all()
    assert repaired == ["p07", "p08", "p09", "p10", "p01", "p02", "p03", "p04", "p05", "p06"]
    assert not any(isinstance(v, Exception) for v in rest.values())
    repaired.clear()
    lanes.reconcile_all()
    assert repaired[0] == "p01", "a complete run starts from the first again"
    # Past the deadline already: still one partner per run (never none).
    repaired.clear()
    deadline[0] = now[0] - 1
    lanes.reconcile_all()
    assert repaired == ["p01"]


def test_the_handler_gives_the_lanes_this_invocations_deadline():
    import time

    class Timed(Context):
        def get_remaining_time_in_millis(self):
            return 300_000

    handler_module._set_deadline(Timed())
    left = handler_module._lanes_deadline - time.monotonic()
    assert 300 - handler_module.LANE_RESERVE_SECONDS - 5 < left <= 300 - 240
    handler_module._set_deadline(Context())  # the tests' and the lab's contexts: no limit
    assert handler_module._lanes_deadline is None
