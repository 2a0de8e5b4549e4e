"""cdk-nag (AwsSolutions) and cfn-lint on the synthesized quick-start stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk import aws_ec2 as ec2

from stacks.application import build_app
from tests.infra.conftest import example_context, synthesize

# Every finding we acknowledge, where, and why is in the code next to it (reviewed here).
EXPECTED_ACKNOWLEDGEMENTS = {
    ("Controller/Function", "AwsSolutions-L1"),
    ("Controller/Role/DefaultPolicy", "AwsSolutions-IAM5[Resource::*]"),
    (
        "Controller/Role/DefaultPolicy",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>"
        ":instance/*]",
    ),
    (
        "Controller/Role/DefaultPolicy",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:autoscaling:<AWS::Region>"
        ":<AWS::AccountId>:autoScalingGroup:*]",
    ),
    # Route-table mode: route changes only on route tables whose VPC is the gateway's.
    (
        "Controller/Role/DefaultPolicy",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>"
        ":route-table/*]",
    ),
    ("Gateway/Psk", "AwsSolutions-SMG4"),
    # Issue 20: the agents cache the heartbeat key; a rotation would split the pair.
    ("Gateway/HeartbeatKey", "AwsSolutions-SMG4"),
    # Issue 21: no AmazonSSMManagedInstanceCore (its ssm:GetParameter* on *): the agent's own
    # actions, inline.
    ("Gateway/Role", "AwsSolutions-IAM5[Resource::*]"),
    (
        "Gateway/Role",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>"
        ":instance/*]",
    ),
    # Issue 21: the gateway group by its name (only its UUID is a wildcard).
    (
        "Gateway/Role",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:autoscaling:<AWS::Region>"
        ":<AWS::AccountId>:autoScalingGroup:*:autoScalingGroupName/tunnelnat-gateway]",
    ),
    # Issue 20: the primary ENIs' source/destination check, on the launch template's tags.
    (
        "Gateway/Role",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>"
        ":network-interface/*]",
    ),
    ("Gateway/Group", "AwsSolutions-AS3"),
    ("Healer/Function", "AwsSolutions-L1"),
    ("Healer/Role/DefaultPolicy", "AwsSolutions-IAM5[Resource::*]"),
    (
        "Healer/Role/DefaultPolicy",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>"
        ":instance/*]",
    ),
    (
        "Healer/Role/DefaultPolicy",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:cloudwatch:<AWS::Region>"
        ":<AWS::AccountId>:alarm:tunnelnat-tunnelnat-TunnelUp-*]",
    ),
    (
        "PskRollout/Role",
        "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>"
        ":instance/*]",
    ),
}


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    # Synthesis itself fails if cdk-nag reports an unacknowledged error.
    return synthesize(tmp_path_factory.mktemp("cdk.out"))


def test_cdk_nag_reports_no_unacknowledged_finding(s):
    report = json.loads((s.outdir / "validation-report.json").read_text())
    violations = [v for r in report["pluginReports"] for v in r.get("violations", [])]
    assert violations == []


def test_every_acknowledgement_is_expected_and_has_a_reason(s):
    found = {}
    for construct in s.stack.node.find_all():
        for entry in construct.node.metadata:
            if entry.type != "aws:cdk:acknowledged-rules":
                continue
            for rule, reason in entry.data.items():
                if "AwsSolutions" not in rule:
                    continue
                path = construct.node.path.removeprefix(f"{s.stack.node.id}/")
                found[(path, rule.split("::", 1)[-1])] = reason
    assert set(found) == EXPECTED_ACKNOWLEDGEMENTS
    for key, reason in found.items():
        assert len(reason) >= 40 and reason.endswith("."), key


def test_cdk_nag_is_wired_in(tmp_path):
    """The control: an obviously bad resource makes synthesis fail with the rule's id."""
    app, stack = build_app(example_context(), outdir=str(tmp_path))
    group = ec2.SecurityGroup(stack, "WideOpen", vpc=stack.node.find_child("Vpc"))
    group.add_ingress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(22))
    with pytest.raises(Exception, match="AwsSolutions-EC23"):
        app.synth()
    report = (tmp_path / "validation-report.json").read_text()
    assert "AwsSolutions-EC23" in report


def _cfn_lint() -> str:
    beside = Path(sys.executable).with_name("cfn-lint")
    found = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed (requirements-dev.txt)"
    return found


def test_cfn_lint_finds_no_error(s):
    result = subprocess.run(
        [_cfn_lint(), "--non-zero-exit-code", "error", str(s.template_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    errors = [
        line for line in result.stdout.splitlines() if line[:1] == "E" and line[1:5].isdigit()
    ]
    assert errors == []
