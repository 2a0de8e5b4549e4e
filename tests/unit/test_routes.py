"""Route-table mode's pure decisions (core/routes.py): which table serves a subnet, and what a
table needs for its members. No AWS."""

from __future__ import annotations

import pytest

from tunnelnat.adapters.routes import Ec2Routes
from tunnelnat.core.routes import (
    DefaultRouteRefused,
    ObservedRoute,
    RouteTableView,
    opted_in,
    plan_table,
    table_for_subnet,
    table_from_describe,
)

ENI, OLD_ENI = "eni-0aaaaaaaaaaaaaaaa", "eni-0bbbbbbbbbbbbbbbb"
A, B = "192.0.2.0/24", "198.51.100.0/28"


def table(*routes: ObservedRoute, table_id: str = "rtb-1") -> RouteTableView:
    return RouteTableView(table_id, "vpc-1", routes={r.destination: r for r in routes})


def route(destination: str, target: str, **kw) -> ObservedRoute:
    return ObservedRoute(destination, target, **kw)


def test_the_subnets_own_table_else_the_main_one():
    main = RouteTableView("rtb-main", "vpc-1", main=True)
    own = RouteTableView("rtb-own", "vpc-1", subnets=frozenset({"subnet-2"}))
    assert table_for_subnet("subnet-2", [main, own]) == "rtb-own"
    assert table_for_subnet("subnet-3", [main, own]) == "rtb-main"
    assert table_for_subnet("subnet-3", [own]) is None


def test_describe_reply_is_read_with_its_targets_and_without_ipv6_or_prefix_lists():
    raw = {
        "RouteTableId": "rtb-1",
        "VpcId": "vpc-1",
        "Associations": [{"Main": True}, {"SubnetId": "subnet-2", "Main": False}],
        "Routes": [
            {"DestinationCidrBlock": "10.10.0.0/16", "GatewayId": "local",
             "Origin": "CreateRouteTable", "State": "active"},
            {"DestinationCidrBlock": A, "NetworkInterfaceId": ENI, "InstanceId": "i-1",
             "Origin": "CreateRoute", "State": "blackhole"},
            {"DestinationIpv6CidrBlock": "::/0", "GatewayId": "igw-1"},
            {"DestinationPrefixListId": "pl-1", "GatewayId": "vpce-1"},
        ],
    }  # fmt: skip
    view = table_from_describe(raw)
    assert view.main and view.subnets == {"subnet-2"}
    assert set(view.routes) == {"10.10.0.0/16", A}
    assert view.routes[A].target == ENI, "the ENI, not the instance it is attached to"
    assert view.routes[A].describe() == f"{A} -> {ENI}, blackhole"


def test_first_member_creates_one_route_per_partner_network():
    changes = plan_table(table(), members={"i-1", "i-2"}, owned={}, destinations=[A, B], eni=ENI)
    assert changes.create == (A, B) and not changes.conflicts
    assert changes.owned == {A: ENI, B: ENI} == changes.owned_during


def test_nothing_to_do_while_our_routes_stand():
    changes = plan_table(
        table(route(A, ENI)), members={"i-1"}, owned={A: ENI}, destinations=[A], eni=ENI
    )
    assert not changes.calls and not changes.conflicts and changes.owned == {A: ENI}


def test_our_route_deleted_under_us_is_created_again():
    changes = plan_table(table(), members={"i-1"}, owned={A: ENI}, destinations=[A], eni=ENI)
    assert changes.create == (A,)


def test_the_last_member_gone_deletes_only_our_routes_as_we_left_them():
    view = table(route(A, ENI), route(B, "tgw-1"))
    changes = plan_table(view, members=set(), owned={A: ENI, B: ENI}, destinations=[A, B], eni=ENI)
    assert changes.delete == (A,), "B was re-pointed by someone: theirs now"
    assert changes.owned == {} and changes.owned_during == {A: ENI}, "forgotten once deleted"


@pytest.mark.parametrize(
    ("existing", "owned", "changed"),
    [
        (route(A, "igw-1"), {}, False),  # someone else's route
        (route(A, ENI), {}, False),  # to our ENI, but not made by us: not ours to delete later
        (route(A, "vgw-1", origin="EnableVgwRoutePropagation"), {}, False),  # propagated
        (route(A, "tgw-1"), {A: ENI}, True),  # ours, pointed elsewhere since
    ],
)
def test_a_route_it_did_not_create_is_a_conflict_never_touched(existing, owned, changed):
    changes = plan_table(table(existing), members={"i-1"}, owned=owned, destinations=[A], eni=ENI)
    assert not changes.calls
    [conflict] = changes.conflicts
    assert conflict.changed is changed
    assert conflict.describe().startswith(f"route table rtb-1 has {A} -> {existing.target}")
    assert changes.owned == {}, "never recorded as ours"


def test_our_route_at_an_old_eni_is_re_pointed():
    changes = plan_table(
        table(route(A, OLD_ENI)), members={"i-1"}, owned={A: OLD_ENI}, destinations=[A], eni=ENI
    )
    assert changes.replace == (A,) and changes.owned == {A: ENI}


