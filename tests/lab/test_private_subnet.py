"""The private subnet behind the VPC router (issue 13, route-table mode), with real packets.

The lab's router namespace (tn-vpcrtr) routes by what moto's route tables hold (lab.vpc_router):
first the mirror itself, with routes put into moto directly; then the controller's route-table
mode through the demo's steps (tag, neighbour, last one out, a foreign route). The steps build on
each other, so they run in file order on one lab. No document is ever run on a private instance
(they have no SSM agent): every test checks the command port was never asked.
"""

from __future__ import annotations

import time

import pytest

from lab import topology as topo
from lab.controller import LabController
from lab.story import FOREIGN_APPLIANCE, PRIV1, PRIV2, Story
from lab.vpc_router import KernelRoute, RouterLink, batch, kernel_routes, subnet_tables

pytestmark = pytest.mark.lab

STEP_SECONDS: dict[str, float] = {}  # the demo's private-subnet steps, by title

ENI = "eni-0000000000000000a"
LINKS = {
    "subnet-a": RouterLink("10.10.1.0/24", "sn-1", "10.10.1.1", 101),
    "subnet-b": RouterLink("10.10.2.0/24", "sn-2", "10.10.2.1", 102),
}
LOCAL = {"DestinationCidrBlock": "10.10.0.0/16", "GatewayId": "local", "State": "active"}


def eni(subnet: str = "subnet-a", *, check: bool = False, attached: bool = True) -> dict:
    return {
        "NetworkInterfaceId": ENI,
        "SubnetId": subnet,
        "PrivateIpAddress": "10.10.1.5",
        "SourceDestCheck": check,
        **({"Attachment": {"Status": "attached"}} if attached else {}),
    }


def table(*routes: dict) -> dict:
    return {"RouteTableId": "rtb-1", "Routes": [LOCAL, *routes]}


def partner_route(**target: str) -> dict:
    return {"DestinationCidrBlock": topo.PARTNER_NET, "State": "active", **target}


# -- the mirror's translation (pure) -------------------------------------------------------------


def test_a_subnet_uses_its_explicit_table_else_the_main_one():
    main = {"RouteTableId": "rtb-main", "Associations": [{"Main": True}]}
    own = {"RouteTableId": "rtb-own", "Associations": [{"SubnetId": "subnet-b", "Main": False}]}
    chosen = subnet_tables([main, own], ["subnet-a", "subnet-b"])
    assert chosen["subnet-a"] == (main, True)
    assert chosen["subnet-b"] == (own, False)


def test_kernel_routes_stand_for_what_ec2_holds():
    routes = kernel_routes(table(partner_route(NetworkInterfaceId=ENI)), LINKS, {ENI: eni()})
    assert [r.spec() for r in routes] == [
        "10.10.1.0/24 dev sn-1 scope link",
        "10.10.2.0/24 dev sn-2 scope link",
        f"{topo.PARTNER_NET} via 10.10.1.5 dev sn-1",
        "blackhole default",  # AWS drops what no route matches
    ]


def test_a_route_for_a_subnets_own_cidr_wins_over_local_and_settles():
    middlebox = {"DestinationCidrBlock": "10.10.2.0/24", "NetworkInterfaceId": ENI}
    routes = kernel_routes(table(middlebox), LINKS, {ENI: eni()})
    assert [r.spec() for r in routes] == [
        "10.10.1.0/24 dev sn-1 scope link",
        "10.10.2.0/24 via 10.10.1.5 dev sn-1",
        "blackhole default",
    ]
    assert batch(101, routes, {r.destination: r for r in routes}) == []


