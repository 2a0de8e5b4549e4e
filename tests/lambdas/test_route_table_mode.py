"""Issue 13: route-table mode against moto's EC2 route tables.

An instance in another subnet of the gateway's VPC is enrolled by its NAT mapping and one route
per partner network in its subnet's route table to the gateway's ENI: nothing runs on the
instance. The route belongs to the table: created with the first enrolled instance behind it,
removed with the last; a route tunnelnat did not create is reported (route-conflict) and left
alone; the reconcile puts back a route of ours that someone deleted.

What moto does not do that AWS does (checked against the EC2 API reference, so not relied on):
CreateRoute with a NetworkInterfaceId does not refuse an existing destination (AWS answers
RouteAlreadyExists), and routes never turn ``blackhole`` when their target goes away.
"""

from __future__ import annotations

import pytest

from tests.lambdas.events import Context, sqs_batch, state_change, tag_change
from tests.lambdas.test_isolation import other_vpc
from tests.lambdas.test_metrics import emf, failures
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}
PARTNER = "192.0.2.0/24"  # VALID_CONFIG's partner network


def opt_in(world, table_id: str, deployment: str = "test") -> str:
    """The network owner lets this deployment change the table (issue 21)."""
    world.ec2.create_tags(
        Resources=[table_id], Tags=[{"Key": "tunnelnat:routes", "Value": deployment}]
    )
    return table_id


def scheduled() -> dict:
    """The scheduled full reconcile's event (EventBridge Scheduler's shape)."""
    event = state_change("i-00000000", "running")
    event.update({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}})
    event["resources"] = ["arn:aws:events:us-east-1:123456789012:rule/tunnelnat-reconcile"]
    return event


@pytest.fixture
def routed(world, monkeypatch):
    """The world with route-table mode on: the controller knows G's ENI; the second subnet
    (10.10.2.0/24) has its own route table."""
    monkeypatch.setenv("TUNNELNAT_GATEWAY_ENI_ID", world.eni_id)
    table = world.ec2.create_route_table(VpcId=world.vpc_id)["RouteTable"]["RouteTableId"]
    world.ec2.associate_route_table(RouteTableId=table, SubnetId=world.other_subnet_id)
    world.private_table = opt_in(world, table)
    handler_module.use_controller(handler_module.build_controller(commands=world.fleet))
    return world


def launch_private(world, private_ip: str, tags: dict[str, str] | None = None) -> str:
    spec = {"SubnetId": world.other_subnet_id, "PrivateIpAddress": private_ip}
    if tags:
        spec["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    reply = world.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, **spec)
    return reply["Instances"][0]["InstanceId"]


def partner_routes(world, table_id: str) -> dict[str, str]:
    """The table's routes for destinations outside the VPC: destination -> target."""
    [table] = world.ec2.describe_route_tables(RouteTableIds=[table_id])["RouteTables"]
    found = {}
    for route in table["Routes"]:
        if route.get("GatewayId") == "local" or "DestinationCidrBlock" not in route:
            continue
        target = (
            route.get("NetworkInterfaceId")
            or route.get("GatewayId")
            or route.get("VpcPeeringConnectionId")
            or "?"
        )
        found[route["DestinationCidrBlock"]] = target
    return found


def record(world, table_id: str) -> dict | None:
    return world.items("route-table").get(table_id)


def members(world, table_id: str) -> set[str]:
    item = record(world, table_id)
    return set(item["members"]["SS"]) if item and "members" in item else set()


def main_table(world) -> str:
    [table] = world.ec2.describe_route_tables(
        Filters=[
            {"Name": "vpc-id", "Values": [world.vpc_id]},
            {"Name": "association.main", "Values": ["true"]},
        ]
    )["RouteTables"]
    return table["RouteTableId"]


def test_first_instance_creates_the_route_the_last_removes_it_nothing_runs_on_them(routed):
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    b = launch_private(w, "10.10.2.22", TAG)
    [first] = handler(state_change(a, "running"), Context())["outcomes"]
    assert first["status"] == "enrolled", first
    assert w.private_table in first["reason"] and w.eni_id in first["reason"]
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}
    assert partner_routes(w, main_table(w)) == {}, "only the subnet's own table"
    handler(state_change(b, "running"), Context())
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}, "one route per table"
    assert members(w, w.private_table) == {a, b}
    assert record(w, w.private_table)["routes"]["M"] == {PARTNER: {"S": w.eni_id}}
    # Enrolment is the NAT mapping and the table's route: no command to either instance.
    assert {i for i, _ in w.fleet.calls} == {w.gateway_id}
    assert w.fleet.applied_pairs() == {
        ("10.10.2.21", "203.0.113.10"),
        ("10.10.2.22", "203.0.113.11"),
    }
    records = w.items("instance")
    assert records[a]["status"]["S"] == "enrolled"
    assert records[a]["route_installed"]["BOOL"] is False, "no host route on the instance"
    tags = w.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [a]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in tags}["tunnelnat:status:test"] == "enrolled"

    w.ec2.terminate_instances(InstanceIds=[a])
    [gone] = handler(state_change(a, "terminated"), Context())["outcomes"]
    assert gone["status"] == "gone"
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}, "b still needs it"
    assert members(w, w.private_table) == {b}
    # The last one leaves by its tag: the route goes with it, and the table's record.
    w.ec2.delete_tags(Resources=[b], Tags=[{"Key": "tunnelnat"}])
    [left] = handler(tag_change(b, {}), Context())["outcomes"]
    assert left["status"] == "not-tagged"
    assert partner_routes(w, w.private_table) == {}
    assert record(w, w.private_table) is None
    assert w.items("mapping") == {} and w.fleet.applied_pairs() == set()
    assert {i for i, _ in w.fleet.calls} == {w.gateway_id}


