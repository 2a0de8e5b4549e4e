"""Issue 21: each role's synthesized policies, evaluated offline (tests/infra/iam_eval.py), allow
exactly what its code does on exactly its own resources, and refuse the issue's attacks.

Each table row is one call: what it is, the action, the resources (ARN -> the request context IAM
would see for that resource: its tags as ``ssm:resourceTag/...`` or ``aws:ResourceTag/...``, its
VPC, ...), and whether it is allowed. Rows marked with a finding number are the issue's attacks;
each fails on b08b1c8 (its policies allowed them) and passes now.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.infra.conftest import synthesize
from tests.infra.iam_eval import (
    ACCOUNT,
    Resolver,
    is_allowed,
    resource_policy_statements,
    role_statements,
)

DEPLOYMENT = "tunnelnat"
GROUP = f"{DEPLOYMENT}-gateway"
KEY = "tunnelnat"  # the default deployment's enrolment key
STATUS = f"tunnelnat:status:{DEPLOYMENT}"
LISTED_TABLE = "rtb-0aaaaaaaaaaaaaaa1"
WRITER = f"arn:aws:iam::{ACCOUNT}:role/psk-operators"
CONTEXT = {"route_tables": [LISTED_TABLE], "psk_writer_arns": [WRITER]}


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"), CONTEXT)


@dataclass(frozen=True)
class Row:
    what: str
    action: str
    resources: dict[str, dict[str, Any]]
    allowed: bool
    shared: dict[str, Any] = field(default_factory=dict)


class World:
    """ARNs and tag contexts of the synthesized stack, as a request would carry them."""

    def __init__(self, s) -> None:
        self.s = s
        self.r = Resolver(s.json)
        stack = s.stack
        self.vpc_id = self.r.resolve(s.ref(stack.node.find_child("Vpc")))
        self.vpc = self.r.arn("ec2", f"vpc/{self.vpc_id}")
        subnet = stack.node.find_child("Vpc").public_subnets[0]
        self.subnet = self.r.arn("ec2", f"subnet/{self.r.resolve(s.ref(subnet))}")
        self.eni_id = self.r.resolve(s.ref(stack.gateway.eni))
        self.eni = self.r.arn("ec2", f"network-interface/{self.eni_id}")
        self.table = self.r.resolve(s.arn(stack.controller.table))
        self.psk = self.r.resolve(s.ref(stack.gateway.psk))
        self.psk_key = self.r.resolve(s.arn(stack.gateway.psk_key))
        self.gateway_role = self.r.resolve(s.arn(stack.gateway.role))
        self.group = self.r.arn(
            "autoscaling", f"autoScalingGroup:0f1e2d3c-uuid:autoScalingGroupName/{GROUP}"
        )
        software = stack.software
        self.assets = f"arn:aws:s3:::{self.r.resolve(stack.resolve(software.bucket))}"
        self.package = f"{self.assets}/{software.key}"
        self.software_parameter = self.r.arn("ssm", f"parameter{software.parameter_name}")

    def doc(self, stem: str, deployment: str = DEPLOYMENT) -> str:
        return self.r.arn("ssm", f"document/{deployment}-{stem}")

    def instance(self, name: str) -> str:
        return self.r.arn("ec2", f"instance/i-{name}")

    def rtb(self, name: str) -> str:
        return self.r.arn("ec2", f"route-table/{name}")

    def policies(self, construct) -> list[dict[str, Any]]:
        return role_statements(self.s.json, self.s.logical_id(construct))


# Instances as SendCommand sees them (ssm:resourceTag/<key>) and as EC2 sees them.
def ssm_tags(**tags: str) -> dict[str, str]:
    return {f"ssm:resourceTag/{k.replace('__', ':')}": v for k, v in tags.items()}


ENROLLED = {f"ssm:resourceTag/{KEY}": "enabled"}
MARKED = {f"ssm:resourceTag/{STATUS}": "enrolled"}
GATEWAY = {"ssm:resourceTag/aws:autoscaling:groupName": GROUP}
# Finding 1: an instance tagged exactly like a gateway, outside the group.
LOOKALIKE = {
    "ssm:resourceTag/tunnelnat:role": "gateway",
    "ssm:resourceTag/tunnelnat:deployment": DEPLOYMENT,
    "ssm:resourceTag/tunnelnat:gateway": DEPLOYMENT,
}
OTHER_GATEWAY = {"ssm:resourceTag/aws:autoscaling:groupName": "other-gateway"}


def check(policies, rows: list[Row], **kwargs) -> None:
    wrong = [
        f"{'allowed' if not row.allowed else 'denied'}: {row.what}"
        for row in rows
        if is_allowed(policies, row.action, row.resources, shared_context=row.shared, **kwargs)
        is not row.allowed
    ]
    assert not wrong, "\n".join(wrong)


# -- the controller ----------------------------------------------------------------------------
def controller_rows(w: World) -> list[Row]:
    send = "ssm:SendCommand"
    ec2_enrolled = {f"aws:ResourceTag/{KEY}": "enabled", "ec2:Vpc": w.vpc}
    status_only = {"aws:TagKeys": [STATUS]}
    rows = [
        Row(
            "AddHostRoute on an enrolled instance",
            send,
            {w.doc("AddHostRoute"): {}, w.instance("enrolled"): ENROLLED},
            True,
        ),
        Row(
            "RemoveHostRoute on an instance it marked (enrolment tag removed)",
            send,
            {w.doc("RemoveHostRoute"): {}, w.instance("marked"): MARKED},
            True,
        ),
        Row(
            "SyncNatTable on a gateway of the group",
            send,
            {w.doc("SyncNatTable"): {}, w.instance("gw"): GATEWAY},
            True,
        ),
        Row(
            "SyncNatTable on both gateways at once",
            send,
            {w.doc("SyncNatTable"): {}, w.instance("gw1"): GATEWAY, w.instance("gw2"): GATEWAY},
            True,
        ),
        Row(
            "its status tag on an enrolled instance of its VPC",
            "ec2:CreateTags",
            {w.instance("enrolled"): {**ec2_enrolled, **status_only}},
            True,
        ),
        Row(
            "its status tag where EC2 gives no ec2:Vpc",
            "ec2:CreateTags",
            {w.instance("enrolled"): {f"aws:ResourceTag/{KEY}": "no", **status_only}},
            True,
        ),
        Row(
            "removing its status tag where only the status tag is left",
            "ec2:DeleteTags",
            {
                w.instance("marked"): {
                    f"aws:ResourceTag/{STATUS}": "enrolled",
                    "ec2:Vpc": w.vpc,
                    **status_only,
                }
            },
            True,
        ),
        Row(
            "a route in a route table tagged tunnelnat:routes=<deployment>",
            "ec2:CreateRoute",
            {
                w.rtb("rtb-0bbbbbbbbbbbbbbb2"): {
                    "aws:ResourceTag/tunnelnat:routes": DEPLOYMENT,
                    "ec2:Vpc": w.vpc,
                }
            },
            True,
        ),
        Row(
            "a route in a route table of route_tables",
            "ec2:DeleteRoute",
            {w.rtb(LISTED_TABLE): {"ec2:Vpc": w.vpc}},
            True,
        ),
        Row("DescribeInstances", "ec2:DescribeInstances", {"*": {}}, True),
        Row("GetCommandInvocation", "ssm:GetCommandInvocation", {"*": {}}, True),
        Row("its table", "dynamodb:UpdateItem", {w.table: {}}, True),
        # -- attacks --------------------------------------------------------------------------
        Row(
            "finding 2: ConfigureTunnel (root, the PSK) on the gateway",
            send,
            {w.doc("ConfigureTunnel"): {}, w.instance("gw"): GATEWAY},
            False,
        ),
        *(
            Row(
                f"finding 2: {stem} on the gateway",
                send,
                {w.doc(stem): {}, w.instance("gw"): GATEWAY},
                False,
            )
            for stem in (
                "ConfigureGateway",
                "InstallHealthAgent",
                "RestartTunnel",
                "ShowTunnels",
                "Switchover",
            )
        ),
        Row(
            "finding 2: AWS-RunShellScript on an enrolled instance",
            send,
            {
                "arn:aws:ssm:eu-west-1::document/AWS-RunShellScript": {},
                w.instance("enrolled"): ENROLLED,
            },
            False,
        ),
        Row(
            "finding 2: another deployment's AddHostRoute",
            send,
            {w.doc("AddHostRoute", "other"): {}, w.instance("enrolled"): ENROLLED},
            False,
        ),
        Row(
            "finding 1: SyncNatTable on a lookalike gateway (tags, no group)",
            send,
            {w.doc("SyncNatTable"): {}, w.instance("lookalike"): LOOKALIKE},
            False,
        ),
        Row(
            "finding 4: SyncNatTable on another deployment's gateway",
            send,
            {w.doc("SyncNatTable"): {}, w.instance("other-gw"): OTHER_GATEWAY},
            False,
        ),
        Row(
            "finding 4: RemoveHostRoute on an instance marked by another deployment",
            send,
            {
                w.doc("RemoveHostRoute"): {},
                w.instance("b"): {"ssm:resourceTag/tunnelnat:status:other": "enrolled"},
            },
            False,
        ),
        Row(
            "finding 2: AddHostRoute on an untagged instance",
            send,
            {w.doc("AddHostRoute"): {}, w.instance("plain"): {}},
            False,
        ),
        Row(
            "finding 2: its status tag on an arbitrary instance (no enrolment key)",
            "ec2:CreateTags",
            {w.instance("plain"): {"ec2:Vpc": w.vpc, **status_only}},
            False,
        ),
        Row(
            "finding 2: its status tag on an instance of another VPC",
            "ec2:CreateTags",
            {
                w.instance("elsewhere"): {
                    f"aws:ResourceTag/{KEY}": "enabled",
                    "ec2:Vpc": w.r.arn("ec2", "vpc/vpc-0other"),
                    **status_only,
                }
            },
            False,
        ),
        Row(
            "finding 2: a status tag where the instance carries only the status tag",
            "ec2:CreateTags",
            {w.instance("marked"): {f"aws:ResourceTag/{STATUS}": "x", **status_only}},
            False,
        ),
        Row(
            "the enrolment tag itself (the controller never enrols)",
            "ec2:CreateTags",
            {w.instance("enrolled"): {**ec2_enrolled, "aws:TagKeys": [KEY]}},
            False,
        ),
        Row(
            "its status tag with another key in the same call",
            "ec2:CreateTags",
            {w.instance("enrolled"): {**ec2_enrolled, "aws:TagKeys": [STATUS, "Name"]}},
            False,
        ),
        Row(
            "DeleteTags without a key list (deletes every tag)",
            "ec2:DeleteTags",
            {w.instance("enrolled"): ec2_enrolled},
            False,
        ),
        Row(
            "finding 7: a route in a route table nobody opted in",
            "ec2:CreateRoute",
            {w.rtb("rtb-0ccccccccccccccc3"): {"ec2:Vpc": w.vpc}},
            False,
        ),
        Row(
            "finding 7: ReplaceRoute in the VPC's main route table (0.0.0.0/0's)",
            "ec2:ReplaceRoute",
            {w.rtb("rtb-0main0000000000"): {"ec2:Vpc": w.vpc}},
            False,
        ),
        Row(
            "finding 4: a route table opted in for another deployment",
            "ec2:CreateRoute",
            {
                w.rtb("rtb-0ddddddddddddddd4"): {
                    "aws:ResourceTag/tunnelnat:routes": "other",
                    "ec2:Vpc": w.vpc,
                }
            },
            False,
        ),
        Row(
            "a tagged route table of another VPC",
            "ec2:CreateRoute",
            {
                w.rtb("rtb-0eeeeeeeeeeeeeee5"): {
                    "aws:ResourceTag/tunnelnat:routes": DEPLOYMENT,
                    "ec2:Vpc": w.r.arn("ec2", "vpc/vpc-0other"),
                }
            },
            False,
        ),
        Row("another table", "dynamodb:GetItem", {w.r.arn("dynamodb", "table/other"): {}}, False),
        Row("ssm:GetParameter", "ssm:GetParameter", {"*": {}}, False),
    ]
    return rows


def test_controller_may_do_what_its_code_does_and_nothing_of_the_attacks(s):
    w = World(s)
    check(w.policies(s.stack.controller.role), controller_rows(w))


# -- the healer and the PSK rollout --------------------------------------------------------------
def healer_rows(w: World) -> list[Row]:
    send = "ssm:SendCommand"
    return [
        Row(
            "RestartTunnel on a gateway of the group",
            send,
            {w.doc("RestartTunnel"): {}, w.instance("gw"): GATEWAY},
            True,
        ),
        Row(
            "finding 1: RestartTunnel on a lookalike gateway",
            send,
            {w.doc("RestartTunnel"): {}, w.instance("lookalike"): LOOKALIKE},
            False,
        ),
        Row(
            "finding 4: RestartTunnel on another deployment's gateway",
            send,
            {w.doc("RestartTunnel"): {}, w.instance("other"): OTHER_GATEWAY},
            False,
        ),
        Row(
            "SyncNatTable on the gateway",
            send,
            {w.doc("SyncNatTable"): {}, w.instance("gw"): GATEWAY},
            False,
        ),
        Row(
            "ConfigureTunnel on the gateway",
            send,
            {w.doc("ConfigureTunnel"): {}, w.instance("gw"): GATEWAY},
            False,
        ),
        Row(
            "its TunnelUp alarms",
            "cloudwatch:DescribeAlarms",
            {w.r.arn("cloudwatch", f"alarm:tunnelnat-{DEPLOYMENT}-TunnelUp-partner"): {}},
            True,
        ),
        Row(
            "finding 4: another deployment's alarms",
            "cloudwatch:DescribeAlarms",
            {w.r.arn("cloudwatch", "alarm:tunnelnat-other-TunnelUp-partner"): {}},
            False,
        ),
        Row(
            "its records", "dynamodb:PutItem", {w.table: {"dynamodb:LeadingKeys": ["healer"]}}, True
        ),
        Row(
            "the controller's records",
            "dynamodb:PutItem",
            {w.table: {"dynamodb:LeadingKeys": ["instance"]}},
            False,
        ),
        Row(
            "the gateway's own report before a restart",
            "dynamodb:GetItem",
            {w.table: {"dynamodb:LeadingKeys": ["gateway"]}},
            True,
        ),
        Row(
            "a gateway's report, written",
            "dynamodb:PutItem",
            {w.table: {"dynamodb:LeadingKeys": ["gateway"]}},
            False,
        ),
    ]


def test_healer_restarts_only_the_groups_gateways(s):
    w = World(s)
    check(w.policies(s.stack.healer.role), healer_rows(w))


def psk_rollout_rows(w: World) -> list[Row]:
    send = "ssm:SendCommand"
    return [
        Row(
            "ConfigureTunnel on a gateway of the group",
            send,
            {w.doc("ConfigureTunnel"): {}, w.instance("gw"): GATEWAY},
            True,
        ),
        Row(
            "finding 1: ConfigureTunnel on a lookalike gateway",
            send,
            {w.doc("ConfigureTunnel"): {}, w.instance("lookalike"): LOOKALIKE},
            False,
        ),
        Row(
            "ConfigureGateway on the gateway",
            send,
            {w.doc("ConfigureGateway"): {}, w.instance("gw"): GATEWAY},
            False,
        ),
    ]


def test_psk_rollout_runs_only_configure_tunnel_on_the_group(s):
    w = World(s)
    check(w.policies(s.stack.psk_rollout.role), psk_rollout_rows(w))


def test_the_psk_rollout_rule_targets_the_group_by_its_aws_tag(s):
    (rule,) = [
        r
        for r in s.resources("AWS::Events::Rule").values()
        if "RunCommandParameters" in str(r["Properties"].get("Targets"))
    ]
    (target,) = rule["Properties"]["Targets"]
    assert target["RunCommandParameters"]["RunCommandTargets"] == [
        {"Key": "tag:aws:autoscaling:groupName", "Values": [GROUP]}
    ]


# -- the gateway -------------------------------------------------------------------------------
def gateway_rows(w: World) -> list[Row]:
    in_group = {"aws:ResourceTag/aws:autoscaling:groupName": GROUP}
    lookalike = {
        "aws:ResourceTag/tunnelnat:role": "gateway",
        "aws:ResourceTag/tunnelnat:deployment": DEPLOYMENT,
    }
    primary = {
        "aws:ResourceTag/tunnelnat:role": "gateway",
        "aws:ResourceTag/tunnelnat:deployment": DEPLOYMENT,
        "aws:ResourceTag/tunnelnat:interface": "gateway-primary",
        "ec2:Subnet": w.subnet,
    }
    other_group = w.group.replace(GROUP, "other-gateway")
    put = "cloudwatch:PutMetricData"
    via = {"kms:ViaService": "secretsmanager.eu-west-1.amazonaws.com"}
    return [
        *(
            Row(f"the SSM agent: {a}", a, {"*": {}}, True)
            for a in (
                "ssm:UpdateInstanceInformation",
                "ssm:ListInstanceAssociations",
                "ssm:UpdateInstanceAssociationStatus",
                "ssm:GetDocument",
                "ssmmessages:OpenControlChannel",
                "ec2messages:GetMessages",
            )
        ),
        Row("its PSK", "secretsmanager:GetSecretValue", {w.psk: {}}, True),
        Row("decrypt the PSK through Secrets Manager", "kms:Decrypt", {w.psk_key: via}, True),
        Row("its table", "dynamodb:Query", {w.table: {}}, True),
        Row(
            "TunnelUp in tunnelnat/<deployment>",
            put,
            {"*": {"cloudwatch:namespace": f"tunnelnat/{DEPLOYMENT}"}},
            True,
        ),
        Row(
            "attach G's ENI to a gateway of the group",
            "ec2:AttachNetworkInterface",
            {w.eni: {}, w.instance("gw"): in_group},
            True,
        ),
        Row(
            "take G's ENI from the other gateway",
            "ec2:DetachNetworkInterface",
            {w.eni: {}, w.instance("gw2"): in_group},
            True,
        ),
        Row(
            "source/destination check off on its primary ENI",
            "ec2:ModifyNetworkInterfaceAttribute",
            {
                w.r.arn("ec2", "network-interface/eni-0primary"): {
                    **primary,
                    "ec2:Attribute": "sourceDestCheck",
                }
            },
            True,
        ),
        Row(
            "... where the request carries no ec2:Attribute",
            "ec2:ModifyNetworkInterfaceAttribute",
            {w.r.arn("ec2", "network-interface/eni-0primary"): primary},
            True,
        ),
        Row("mark itself unhealthy", "autoscaling:SetInstanceHealth", {w.group: {}}, True),
        # The gateway software (issue 22): the package's object, the parameter naming it.
        Row("fetch the gateway software", "s3:GetObject", {w.package: {}}, True),
        Row(
            "read which software the stack deployed",
            "ssm:GetParameter",
            {w.software_parameter: {}},
            True,
        ),
        Row(
            "complete its terminating hook",
            "autoscaling:CompleteLifecycleAction",
            {w.group: {}},
            True,
        ),
        # -- attacks --------------------------------------------------------------------------
        Row(
            "finding 7: ssm:GetParameter on any parameter",
            "ssm:GetParameter",
            {w.r.arn("ssm", "parameter/prod/db-password"): {}},
            False,
        ),
        Row(
            "another deployment's software parameter",
            "ssm:GetParameter",
            {w.software_parameter.replace(f"/{DEPLOYMENT}/", "/other/"): {}},
            False,
        ),
        Row(
            "another object of the asset bucket (e.g. the Lambda code)",
            "s3:GetObject",
            {f"{w.assets}/0123abcd.zip": {}},
            False,
        ),
        Row("any other bucket's object", "s3:GetObject", {"arn:aws:s3:::other/x.pyz": {}}, False),
        Row("overwrite the package", "s3:PutObject", {w.package: {}}, False),
        Row("change the software parameter", "ssm:PutParameter", {w.software_parameter: {}}, False),
        Row("finding 7: ssm:GetParameters", "ssm:GetParameters", {"*": {}}, False),
        Row("finding 7: ssm:GetParametersByPath", "ssm:GetParametersByPath", {"*": {}}, False),
        Row(
            "finding 7: another secret",
            "secretsmanager:GetSecretValue",
            {w.r.arn("secretsmanager", "secret:prod/db-AbCdEf"): {}},
            False,
        ),
        Row(
            "finding 7: decrypt with the PSK's key outside Secrets Manager",
            "kms:Decrypt",
            {w.psk_key: {}},
            False,
        ),
        Row(
            "finding 3: TunnelUp in the shared namespace tunnelnat",
            put,
            {"*": {"cloudwatch:namespace": "tunnelnat"}},
            False,
        ),
        Row(
            "finding 3/4: TunnelUp in another deployment's namespace",
            put,
            {"*": {"cloudwatch:namespace": "tunnelnat/other"}},
            False,
        ),
        Row(
            "finding 1: attach G's ENI to a lookalike (tags, no group)",
            "ec2:AttachNetworkInterface",
            {w.eni: {}, w.instance("lookalike"): lookalike},
            False,
        ),
        Row(
            "attach another ENI",
            "ec2:AttachNetworkInterface",
            {w.r.arn("ec2", "network-interface/eni-0other"): {}, w.instance("gw"): in_group},
            False,
        ),
        Row(
            "finding 1: detach G's ENI from a lookalike",
            "ec2:DetachNetworkInterface",
            {w.eni: {}, w.instance("lookalike"): lookalike},
            False,
        ),
        Row(
            "finding 7: another attribute (security groups) of its primary ENI",
            "ec2:ModifyNetworkInterfaceAttribute",
            {
                w.r.arn("ec2", "network-interface/eni-0primary"): {
                    **primary,
                    "ec2:Attribute": "groupSet",
                }
            },
            False,
        ),
        Row(
            "finding 7: the check on G's ENI (no primary tag)",
            "ec2:ModifyNetworkInterfaceAttribute",
            {
                w.eni: {
                    "aws:ResourceTag/tunnelnat:role": "gateway",
                    "aws:ResourceTag/tunnelnat:deployment": DEPLOYMENT,
                    "ec2:Subnet": w.subnet,
                }
            },
            False,
        ),
        Row(
            "the check on a tagged ENI of another subnet",
            "ec2:ModifyNetworkInterfaceAttribute",
            {
                w.r.arn("ec2", "network-interface/eni-0x"): {
                    **primary,
                    "ec2:Subnet": w.r.arn("ec2", "subnet/subnet-0other"),
                }
            },
            False,
        ),
        Row(
            "ModifyInstanceAttribute (the instance's check)",
            "ec2:ModifyInstanceAttribute",
            {w.instance("gw"): in_group},
            False,
        ),
        Row(
            "finding 4: another group's health",
            "autoscaling:SetInstanceHealth",
            {other_group: {}},
            False,
        ),
        Row(
            "finding 4: another group's lifecycle hook",
            "autoscaling:CompleteLifecycleAction",
            {other_group: {}},
            False,
        ),
        Row(
            "write its table's instance records",
            "dynamodb:PutItem",
            {w.table: {"dynamodb:LeadingKeys": ["instance"]}},
            False,
        ),
        Row("write the PSK", "secretsmanager:PutSecretValue", {w.psk: {}}, False),
    ]


def test_gateway_role_has_no_managed_policy_and_only_its_own_calls(s):
    w = World(s)
    _, role = next(
        (k, v) for k, v in s.json["Resources"].items() if k == s.logical_id(s.stack.gateway.role)
    )
    assert "ManagedPolicyArns" not in role["Properties"]  # AmazonSSMManagedInstanceCore gone
    check(
        w.policies(s.stack.gateway.role),
        gateway_rows(w),
        principal=w.gateway_role,
        resource_policies={w.psk: psk_policy(s)},
    )


# -- the PSK secret: a customer key and a resource policy ----------------------------------------
def psk_policy(s) -> list[dict[str, Any]]:
    return resource_policy_statements(
        s.json, "AWS::SecretsManager::ResourcePolicy", "SecretId", s.logical_id(s.stack.gateway.psk)
    )


def test_the_psk_is_encrypted_with_a_rotated_customer_key(s):
    psk = s.json["Resources"][s.logical_id(s.stack.gateway.psk)]
    assert psk["Properties"]["KmsKeyId"] == s.arn(s.stack.gateway.psk_key)
    key = s.json["Resources"][s.logical_id(s.stack.gateway.psk_key)]
    assert key["Properties"]["EnableKeyRotation"] is True
    assert key["DeletionPolicy"] == "Retain"


def psk_rows(w: World) -> list[Row]:
    admin = f"arn:aws:iam::{ACCOUNT}:role/Admin"
    return [
        Row(
            "finding 7: an administrator reads the PSK",
            "secretsmanager:GetSecretValue",
            {w.psk: {"aws:PrincipalArn": admin}},
            False,
        ),
        Row(
            "finding 7: an administrator writes the PSK",
            "secretsmanager:PutSecretValue",
            {w.psk: {"aws:PrincipalArn": admin}},
            False,
        ),
        Row(
            "an administrator describes it",
            "secretsmanager:DescribeSecret",
            {w.psk: {"aws:PrincipalArn": admin}},
            True,
        ),
        Row(
            "the psk_writer_arns role writes it (tunnelnat psk set)",
            "secretsmanager:PutSecretValue",
            {w.psk: {"aws:PrincipalArn": WRITER}},
            True,
        ),
        Row(
            "the psk_writer_arns role cannot read it",
            "secretsmanager:GetSecretValue",
            {w.psk: {"aws:PrincipalArn": WRITER}},
            False,
        ),
        Row(
            "the gateway reads it",
            "secretsmanager:GetSecretValue",
            {w.psk: {"aws:PrincipalArn": w.gateway_role}},
            True,
        ),
    ]


def test_the_psk_resource_policy_denies_all_but_the_gateway_and_the_writers(s):
    w = World(s)
    everything = [{"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}]
    check(everything, psk_rows(w), resource_policies={w.psk: psk_policy(s)})


# -- counted for docs/security.md and the report -----------------------------------------------
def test_each_table_has_allowed_and_denied_rows(s):
    w = World(s)
    for rows in (
        controller_rows(w),
        healer_rows(w),
        psk_rollout_rows(w),
        gateway_rows(w),
        psk_rows(w),
    ):
        assert any(r.allowed for r in rows) and any(not r.allowed for r in rows)


def counts_table(w: World) -> str:
    """docs/security.md's counts of the tables above."""
    lines = ["| role | allowed calls | refused calls |", "|---|---|---|"]
    for name, rows in (
        ("controller", controller_rows(w)),
        ("healer", healer_rows(w)),
        ("psk rollout", psk_rollout_rows(w)),
        ("gateway", gateway_rows(w)),
        ("PSK secret (resource policy)", psk_rows(w)),
    ):
        allowed = sum(r.allowed for r in rows)
        lines.append(f"| {name} | {allowed} | {len(rows) - allowed} |")
    return "\n".join(lines)


def test_docs_security_counts_the_tables(s):
    from tests.infra.conftest import ROOT

    assert counts_table(World(s)) in (ROOT / "docs" / "security.md").read_text()