@pytest.mark.parametrize(
    ("route", "interfaces", "why"),
    [
        (partner_route(NetworkInterfaceId=ENI), {ENI: eni(check=True)}, "source/dest check on"),
        (partner_route(NetworkInterfaceId=ENI), {ENI: eni(attached=False)}, "attached to no"),
        (partner_route(NetworkInterfaceId=ENI), {}, "no such ENI"),
        (partner_route(GatewayId="igw-1"), {}, "not in the lab"),
        (partner_route(NetworkInterfaceId=ENI, State="blackhole"), {ENI: eni()}, "blackhole"),
    ],
)
def test_a_route_that_cannot_forward_on_aws_drops_in_the_lab(route, interfaces, why):
    routes = kernel_routes(table(route), LINKS, interfaces)
    partner = next(r for r in routes if r.destination == topo.PARTNER_NET)
    assert partner.blackhole and why in partner.because


def test_the_batch_makes_the_kernel_table_exactly_what_ec2_holds():
    wanted = [KernelRoute("10.10.2.0/24", dev="sn-2"), KernelRoute("default", blackhole=True)]
    current = {
        "10.10.2.0/24": KernelRoute("10.10.2.0/24", dev="sn-2"),
        topo.PARTNER_NET: KernelRoute(topo.PARTNER_NET, via="10.10.1.5", dev="sn-1"),
    }
    assert batch(102, wanted, current) == [
        f"route del {topo.PARTNER_NET} table 102",
        "route replace blackhole default table 102",
    ]
    settled = {r.destination: r for r in wanted}
    assert batch(102, wanted, settled) == []  # level-triggered: nothing to do twice


# -- the router with real packets ----------------------------------------------------------------


@pytest.fixture(scope="module")
def story(configured_lab):
    with LabController(configured_lab) as controller:
        yield Story(configured_lab, controller)


def private_ids(lab: topo.Lab) -> set[str]:
    return {i.instance_id for i in lab.private_instances}


def asked_private(lab: topo.Lab) -> list[tuple[str, str]]:
    return [(i, doc) for i, doc in lab.commands.asked if i in private_ids(lab)]


def test_the_private_subnet_is_built_behind_the_router(story):
    lab = story.lab
    assert {"tn-vpcrtr", "tn-priv-1", "tn-priv-2"} <= set(topo.lab_namespaces())
    assert topo.is_lab_namespace("tn-vpcrtr") and topo.is_lab_namespace("tn-priv-7")
    priv1 = lab.instance(PRIV1)
    assert priv1.private_ip == "10.10.2.21"
    assert f"default via {topo.PRIVATE_ROUTER} dev eth0" in lab.routes(priv1.ns)
    # EC2 holds both subnets, the private one with its own explicit table, and its instances.
    ec2 = lab.aws.client("ec2")
    reply = ec2.describe_instances(InstanceIds=sorted(private_ids(lab)))
    subnets = {i["SubnetId"] for r in reply["Reservations"] for i in r["Instances"]}
    assert subnets == {lab.aws.private_subnet_id}
    rtb = ec2.describe_route_tables(RouteTableIds=[lab.aws.private_route_table_id])
    associations = rtb["RouteTables"][0]["Associations"]
    assert [a.get("SubnetId") for a in associations] == [lab.aws.private_subnet_id]
    # Nothing of it in the root namespace.
    root = topo.sh(["ip", "-4", "-o", "addr"]).stdout + topo.sh(["ip", "-4", "route"]).stdout
    assert "10.10." not in root