def test_a_partner_network_dropped_from_the_settings_loses_its_route():
    view = table(route(A, ENI), route(B, ENI))
    changes = plan_table(view, members={"i-1"}, owned={A: ENI, B: ENI}, destinations=[A], eni=ENI)
    assert changes.delete == (B,) and changes.owned == {A: ENI}
    assert changes.owned_during == {A: ENI, B: ENI}


# -- issue 21, finding 6: routes we do not own, around or inside a partner network ------------
@pytest.mark.parametrize(
    ("foreign", "relation", "diverts"),
    [
        # Narrower: by longest prefix match, that part of A goes to tgw-1, not the tunnel.
        ("192.0.2.128/25", "narrower", "192.0.2.128/25 of it would go to tgw-1"),
        ("192.0.2.7/32", "narrower", "192.0.2.7/32 of it would go to tgw-1"),
        # Broader: a route of ours would take A from tgw-1 (corporate traffic to the partner).
        ("192.0.0.0/16", "broader", "would take 192.0.2.0/24 from tgw-1"),
        ("192.0.2.0/23", "broader", "would take 192.0.2.0/24 from tgw-1"),
    ],
)
def test_a_foreign_route_inside_or_around_a_partner_network_is_a_conflict(
    foreign, relation, diverts
):
    """b08b1c8 saw only a foreign route with exactly a partner network's destination: the
    instance was reported enrolled while part of A went elsewhere, or ours silently took
    traffic another route carried."""
    view = table(route(foreign, "tgw-1"))
    changes = plan_table(view, members={"i-1"}, owned={}, destinations=[A], eni=ENI)
    [found] = changes.conflicts
    assert (found.relation, found.partner, found.route.destination) == (relation, A, foreign)
    assert diverts in found.describe() and "rtb-1" in found.describe()
    assert A not in changes.create, "never created while a foreign route overlaps it"
    assert B not in {c.partner for c in changes.conflicts}


def test_the_default_route_our_own_eni_and_the_vpc_elsewhere_are_no_conflict():
    view = table(
        route("0.0.0.0/0", "igw-1"),  # what route-table mode takes the partner's networks from
        route("10.10.0.0/16", "local", origin="CreateRouteTable"),
        route("192.0.2.0/25", ENI),  # to the gateway anyway
    )
    changes = plan_table(view, members={"i-1"}, owned={}, destinations=[A], eni=ENI)
    assert changes.conflicts == () and changes.create == (A,)


def test_a_local_route_around_a_partner_network_is_a_conflict():
    """The partner's network inside the VPC's own CIDR: a route of ours would take part of
    the VPC's traffic."""
    view = table(route("192.0.0.0/16", "local", origin="CreateRouteTable"))
    [found] = plan_table(view, members={"i-1"}, owned={}, destinations=[A], eni=ENI).conflicts
    assert found.relation == "broader" and "from local" in found.describe()


def test_a_route_of_ours_in_place_stays_when_a_narrower_one_appears():
    view = table(route(A, ENI), route("192.0.2.128/25", "pcx-1"))
    changes = plan_table(view, members={"i-1"}, owned={A: ENI}, destinations=[A], eni=ENI)
    assert not changes.calls and changes.owned == {A: ENI}
    assert [c.relation for c in changes.conflicts] == ["narrower"]


def test_a_default_route_is_never_planned_nor_sent():
    """Issue 21, finding 7: route-table mode may change any route, 0.0.0.0/0 included."""
    with pytest.raises(DefaultRouteRefused):
        plan_table(table(), members={"i-1"}, owned={}, destinations=["0.0.0.0/0"], eni=ENI)
    calls = []

    class Ec2:
        def __getattr__(self, name):
            return lambda **kw: calls.append((name, kw))

    routes = Ec2Routes(Ec2())
    for call in (
        lambda: routes.create("rtb-1", "0.0.0.0/0", ENI),
        lambda: routes.replace("rtb-1", "0.0.0.0/0", ENI),
        lambda: routes.delete("rtb-1", "0.0.0.0/0"),
    ):
        with pytest.raises(DefaultRouteRefused):
            call()
    assert calls == []
    routes.create("rtb-1", A, ENI)
    assert calls == [("create_route", {"RouteTableId": "rtb-1", "DestinationCidrBlock": A,
                                       "NetworkInterfaceId": ENI})]  # fmt: skip


def test_only_tables_the_owner_opted_in_for_this_deployment():
    tagged = RouteTableView("rtb-1", "vpc-1", tags={"tunnelnat:routes": "acme"})
    assert opted_in(tagged, "acme") and not opted_in(tagged, "acme-2")
    assert opted_in(RouteTableView("rtb-2", "vpc-1"), "acme", listed={"rtb-2"})
    assert not opted_in(RouteTableView("rtb-3", "vpc-1"), "acme", listed={"rtb-2"})
    raw = {"RouteTableId": "rtb-4", "VpcId": "vpc-1",
           "Tags": [{"Key": "tunnelnat:routes", "Value": "acme"}]}  # fmt: skip
    assert opted_in(table_from_describe(raw), "acme")