def test_a_subnet_without_its_own_table_is_served_through_the_main_table(world, monkeypatch):
    monkeypatch.setenv("TUNNELNAT_GATEWAY_ENI_ID", world.eni_id)
    handler_module.use_controller(handler_module.build_controller(commands=world.fleet))
    main = opt_in(world, main_table(world))
    a = launch_private(world, "10.10.2.21", TAG)
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert partner_routes(world, main) == {PARTNER: world.eni_id}
    assert members(world, main) == {a}


def test_an_untagged_neighbour_behind_the_table_is_never_mapped(routed):
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    neighbour = launch_private(w, "10.10.2.30", {"Name": "db"})
    handler(sqs_batch(state_change(a, "running"), state_change(neighbour, "running")), Context())
    assert set(w.items("mapping")) == {a}
    assert members(w, w.private_table) == {a}
    # Its packets now reach the gateway too; the gateway forwards only mapped sources.
    assert ("10.10.2.30", "203.0.113.11") not in w.fleet.applied_pairs()


def test_a_route_it_did_not_create_is_reported_and_left_alone(routed, capsys):
    w = routed
    igw = w.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    w.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=w.vpc_id)
    w.ec2.create_route(RouteTableId=w.private_table, DestinationCidrBlock=PARTNER, GatewayId=igw)
    a = launch_private(w, "10.10.2.21", TAG)
    result = handler(sqs_batch(state_change(a, "running")), Context())
    assert result == {"batchItemFailures": []}, "a status, not a retry loop"
    assert failures(emf(capsys.readouterr().out)) == ["route-conflict"]
    assert partner_routes(w, w.private_table) == {PARTNER: igw}, "never overwritten"
    item = w.items("instance")[a]
    assert item["status"]["S"] == "route-conflict"
    assert w.private_table in item["reason"]["S"] and f"{PARTNER} -> {igw}" in item["reason"]["S"]
    # Refused before anything is written (issue 21): never counted behind the table, and no
    # pool address held by an instance that cannot be served.
    assert record(w, w.private_table) is None, "not ours: never recorded as ours"
    assert w.items("mapping") == {} and "public_ip" not in item
    # Again (a redelivery, the scheduled run): still reported, still untouched.
    [again] = handler(state_change(a, "running"), Context())["outcomes"]
    assert again["status"] == "route-conflict"
    # Its leaving never deletes the route it did not create.
    w.ec2.terminate_instances(InstanceIds=[a])
    handler(state_change(a, "terminated"), Context())
    assert partner_routes(w, w.private_table) == {PARTNER: igw}
    assert record(w, w.private_table) is None


def test_once_the_foreign_route_is_gone_the_reconcile_completes_the_enrolment(routed):
    w = routed
    igw = w.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    w.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=w.vpc_id)
    w.ec2.create_route(RouteTableId=w.private_table, DestinationCidrBlock=PARTNER, GatewayId=igw)
    a = launch_private(w, "10.10.2.21", TAG)
    handler(state_change(a, "running"), Context())
    assert w.items("mapping") == {}, "no pool address while it cannot be served (issue 21)"
    w.ec2.delete_route(RouteTableId=w.private_table, DestinationCidrBlock=PARTNER)
    handler(scheduled(), Context())
    assert w.items("instance")[a]["status"]["S"] == "enrolled"
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}