def test_the_router_applies_routes_put_into_moto_by_anyone(story):
    """Without the controller: a route created in moto reaches the router by the polling thread
    alone, the untagged instance's packets then reach G and are dropped there; deleted, the
    router drops them again (the table has no route for the partner's network)."""
    lab = story.lab
    ec2 = lab.aws.client("ec2")
    rtb = lab.aws.private_route_table_id
    answered, _, at_g, _ = story.private_request(PRIV2)
    assert not answered and at_g == 0, "with no route the VPC router must drop it"
    dropped_before = lab.nft_counter("dropped_unenrolled")
    ec2.create_route(
        RouteTableId=rtb, DestinationCidrBlock=topo.PARTNER_NET, NetworkInterfaceId=lab.aws.eni_id
    )
    try:
        wanted = f"{topo.PARTNER_NET} via {topo.GW_ENI} dev sn-1"
        deadline = time.monotonic() + 5  # the mirror polls every second
        while wanted not in lab.vpc_router.kernel_table(lab.aws.private_subnet_id):
            assert time.monotonic() < deadline, lab.vpc_router.last_error
            time.sleep(0.1)
        answered, _, at_g, peers = story.private_request(PRIV2)
        assert not answered and at_g > 0 and peers == []
        assert lab.nft_counter("dropped_unenrolled") > dropped_before
    finally:
        ec2.delete_route(RouteTableId=rtb, DestinationCidrBlock=topo.PARTNER_NET)
    assert lab.vpc_router.sync() == [f"route del {topo.PARTNER_NET} table 102"]
    assert lab.vpc_router.sync() == []  # equal now: nothing to do
    answered, _, at_g, _ = story.private_request(PRIV2)
    assert not answered and at_g == 0
    assert asked_private(lab) == []


def test_a_route_to_an_eni_whose_check_is_on_drops_as_on_aws(story):
    lab = story.lab
    ec2 = lab.aws.client("ec2")
    rtb = lab.aws.private_route_table_id
    appliance = lab.aws.run_appliance("10.10.2.60")
    eni_id = appliance["eni_id"]
    ec2.modify_network_interface_attribute(
        NetworkInterfaceId=eni_id, SourceDestCheck={"Value": True}
    )
    ec2.create_route(
        RouteTableId=rtb, DestinationCidrBlock=topo.PARTNER_NET, NetworkInterfaceId=eni_id
    )
    try:
        lab.vpc_router.sync()
        mirrored = lab.vpc_router.tables[lab.aws.private_subnet_id].route_for(topo.PARTNER_NET)
        assert mirrored is not None and mirrored.blackhole, mirrored
        assert f"blackhole {topo.PARTNER_NET}" in lab.vpc_router.kernel_table(
            lab.aws.private_subnet_id
        )
    finally:
        ec2.delete_route(RouteTableId=rtb, DestinationCidrBlock=topo.PARTNER_NET)
        ec2.terminate_instances(InstanceIds=[appliance["instance_id"]])
        lab.vpc_router.sync()


# -- the controller's route-table mode, as the demo runs it ---------------------------------------


def test_a_private_instance_without_agent_is_enrolled_through_its_route_table(story):
    step = story.private_enrol(PRIV1)
    STEP_SECONDS[step.title] = step.data["step_seconds"]
    assert not step.data["before_answered"] and step.data["before_at_g"] == 0, step.figure
    assert step.data["target_before"] is None
    assert step.data["outcome"]["status"] == "enrolled", step.figure
    public = step.data["outcome"]["public_ip"]
    assert public in topo.POOL
    # EC2 holds the route to G's ENI, and the router applies it.
    assert step.data["target"] == story.lab.aws.eni_id
    assert step.data["kernel"] == f"{topo.PARTNER_NET} via {topo.GW_ENI} dev sn-1"
    # Its own S at the app server, through G; and the partner reaches it back at S.
    assert step.data["answered"] and step.data["body"] == f"app saw {public}"
    assert step.data["peers"] == [public] and step.data["at_g"] > 0
    assert step.data["inbound_body"] == f"{PRIV1} saw {topo.APP}"
    priv1 = story.lab.instance(PRIV1).private_ip
    assert f"{priv1} : {public}" in story.lab.nft_elements("map", "snat_map")
    assert step.data["asked"] == [] and asked_private(story.lab) == []
    assert step.ok, step.figure


