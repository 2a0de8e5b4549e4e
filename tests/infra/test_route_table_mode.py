"""Issue 13 in the template: the created VPC's private subnet, the controller's route permissions
scoped to the gateway's VPC, the gateway admitting the VPC's CIDRs, and tunnelnat's lifecycle
hooks on the user's existing Auto Scaling groups."""

from __future__ import annotations

import re

import pytest
from aws_cdk.assertions import Annotations, Match

from stacks.controller import HOOK_HEARTBEAT_SECONDS
from tests.infra.conftest import as_list, statements, synthesize
from tunnelnat.adapters import route_records, routes
from tunnelnat.core.config import ConfigError
from tunnelnat.delivery import backoff_seconds
from tunnelnat.events import HOOK_PREFIX
from tunnelnat.service import RETRY_RESERVE_SECONDS

GROUPS = ["web-fleet", "batch-workers"]
EXISTING = {
    "vpc_id": "vpc-0123456789abcdef0",
    "gateway_subnet_id": "subnet-0123456789abcdef0",
    "gateway_subnet_cidr": "10.10.1.0/24",
    "gateway_private_ip": "10.10.1.5",
    "vpc_cidrs": "10.10.0.0/16,100.64.0.0/20",
    "region": "eu-west-1",
    "account": "123456789012",
}


@pytest.fixture(scope="module")
def created(tmp_path_factory):
    """The example deployment with its own VPC, the user's groups named, SSM endpoints on."""
    return synthesize(
        tmp_path_factory.mktemp("cdk.out"),
        {"auto_scaling_groups": ",".join(GROUPS), "private_subnet_ssm_endpoints": "true"},
    )


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"), EXISTING)


def controller_statements(s):
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(s.stack.controller.role.node.find_child("DefaultPolicy"))
    ]
    return statements(policy)


def test_the_created_vpc_has_a_private_subnet_beside_the_gateways(created):
    subnets = {k: v["Properties"] for k, v in created.resources("AWS::EC2::Subnet").items()}
    cidrs = sorted(p["CidrBlock"] for p in subnets.values())
    assert cidrs == ["10.80.0.0/24", "10.80.1.0/24"]
    private = [p for p in subnets.values() if p["CidrBlock"] == "10.80.1.0/24"]
    assert not private[0].get("MapPublicIpOnLaunch")
    # Isolated: no NAT gateway, no default route to the internet from its table.
    assert not created.resources("AWS::EC2::NatGateway")
    routes_ = [r["Properties"] for r in created.resources("AWS::EC2::Route").values()]
    assert len([r for r in routes_ if r.get("DestinationCidrBlock") == "0.0.0.0/0"]) == 1


def test_ssm_endpoints_only_when_asked(created, existing):
    endpoints = created.resources("AWS::EC2::VPCEndpoint")
    names = sorted(str(e["Properties"]["ServiceName"]) for e in endpoints.values())
    assert len(names) == 3
    assert [n for n in names if re.search(r"\.(ssm|ssmmessages|ec2messages)\b", n)] == names
    assert all(e["Properties"]["PrivateDnsEnabled"] for e in endpoints.values())
    assert not existing.resources("AWS::EC2::VPCEndpoint")


def test_the_gateway_admits_the_vpcs_cidrs_secondary_too(created, existing):
    for s, cidrs in ((created, {"10.80.0.0/16"}), (existing, {"10.10.0.0/16", "100.64.0.0/20"})):
        sg = _gateway_sg(s)
        forwarded = {
            r["CidrIp"] for r in sg["Properties"]["SecurityGroupIngress"] if r["IpProtocol"] == "-1"
        }
        assert forwarded == cidrs


def _gateway_sg(s):
    return s.resources("AWS::EC2::SecurityGroup")[s.logical_id(s.stack.gateway.security_group)]


def test_the_controller_knows_the_gateways_eni(created):
    function = created.resources("AWS::Lambda::Function")[
        created.logical_id(created.stack.controller.function)
    ]
    env = function["Properties"]["Environment"]["Variables"]
    assert env["TUNNELNAT_GATEWAY_ENI_ID"] == created.ref(created.stack.gateway.eni)


def test_route_changes_only_on_opted_in_route_tables_of_the_gateways_vpc(existing):
    """Issue 21, finding 7: route tables their owner tagged tunnelnat:routes=<deployment>, in
    the gateway's VPC (tests/infra/test_least_privilege.py evaluates the calls)."""
    by_sid = {st.get("Sid"): st for st in controller_statements(existing)}
    changes = by_sid["RoutesInOptedInRouteTables"]
    assert sorted(as_list(changes["Action"])) == [
        "ec2:CreateRoute",
        "ec2:DeleteRoute",
        "ec2:ReplaceRoute",
    ]
    assert changes["Resource"] == "arn:aws:ec2:eu-west-1:123456789012:route-table/*"
    assert changes["Condition"] == {
        "ArnEquals": {"ec2:Vpc": "arn:aws:ec2:eu-west-1:123456789012:vpc/vpc-0123456789abcdef0"},
        "StringEquals": {"aws:ResourceTag/tunnelnat:routes": "tunnelnat"},
    }
    # Nowhere else (no route_tables list in this context): no other route action.
    for st in controller_statements(existing):
        actions = as_list(st["Action"])
        if any(a.endswith("Route") for a in actions):
            assert st is changes, st
    read = [st for st in controller_statements(existing)
            if "ec2:DescribeRouteTables" in as_list(st["Action"])]  # fmt: skip
    assert [st["Resource"] for st in read] == ["*"], "no resource-level permissions exist"