def test_a_route_of_ours_deleted_under_us_is_put_back(routed):
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    b = launch_private(w, "10.10.2.22", TAG)
    handler(sqs_batch(state_change(a, "running"), state_change(b, "running")), Context())
    w.ec2.delete_route(RouteTableId=w.private_table, DestinationCidrBlock=PARTNER)
    # Any reconcile of an instance behind the table puts it back...
    [outcome] = handler(state_change(b, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}
    # ...and so does the scheduled full reconcile.
    w.ec2.delete_route(RouteTableId=w.private_table, DestinationCidrBlock=PARTNER)
    handler(scheduled(), Context())
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}
    assert members(w, w.private_table) == {a, b}


def test_a_route_of_ours_pointed_elsewhere_is_theirs_now(routed):
    """Someone re-pointed our route (ReplaceRoute by hand): reported, and never deleted."""
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    handler(state_change(a, "running"), Context())
    other = w.ec2.create_network_interface(SubnetId=w.other_subnet_id)["NetworkInterface"]
    w.ec2.replace_route(
        RouteTableId=w.private_table,
        DestinationCidrBlock=PARTNER,
        NetworkInterfaceId=other["NetworkInterfaceId"],
    )
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "route-conflict"
    assert "changed since tunnelnat created it" in outcome["reason"]
    w.ec2.terminate_instances(InstanceIds=[a])
    handler(state_change(a, "terminated"), Context())
    assert partner_routes(w, w.private_table) == {PARTNER: other["NetworkInterfaceId"]}


def test_a_new_gateway_eni_re_points_only_the_routes_it_created(routed, monkeypatch):
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    handler(state_change(a, "running"), Context())
    new = w.ec2.create_network_interface(SubnetId=w.subnet_id)["NetworkInterface"]
    monkeypatch.setenv("TUNNELNAT_GATEWAY_ENI_ID", new["NetworkInterfaceId"])
    handler_module.use_controller(handler_module.build_controller(commands=w.fleet))
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert partner_routes(w, w.private_table) == {PARTNER: new["NetworkInterfaceId"]}


def test_the_subnets_table_association_changes_the_route_follows(routed):
    """The subnet's route table is replaced (ReplaceRouteTableAssociation): the instance is
    counted behind the new table, which gets the route, and the old one loses it."""
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    handler(state_change(a, "running"), Context())
    new = opt_in(w, w.ec2.create_route_table(VpcId=w.vpc_id)["RouteTable"]["RouteTableId"])
    [old] = w.ec2.describe_route_tables(RouteTableIds=[w.private_table])["RouteTables"]
    [association] = [x for x in old["Associations"] if x.get("SubnetId") == w.other_subnet_id]
    w.ec2.replace_route_table_association(
        AssociationId=association["RouteTableAssociationId"], RouteTableId=new
    )
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled" and new in outcome["reason"]
    assert partner_routes(w, new) == {PARTNER: w.eni_id}
    assert partner_routes(w, w.private_table) == {}
    assert members(w, new) == {a} and record(w, w.private_table) is None


def test_the_scheduled_reconcile_follows_an_association_change_too(routed):
    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    handler(state_change(a, "running"), Context())
    [old] = w.ec2.describe_route_tables(RouteTableIds=[w.private_table])["RouteTables"]
    [association] = [x for x in old["Associations"] if x.get("SubnetId") == w.other_subnet_id]
    # Back to the main table.
    opt_in(w, main_table(w))
    w.ec2.disassociate_route_table(AssociationId=association["RouteTableAssociationId"])
    handler(scheduled(), Context())
    assert partner_routes(w, main_table(w)) == {PARTNER: w.eni_id}
    assert partner_routes(w, w.private_table) == {}