def test_the_untagged_neighbour_is_dropped_at_the_gateway(story):
    step = story.private_neighbour_dropped(PRIV2)
    STEP_SECONDS[step.title] = step.data["step_seconds"]
    assert step.data["target"] == story.lab.aws.eni_id, step.figure
    assert not step.data["answered"] and step.data["peers"] == []
    assert step.data["at_g"] > 0, "the table sends the partner's network to G"
    assert step.data["dropped"] > 0, "the forward chain did not count the drop"
    assert asked_private(story.lab) == []
    assert step.ok, step.figure


def test_a_route_deleted_under_us_is_put_back_by_the_scheduled_reconcile(story):
    """Level-triggered: someone deletes tunnelnat's route; priv-1's packets stop reaching G (the
    router follows EC2); the scheduled full reconcile puts the route back, and traffic with it."""
    lab = story.lab
    ec2 = lab.aws.client("ec2")
    ec2.delete_route(
        RouteTableId=lab.aws.private_route_table_id, DestinationCidrBlock=topo.PARTNER_NET
    )
    target, kernel = story.private_table_route()
    assert target is None and kernel is None
    answered, _, at_g, _ = story.private_request(PRIV1)
    assert not answered and at_g == 0
    reply = story.controller.invoke(
        {
            "version": "0",
            "id": "lab-scheduled",
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": "123456789012",
            "time": "2026-11-24T12:05:00Z",
            "region": topo.REGION,
            "resources": [f"arn:aws:events:{topo.REGION}:123456789012:rule/lab-reconcile"],
            "detail": {},
        }
    )
    target, kernel = story.private_table_route()
    assert target == lab.aws.eni_id, reply
    assert kernel == f"{topo.PARTNER_NET} via {topo.GW_ENI} dev sn-1"
    answered, body, at_g, peers = story.private_request(PRIV1, timeout=3)
    public = story.private_public
    assert answered and body == f"app saw {public}" and peers == [public] and at_g > 0
    assert asked_private(lab) == []


def test_the_route_goes_with_the_last_enrolled_instance_behind_the_table(story):
    step = story.private_last_leaves(PRIV1)
    STEP_SECONDS[step.title] = step.data["step_seconds"]
    assert step.data["outcome"]["status"] == "not-tagged", step.figure
    assert step.data["target"] is None, "the route is still in EC2's table"
    assert step.data["kernel"] is None, "the router still routes the partner's network"
    assert story.lab.instance(PRIV1).private_ip not in step.data["stored"]
    assert not step.data["answered"] and step.data["at_g"] == 0
    assert asked_private(story.lab) == []
    assert step.ok, step.figure


def test_a_foreign_route_is_left_alone_and_reported(story):
    step = story.foreign_route_left_alone(PRIV1)
    STEP_SECONDS[step.title] = step.data["step_seconds"]
    assert step.data["outcome"]["status"] == "route-conflict", step.figure
    assert story.lab.aws.private_route_table_id in step.data["reason"]
    assert step.data["eni"] in step.data["reason"]
    assert step.data["status_tag"] == "route-conflict"
    # Neither replaced on enrolment nor deleted when the instance left.
    assert step.data["target"] == step.data["eni"]
    assert step.data["target_after_leave"] == step.data["eni"]
    assert step.data["kernel"] == f"{topo.PARTNER_NET} via {FOREIGN_APPLIANCE} dev sn-2"
    assert not step.data["answered"] and step.data["at_g"] == 0 and step.data["peers"] == []
    assert asked_private(story.lab) == []
    assert step.ok, step.figure


def test_the_demo_steps_stay_short():
    assert len(STEP_SECONDS) == 4, STEP_SECONDS
    assert sum(STEP_SECONDS.values()) <= 40, STEP_SECONDS


def test_no_document_was_ever_asked_for_a_private_instance(story):
    lab = story.lab
    assert asked_private(lab) == []
    # ... while web instances and the gateway did get theirs (the port records every ask).
    assert any(doc == "SyncNatTable" for _, doc in lab.commands.asked)
