from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from tunnelnat.core.config import TunnelnatConfig
from tunnelnat.core.enrolment import (
    AddressPool,
    AllowList,
    Mode,
    ObservedInstance,
    Status,
    decide_enrolment,
    public_address_for,
)


@pytest.fixture
def config(config_values):
    return TunnelnatConfig.from_mapping(config_values)


def instance(**overrides) -> ObservedInstance:
    values = {
        "instance_id": "i-0123456789abcdef0",
        "state": "running",
        "private_ip": IPv4Address("10.10.1.21"),
        "public_ip": None,
        "subnet_id": "subnet-1",
        "tags": {"tunnelnat": "enabled", "Name": "web-1"},
    }
    values.update(overrides)
    return ObservedInstance(**values)


@pytest.mark.parametrize(
    ("observed", "enrol", "status"),
    [
        (instance(), True, Status.ENROLLED),
        (None, False, Status.GONE),
        (instance(state="terminated"), False, Status.GONE),
        (instance(state="shutting-down"), False, Status.GONE),
        (instance(tags={}), False, Status.NOT_TAGGED),
        (instance(tags={"tunnelnat": "disabled"}), False, Status.INVALID_TAG),
        (instance(tags={"tunnelnat": "enabled; rm -rf /"}), False, Status.INVALID_TAG),
        (instance(state="stopped"), False, Status.NOT_RUNNING),
        (instance(state="pending"), False, Status.NOT_RUNNING),
        (instance(private_ip=None), False, Status.NO_PRIVATE_IP),
        (instance(private_ip=IPv4Address("10.10.2.21")), False, Status.UNSUPPORTED_SUBNET),
        (
            instance(tags={"tunnelnat": "enabled", "tunnelnat:role": "gateway"}),
            False,
            Status.IS_GATEWAY,
        ),
    ],
)
def test_enrolment_decision(config, observed, enrol, status):
    decision = decide_enrolment(observed, config)
    assert (decision.enrol, decision.status) == (enrol, status)
    assert decision.reason


def test_hostile_tag_value_is_quoted_in_the_reason(config):
    decision = decide_enrolment(instance(tags={"tunnelnat": "$(id)\n"}), config)
    assert decision.status is Status.INVALID_TAG
    assert "'$(id)\\n'" in decision.reason


def test_instance_mode_needs_a_public_ip(config_values):
    config_values.update(nat_mode="instance", address_pool=[])
    config = TunnelnatConfig.from_mapping(config_values)
    assert decide_enrolment(instance(), config).status is Status.NO_PUBLIC_IP
    with_ip = instance(public_ip=IPv4Address("198.51.100.77"))
    assert decide_enrolment(with_ip, config).enrol
    assert public_address_for(with_ip, config, current=None, claimed=[]) == with_ip.public_ip


def test_dedicated_mode_takes_the_first_free_address_and_keeps_it(config):
    pool = [IPv4Address(a) for a in ("203.0.113.10", "203.0.113.11", "203.0.113.12")]
    assert public_address_for(instance(), config, current=None, claimed=[]) == pool[0]
    assert public_address_for(instance(), config, current=None, claimed=pool[:2]) == pool[2]
    assert public_address_for(instance(), config, current=pool[1], claimed=pool) == pool[1]
    assert public_address_for(instance(), config, current=None, claimed=pool) is None
    # An address that left the pool is not kept.
    outsider = IPv4Address("203.0.113.99")
    assert public_address_for(instance(), config, current=outsider, claimed=[]) == pool[0]


def test_shared_mode_gives_everyone_the_same_address(config_values):
    config_values.update(nat_mode="shared", address_pool=[], shared_address="203.0.113.100")
    config = TunnelnatConfig.from_mapping(config_values)
    got = public_address_for(instance(), config, current=None, claimed=[])
    assert got == IPv4Address("203.0.113.100")


def test_address_pool_set_semantics():
    pool = AddressPool([IPv4Address("203.0.113.2"), IPv4Address("203.0.113.1")])
    assert len(pool) == 2
    assert IPv4Address("203.0.113.1") in pool
    assert pool.free([IPv4Address("203.0.113.1")]) == [IPv4Address("203.0.113.2")]


def test_an_instance_of_another_vpc_is_never_enrolled(config):
    """Issue 14, finding 2: in range of the gateway's subnet, but not in the gateway's VPC."""
    ours = "vpc-0aaaaaaaaaaaaaaaa"
    far = instance(vpc_id="vpc-0bbbbbbbbbbbbbbbb")
    decision = decide_enrolment(far, config, vpc_id=ours)
    assert (decision.enrol, decision.status) == (False, Status.OTHER_VPC)
    assert ours in decision.reason and "vpc-0bbbbbbbbbbbbbbbb" in decision.reason
    assert decide_enrolment(instance(vpc_id=ours), config, vpc_id=ours).enrol
    assert decide_enrolment(instance(vpc_id=None), config, vpc_id=ours).status is Status.OTHER_VPC