def test_another_vpc_is_never_served_and_its_tables_never_touched(routed):
    w = routed
    # Same ranges as ours, its own private subnet: an address like one we would route.
    far_vpc = w.ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
    far_subnet = w.ec2.create_subnet(VpcId=far_vpc, CidrBlock="10.10.2.0/24")["Subnet"]
    w.far_subnet = far_subnet["SubnetId"]
    far = other_vpc(w, "10.10.2.21", TAG)
    [outcome] = handler(state_change(far, "running"), Context())["outcomes"]
    assert outcome["status"] == "other-vpc" and outcome["managed"] is False
    assert w.items("route-table") == {} and w.items("mapping") == {}
    vpcs = [w.vpc_id, far_vpc]
    tables = w.ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": vpcs}])
    assert len(tables["RouteTables"]) == 3  # our main and private tables, the other's main
    for table in tables["RouteTables"]:
        assert partner_routes(w, table["RouteTableId"]) == {}, table


def test_a_gateway_subnet_instance_keeps_its_host_route(routed):
    w = routed
    web = w.launch("10.10.1.21", tags=TAG)
    [outcome] = handler(state_change(web, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert w.fleet.routes[web] == {PARTNER}
    assert w.items("route-table") == {}, "a batch of the gateway's subnet reads no table"


def test_without_the_gateway_eni_other_subnets_stay_unsupported(world):
    a = launch_private(world, "10.10.2.21", TAG)
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "unsupported-subnet"
    assert "route-table mode is off" in outcome["reason"]


def test_a_table_whose_drain_was_interrupted_is_tidied_by_the_scheduled_run(routed):
    """A worker stopped after writing 'no members' and before deleting the route: the record
    still owns the route, the scheduled run removes it and forgets the table."""
    w = routed
    w.ec2.create_route(
        RouteTableId=w.private_table, DestinationCidrBlock=PARTNER, NetworkInterfaceId=w.eni_id
    )
    w.dynamodb.put_item(
        TableName="tunnelnat-test",
        Item={
            "pk": {"S": "route-table"},
            "sk": {"S": w.private_table},
            "vpc_id": {"S": w.vpc_id},
            "routes": {"M": {PARTNER: {"S": w.eni_id}}},
            "version": {"N": "3"},
        },
    )
    handler(scheduled(), Context())
    assert partner_routes(w, w.private_table) == {}
    assert record(w, w.private_table) is None


def test_a_join_racing_the_last_leave_ends_with_the_route_in_place(routed, monkeypatch):
    """Worker 1 takes the last instance away and deletes the route; before it forgets the table,
    worker 2 counts a new instance behind it. Worker 1's conditional delete fails, it reads again
    and decides again: the route worker 2 put back stays, and the table is not forgotten."""
    from tunnelnat.adapters.route_records import RouteTableRecords

    w = routed
    a = launch_private(w, "10.10.2.21", TAG)
    handler(state_change(a, "running"), Context())
    b = launch_private(w, "10.10.2.22", TAG)
    other = handler_module.build_controller(commands=w.fleet)
    real_delete = RouteTableRecords.delete
    raced = []

    def delete(self, table_id, *, version):
        if not raced:
            # Worker 1 has deleted the route; worker 2 comes in before it forgets the table.
            assert partner_routes(w, w.private_table) == {}
            raced.append(other.converge([b]))
        return real_delete(self, table_id, version=version)

    monkeypatch.setattr(RouteTableRecords, "delete", delete)
    w.ec2.terminate_instances(InstanceIds=[a])
    [gone] = handler(state_change(a, "terminated"), Context())["outcomes"]
    assert gone["status"] == "gone"
    assert raced and raced[0][b].status == "enrolled"
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}
    assert members(w, w.private_table) == {b}


# -- issue 21, finding 6 ---------------------------------------------------------------------
def peering(world) -> str:
    """A peering connection's ID, as a foreign route's target (moto keeps it in the table)."""
    peer = world.ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    reply = world.ec2.create_vpc_peering_connection(VpcId=world.vpc_id, PeerVpcId=peer)
    return reply["VpcPeeringConnection"]["VpcPeeringConnectionId"]


@pytest.mark.parametrize(
    ("foreign", "diverts"),
    [
        ("192.0.2.128/25", "192.0.2.128/25 of it would go to"),  # narrower than A
        ("192.0.0.0/16", "a route of ours would take 192.0.2.0/24 from"),  # broader than A
    ],
)
def test_a_foreign_route_inside_or_around_the_partner_network_is_a_conflict(
    routed, capsys, foreign, diverts
):
    """b08b1c8 reported this instance ``enrolled``: longest-prefix match sent part of the
    partner's network elsewhere (narrower), or our route took traffic a broader one carried.
    And it held a pool address while it could not be served."""
    w = routed
    pcx = peering(w)
    w.ec2.create_route(
        RouteTableId=w.private_table, DestinationCidrBlock=foreign, VpcPeeringConnectionId=pcx
    )
    a = launch_private(w, "10.10.2.21", TAG)
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "route-conflict", outcome
    assert diverts in outcome["reason"] and pcx in outcome["reason"], outcome["reason"]
    assert failures(emf(capsys.readouterr().out)) == ["route-conflict"]
    assert partner_routes(w, w.private_table) == {foreign: pcx}, "nothing of ours added"
    assert w.items("mapping") == {} and w.fleet.applied_pairs() == set(), "no pool address"
    # The owner removes it: the next run enrols.
    w.ec2.delete_route(RouteTableId=w.private_table, DestinationCidrBlock=foreign)
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"


def test_a_table_not_opted_in_is_never_changed_and_holds_no_address(routed, capsys):
    w = routed
    w.ec2.delete_tags(Resources=[w.private_table], Tags=[{"Key": "tunnelnat:routes"}])
    w.ec2.create_tags(
        Resources=[w.private_table], Tags=[{"Key": "tunnelnat:routes", "Value": "other"}]
    )
    a = launch_private(w, "10.10.2.21", TAG)
    result = handler(sqs_batch(state_change(a, "running")), Context())
    assert result == {"batchItemFailures": []}, "a status, not a retry loop"
    assert failures(emf(capsys.readouterr().out)) == ["route-table-not-opted-in"]
    item = w.items("instance")[a]
    assert item["status"]["S"] == "route-table-not-opted-in"
    assert w.private_table in item["reason"]["S"] and "tunnelnat:routes=test" in item["reason"]["S"]
    tags = w.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [a]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in tags}["tunnelnat:status:test"] == (
        "route-table-not-opted-in"
    )
    assert partner_routes(w, w.private_table) == {} and w.items("route-table") == {}
    assert w.items("mapping") == {}