def test_the_role_allows_every_call_the_route_adapters_make(created):
    """What adapters/routes.py and adapters/route_records.py call, read from their source."""
    allowed = {a for st in controller_statements(created) for a in as_list(st["Action"])}
    calls = set()
    for module, service in ((routes, "ec2"), (route_records, "dynamodb")):
        source = open(module.__file__).read()  # noqa: SIM115, PTH123
        for op in re.findall(r"self\._(?:ec2|db)\.([a-z_]+)\(", source):
            if op == "get_paginator":
                continue
            calls.add(f"{service}:" + "".join(w.title() for w in op.split("_")))
        for op in re.findall(r'get_paginator\("([a-z_]+)"\)', source):
            calls.add(f"{service}:" + "".join(w.title() for w in op.split("_")))
    assert calls == {
        "ec2:DescribeRouteTables",
        "ec2:CreateRoute",
        "ec2:ReplaceRoute",
        "ec2:DeleteRoute",
        "dynamodb:Query",
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:DeleteItem",
    }
    assert calls <= allowed


def test_hooks_on_each_named_existing_group(created):
    hooks = [h["Properties"] for h in created.resources("AWS::AutoScaling::LifecycleHook").values()]
    ours = [h for h in hooks if h["AutoScalingGroupName"] in GROUPS]
    assert sorted((h["AutoScalingGroupName"], h["LifecycleHookName"]) for h in ours) == sorted(
        (group, f"tunnelnat-tunnelnat-{transition}")
        for group in GROUPS
        for transition in ("launch", "terminate")
    )
    for hook in ours:
        assert hook["LifecycleHookName"].startswith(HOOK_PREFIX)
        assert hook["HeartbeatTimeout"] == HOOK_HEARTBEAT_SECONDS
        # No notification target, no role: Auto Scaling sends the action to EventBridge.
        assert "NotificationTargetARN" not in hook and "RoleARN" not in hook
    launch = [h for h in ours if h["LifecycleHookName"].endswith("-launch")]
    assert len(launch) == len(GROUPS)
    assert {h["LifecycleTransition"] for h in launch} == {"autoscaling:EC2_INSTANCE_LAUNCHING"}
    assert {h["DefaultResult"] for h in launch} == {"ABANDON"}
    # Longer than the controller's longest wait between attempts, and than what it keeps back.
    assert HOOK_HEARTBEAT_SECONDS > max(backoff_seconds(a) for a in range(1, 20))
    assert HOOK_HEARTBEAT_SECONDS >= RETRY_RESERVE_SECONDS


def test_completing_actions_is_allowed_on_the_named_groups(created):
    by_sid = {st.get("Sid"): st for st in controller_statements(created)}
    named = by_sid["LifecycleOfNamedGroups"]
    assert sorted(as_list(named["Action"])) == [
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
    ]
    tails = sorted(r["Fn::Join"][1][-1] for r in as_list(named["Resource"]))
    assert tails == sorted(f":autoScalingGroup:*:autoScalingGroupName/{g}" for g in GROUPS)
    assert "Condition" not in named


def test_nag_finds_nothing_unacknowledged(created, existing):
    for s in (created, existing):
        errors = Annotations.from_stack(s.stack).find_error(
            "*", Match.string_like_regexp("AwsSolutions-.*")
        )
        assert errors == [], errors


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({k: v for k, v in EXISTING.items() if k != "vpc_cidrs"}, "vpc_cidrs"),
        ({"vpc_cidrs": "10.80.0.0/16"}, "vpc_cidrs"),
        ({"auto_scaling_groups": "web,web"}, "auto_scaling_groups"),
        ({"auto_scaling_groups": "arn:aws:autoscaling:x;rm"}, "auto_scaling_groups"),
        ({**EXISTING, "private_subnet_ssm_endpoints": "true"}, "private_subnet_ssm_endpoints"),
        ({**EXISTING, "vpc_cidrs": "10.10.0.0/16,198.51.100.0/24"}, "vpc_cidrs"),
    ],
)
def test_context_that_cannot_work_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        synthesize(tmp_path, overrides, nag=False)


def test_route_table_mode_off_keeps_the_old_shape(tmp_path):
    s = synthesize(tmp_path, {"route_table_mode": "false"}, nag=False)
    function = s.resources("AWS::Lambda::Function")[s.logical_id(s.stack.controller.function)]
    assert "TUNNELNAT_GATEWAY_ENI_ID" not in function["Properties"]["Environment"]["Variables"]
    actions = {a for st in controller_statements(s) for a in as_list(st["Action"])}
    assert not {a for a in actions if "Route" in a}
    sg = _gateway_sg(s)
    forwarded = {
        r["CidrIp"] for r in sg["Properties"]["SecurityGroupIngress"] if r["IpProtocol"] == "-1"
    }
    assert forwarded == {"10.80.0.0/24"}