def test_the_status_tag_key_names_the_deployment():
    from tunnelnat.core.enrolment import status_tag

    assert status_tag("blue") == "tunnelnat:status:blue"
    assert status_tag("blue") != status_tag("green")


# -- route-table mode (issue 13) --------------------------------------------------------------
def test_another_subnet_of_our_vpc_is_route_table_mode_when_it_is_on(config):
    far = instance(private_ip=IPv4Address("10.10.2.21"), subnet_id="subnet-2", vpc_id="vpc-1")
    decision = decide_enrolment(far, config, vpc_id="vpc-1", route_tables=True)
    assert (decision.enrol, decision.status, decision.mode) == (
        True,
        Status.ENROLLED,
        Mode.ROUTE_TABLE,
    )
    assert "subnet-2" in decision.reason
    here = instance(vpc_id="vpc-1")
    assert decide_enrolment(here, config, vpc_id="vpc-1", route_tables=True).mode is (
        Mode.HOST_ROUTE
    ), "the gateway's own subnet keeps the host route"


@pytest.mark.parametrize(
    ("vpc_id", "route_tables", "subnet_id", "status"),
    [
        ("vpc-1", False, "subnet-2", Status.UNSUPPORTED_SUBNET),  # route-table mode off
        (None, True, "subnet-2", Status.UNSUPPORTED_SUBNET),  # the VPC unknown: never guess
        ("vpc-1", True, None, Status.UNSUPPORTED_SUBNET),  # no subnet to find a table for
        ("vpc-9", True, "subnet-2", Status.OTHER_VPC),  # another VPC, whatever its address
    ],
)
def test_what_route_table_mode_still_cannot_serve(config, vpc_id, route_tables, subnet_id, status):
    far = instance(private_ip=IPv4Address("10.10.2.21"), subnet_id=subnet_id, vpc_id="vpc-1")
    decision = decide_enrolment(far, config, vpc_id=vpc_id, route_tables=route_tables)
    assert (decision.enrol, decision.status) == (False, status)


# -- issue 21: who may enrol, and who is the gateway ------------------------------------------
ALLOWED = AllowList(frozenset({"subnet-1"}), frozenset({"web-asg"}))


def in_group(group: str | None, **overrides) -> ObservedInstance:
    tags = {"tunnelnat": "enabled"}
    if group is not None:
        tags["aws:autoscaling:groupName"] = group
    return instance(tags=tags, **overrides)


@pytest.mark.parametrize(
    ("observed", "allowed", "status", "named"),
    [
        (in_group("web-asg"), ALLOWED, Status.ENROLLED, None),
        (in_group("web-asg"), AllowList(), Status.ENROLLED, None),
        (in_group(None), AllowList(frozenset({"subnet-1"})), Status.ENROLLED, None),
        (in_group("web-asg", subnet_id="subnet-9"), ALLOWED, Status.NOT_ALLOWED, "subnet-9"),
        (in_group("other-asg"), ALLOWED, Status.NOT_ALLOWED, "other-asg"),
        (in_group(None), ALLOWED, Status.NOT_ALLOWED, "no Auto Scaling group"),
        # Outside, and stopped: not-allowed still (the reason that matters), never enrolled.
        (in_group("x", state="stopped"), ALLOWED, Status.NOT_ALLOWED, "x"),
    ],
)
def test_a_tagged_instance_outside_the_allow_list_is_not_allowed(
    config, observed, allowed, status, named
):
    decision = decide_enrolment(observed, config, allowed=allowed)
    assert decision.status is status and decision.enrol is (status is Status.ENROLLED)
    if named:
        assert named in decision.reason, "the reason names the subnet or group"


def test_an_untagged_instance_outside_the_allow_list_is_only_not_tagged(config):
    decision = decide_enrolment(instance(tags={}, subnet_id="subnet-9"), config, allowed=ALLOWED)
    assert decision.status is Status.NOT_TAGGED


def test_the_gateway_is_its_groups_member_never_whoever_carries_the_label(config):
    """Issue 21: the tunnelnat:role label decides nothing when the group is known."""
    member = in_group("acme-gateway")
    labelled = instance(tags={"tunnelnat": "enabled", "tunnelnat:role": "gateway"})
    assert decide_enrolment(member, config, gateway_group="acme-gateway").status is (
        Status.IS_GATEWAY
    )
    assert decide_enrolment(labelled, config, gateway_group="acme-gateway").enrol