def test_a_listed_table_is_opted_in_without_its_tag(routed, monkeypatch):
    w = routed
    w.ec2.delete_tags(Resources=[w.private_table], Tags=[{"Key": "tunnelnat:routes"}])
    monkeypatch.setenv("TUNNELNAT_ROUTE_TABLES", w.private_table)
    handler_module.use_controller(handler_module.build_controller(commands=w.fleet))
    a = launch_private(w, "10.10.2.21", TAG)
    [outcome] = handler(state_change(a, "running"), Context())["outcomes"]
    assert outcome["status"] == "enrolled"
    assert partner_routes(w, w.private_table) == {PARTNER: w.eni_id}


def test_instances_that_cannot_be_served_leave_the_pool_to_those_that_can(routed):
    """b08b1c8: conflicts kept their addresses, a few exhausted the pool for servable instances
    with no hint why. Now they hold none, and pool-exhausted names who holds the addresses."""
    w = routed
    pcx = peering(w)
    w.ec2.create_route(
        RouteTableId=w.private_table, DestinationCidrBlock="192.0.2.0/25",
        VpcPeeringConnectionId=pcx,
    )  # fmt: skip
    blocked = [launch_private(w, f"10.10.2.{21 + i}", TAG) for i in range(3)]
    handler(sqs_batch(*(state_change(i, "running") for i in blocked)), Context())
    assert w.items("mapping") == {}, "three conflicts, none holds one of the 3 addresses"
    served = [w.launch(f"10.10.1.{21 + i}", tags=TAG) for i in range(4)]
    results = handler(sqs_batch(*(state_change(i, "running") for i in served)), Context())
    assert results == {"batchItemFailures": []}
    records = w.items("instance")
    statuses = sorted(records[i]["status"]["S"] for i in served)
    assert statuses == ["enrolled"] * 3 + ["pool-exhausted"]
    [last] = [i for i in served if records[i]["status"]["S"] == "pool-exhausted"]
    reason = records[last]["reason"]["S"]
    assert reason.startswith("all 3 pool addresses are in use: "), reason
    for holder in served:
        if holder != last:
            assert f"by {holder} (" in reason, reason
    assert "203.0.113.10 by" in reason
    # Later, from the table: each holder with its status.
    [outcome] = handler(state_change(last, "running"), Context())["outcomes"]
    assert outcome["status"] == "pool-exhausted"
    for holder in served:
        if holder != last:
            assert f"by {holder} (enrolled)" in outcome["reason"], outcome["reason"]
