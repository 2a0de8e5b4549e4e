"""Issue 21, finding 4: two deployments in one app, account, region and VPC share nothing the
synthesized templates can show: names, hooks, enrolment keys, namespaces, state. (The two
controllers at run time: tests/lambdas, CONTROLLER's.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk import App

from stacks.application import add_deployment
from tests.infra.conftest import example_context
from tests.infra.iam_eval import is_allowed, role_statements
from tunnelnat.core.config import ConfigError

VPC = {
    "vpc_id": "vpc-0123456789abcdef0",
    "gateway_subnet_id": "subnet-0123456789abcdef0",
    "vpc_cidrs": ["10.80.0.0/16"],
    "account": "123456789012",
    "region": "eu-west-1",
    "availability_zone": "eu-west-1a",
}
# cdk.json gives no enrolment key: each deployment takes its default (tunnelnat:<deployment>).
A = example_context({**VPC, "deployment": "alpha", "gateway_private_ip": "10.80.0.10"})
B = example_context(
    {
        **VPC,
        "deployment": "beta",
        "gateway_private_ip": "10.80.0.20",
        "address_pool": ["192.0.2.20", "192.0.2.21"],
    }
)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    app = App(outdir=str(tmp_path_factory.mktemp("cdk.out")))
    a, b = add_deployment(app, A), add_deployment(app, B)
    assembly = app.synth()
    return {
        name: (stack, assembly.get_stack_by_name(stack.stack_name).template)
        for name, stack in (("alpha", a), ("beta", b))
    }


def _physical_names(template: dict[str, Any]) -> set[str]:
    """Every literal account-wide name the template gives a resource (a MetricName or a role's
    own PolicyName is not one)."""
    names = set()
    for resource in template["Resources"].values():
        for key, value in resource.get("Properties", {}).items():
            if key in GLOBAL_NAMES and isinstance(value, str):
                names.add(f"{resource['Type']}:{value}")
    return names


GLOBAL_NAMES = {
    "Name",
    "TableName",
    "QueueName",
    "FunctionName",
    "AutoScalingGroupName",
    "AlarmName",
    "DashboardName",
    "AssociationName",
    "RoleName",
    "LogGroupName",
    "TopicName",
}


def test_no_name_is_shared(two):
    (_, a), (_, b) = two["alpha"], two["beta"]
    shared = _physical_names(a) & _physical_names(b)
    assert not shared, sorted(shared)
    assert "AWS::AutoScaling::AutoScalingGroup:alpha-gateway" in _physical_names(a)


def test_each_deployments_lifecycle_rule_takes_only_its_hooks(two):
    for name, (stack, template) in two.items():
        rule = template["Resources"][
            stack.get_logical_id(stack.controller.rules["Lifecycle"].node.default_child)
        ]
        assert rule["Properties"]["EventPattern"]["detail"] == {
            "LifecycleHookName": [f"tunnelnat-{name}-launch", f"tunnelnat-{name}-terminate"]
        }
    # Exact names, not a prefix: `alpha`'s rule would take `alpha-2`'s hooks by prefix.
    assert "tunnelnat-alpha-2-launch".startswith("tunnelnat-alpha-")


def test_enrolment_keys_status_keys_and_namespaces_differ(two):
    seen: dict[str, set[str]] = {"key": set(), "namespace": set()}
    for name, (stack, _) in two.items():
        assert stack.settings.config.enrolment_tag_key == f"tunnelnat:{name}"
        seen["key"].add(stack.settings.config.enrolment_tag_key)
        seen["namespace"].add(stack.settings.stack.gateway_metric_namespace)
    assert all(len(v) == 2 for v in seen.values())


def test_one_explicit_key_for_both_in_one_vpc_fails_synthesis(tmp_path):
    app = App(outdir=str(tmp_path))
    add_deployment(app, {**A, "enrolment_tag_key": "enrol"})
    with pytest.raises(ConfigError, match="enrolment_tag_key 'enrol' is both 'alpha'"):
        add_deployment(app, {**B, "enrolment_tag_key": "enrol"})


def test_neither_role_reaches_the_others_gateways_instances_or_metrics(two):
    (sa, ta), (sb, tb) = two["alpha"], two["beta"]
    arn = "arn:aws:ec2:eu-west-1:123456789012:instance/i-0b"
    doc = "arn:aws:ssm:eu-west-1:123456789012:document/alpha-SyncNatTable"
    beta_gateway = {"ssm:resourceTag/aws:autoscaling:groupName": "beta-gateway"}
    beta_enrolled = {"ssm:resourceTag/tunnelnat:beta": "enabled"}
    alpha = role_statements(ta, sa.get_logical_id(sa.controller.role.node.default_child))
    for instance in (beta_gateway, beta_enrolled):
        assert not is_allowed(alpha, "ssm:SendCommand", {doc: {}, arn: instance})
    alpha_gateway = role_statements(ta, sa.get_logical_id(sa.gateway.role.node.default_child))
    put = {"*": {"cloudwatch:namespace": "tunnelnat/beta"}}
    assert not is_allowed(alpha_gateway, "cloudwatch:PutMetricData", put)
    beta_healer = role_statements(tb, sb.get_logical_id(sb.healer.role.node.default_child))
    restart = "arn:aws:ssm:eu-west-1:123456789012:document/beta-RestartTunnel"
    alpha_gw = {"ssm:resourceTag/aws:autoscaling:groupName": "alpha-gateway"}
    assert not is_allowed(beta_healer, "ssm:SendCommand", {restart: {}, arn: alpha_gw})
    assert is_allowed(
        beta_healer,
        "ssm:SendCommand",
        {restart: {}, arn: {"ssm:resourceTag/aws:autoscaling:groupName": "beta-gateway"}},
    )


def test_alarms_carry_the_deployment(two):
    for name, (_, template) in two.items():
        alarms = [
            r["Properties"]
            for r in template["Resources"].values()
            if r["Type"] == "AWS::CloudWatch::Alarm"
        ]
        for alarm in alarms:
            assert alarm["AlarmName"].startswith(f"tunnelnat-{name}-")
            text = json.dumps(alarm)
            assert (
                f"tunnelnat/{name}" in text
                or f'"Value": "{name}"' in text
                or ("Dimensions" in alarm and "QueueName" in text)
            ), alarm["AlarmName"]
