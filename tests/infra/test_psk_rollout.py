"""PskRollout (issue 11, point 5): a new PSK re-runs ConfigureTunnel on the gateway by itself.

The events the rule is tried against are shaped as AWS documents them (Secrets Manager user guide,
"Secret Label Updated event"; CloudTrail entries for Secrets Manager), with this stack's values.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from moto.events.models import EventPattern

from stacks.psk_rollout import secret_pattern
from stacks.settings import load_settings
from tests.infra.conftest import statements, synthesize

ACCOUNT, REGION = "123456789012", "eu-west-1"
IMPORTED = "tunnelnat/partner-psk"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The variant whose PSK secret exists already and is imported by name."""
    return synthesize(tmp_path_factory.mktemp("cdk.out"), {"psk_secret_name": IMPORTED})


def resolve(value: Any, refs: dict[str, str]) -> Any:
    """CloudFormation intrinsics with the values a deploy would give them (enough for these)."""
    if isinstance(value, list):
        return [resolve(v, refs) for v in value]
    if not isinstance(value, dict):
        return value
    if "Ref" in value:
        return refs[value["Ref"]]
    if "Fn::GetAtt" in value:
        return refs[".".join(value["Fn::GetAtt"])]
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(resolve(p, refs) for p in parts)
    if "Fn::Split" in value:
        separator, text = value["Fn::Split"]
        return resolve(text, refs).split(separator)
    if "Fn::Select" in value:
        index, items = value["Fn::Select"]
        return resolve(items, refs)[int(index)]
    return {k: resolve(v, refs) for k, v in value.items()}


def deployed(s) -> dict[str, str]:
    """Plausible deploy-time values for every Ref/GetAtt the template uses."""
    refs = {
        "AWS::Partition": "aws",
        "AWS::Region": REGION,
        "AWS::AccountId": ACCOUNT,
        "AWS::URLSuffix": "amazonaws.com",
    }
    for logical_id, resource in s.json["Resources"].items():
        refs[logical_id] = f"{logical_id}-ref"
        refs[f"{logical_id}.Arn"] = f"arn:aws:iam::{ACCOUNT}:role/{logical_id}"
        refs[f"{logical_id}.PublicIp"] = "198.51.100.77"
        if resource["Type"] == "AWS::SecretsManager::Secret":
            # CloudFormation names a secret <logical id>-<random>; its ARN adds -<6 random>.
            refs[logical_id] = (
                f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{logical_id}-AbCdEfGhIj-Xy12Zq"
            )
    return refs


def deployment(s) -> str:
    return load_settings(s.stack.node.get_all_context()).stack.deployment


def rule(s) -> dict[str, Any]:
    return s.resources("AWS::Events::Rule")[s.logical_id(s.stack.psk_rollout.rule)]["Properties"]


def label_updated(name: str, arn: str, label: str = "AWSCURRENT") -> dict[str, Any]:
    return {
        "version": "0",
        "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
        "detail-type": "Secret Label Updated",
        "source": "aws.secretsmanager",
        "account": ACCOUNT,
        "time": "2026-11-30T10:43:48Z",
        "region": REGION,
        "resources": [arn],
        "detail": {"name": name, "labelUpdated": label, "versionId": "a1b2c3d4-5678"},
    }


def cloudtrail_put(arn: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": "0d8ba2a7-8c5f-4c6a-a3f2-0f0b3f1d9c11",
        "detail-type": "AWS API Call via CloudTrail",
        "source": "aws.secretsmanager",
        "account": ACCOUNT,
        "time": "2026-11-30T10:43:47Z",
        "region": REGION,
        "resources": [],
        "detail": {
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": "PutSecretValue",
            "requestParameters": {"secretId": arn},
            "responseElements": {"arn": arn},
        },
    }


def matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    return EventPattern.load(json.dumps(pattern)).matches_event(event)


# -- what triggers ---------------------------------------------------------------------------------
def test_the_rule_fires_when_the_created_secrets_current_version_changes(s):
    refs = deployed(s)
    secret_id = s.logical_id(s.stack.gateway.psk)
    arn = refs[secret_id]
    name = resolve(s.stack.resolve(s.stack.gateway.psk_name), refs)
    props = rule(s)
    assert props["State"] == "ENABLED"
    pattern = resolve(props["EventPattern"], refs)
    assert pattern["resources"] == [arn], "this secret only, by its full ARN"
    assert matches(pattern, label_updated(name, arn))
    assert not matches(pattern, label_updated(name, arn, label="AWSPENDING"))
    assert not matches(pattern, label_updated(name, arn, label="custom"))
    other = arn.replace(secret_id, "SomeoneElsesSecret")
    assert not matches(pattern, label_updated("SomeoneElsesSecret-AbCdEfGhIj", other))
    elsewhere = label_updated(name, arn) | {"account": "210987654321"}
    assert not matches(pattern, elsewhere)
    assert not matches(pattern, cloudtrail_put(arn)), "no CloudTrail trail is needed or used"


def test_an_imported_secret_is_matched_by_its_name(imported):
    refs = deployed(imported)
    pattern = resolve(rule(imported)["EventPattern"], refs)
    assert "resources" not in pattern
    assert pattern["detail"]["name"] == [IMPORTED]
    arn = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{IMPORTED}-Q1w2E3"
    assert matches(pattern, label_updated(IMPORTED, arn))
    assert not matches(pattern, label_updated(f"{IMPORTED}-old", arn.replace(IMPORTED, "x")))
    assert not matches(pattern, label_updated(IMPORTED, arn, label="AWSPREVIOUS"))


def test_secret_pattern_names_one_secret_either_way():
    by_arn = secret_pattern(secret_arn="arn:x", secret_name="n", account="1")
    by_name = secret_pattern(secret_arn=None, secret_name="n", account="1")
    assert by_arn["resources"] == ["arn:x"] and "name" not in by_arn["detail"]
    assert by_name["detail"] == {"labelUpdated": ["AWSCURRENT"], "name": ["n"]}
    assert "resources" not in by_name


# -- what runs -------------------------------------------------------------------------------------
def test_the_target_runs_configure_tunnel_on_the_gateway_with_its_associations_parameters(s):
    refs = deployed(s)
    [target] = rule(s)["Targets"]
    prefix = s.stack.documents.prefix
    assert resolve(target["Arn"], refs) == (
        f"arn:aws:ssm:{REGION}:{ACCOUNT}:document/{prefix}ConfigureTunnel"
    )
    # Issue 21, finding 1: the gateway group's members, never a tag anyone may set.
    group = {"Key": "tag:aws:autoscaling:groupName", "Values": [f"{deployment(s)}-gateway"]}
    assert target["RunCommandParameters"] == {"RunCommandTargets": [group]}
    association = s.resources("AWS::SSM::Association")[
        s.logical_id(s.stack.gateway.tunnel_association)
    ]
    assert association["Properties"]["Name"] == {
        "Ref": s.logical_id(s.stack.documents.resources["ConfigureTunnel"])
    }
    expected = resolve(association["Properties"]["Parameters"], refs)
    assert json.loads(resolve(target["Input"], refs)) == expected
    assert expected["PskSecretName"] == [resolve(s.stack.resolve(s.stack.gateway.psk_name), refs)]
    assert "TableName" not in expected, "the NAT table (ConfigureGateway) is not re-applied"
    assert association["Properties"]["Targets"] == [group], "the same instances"
    assert target["RetryPolicy"]["MaximumEventAgeInSeconds"] <= 3600
    assert target["RoleArn"] == {"Fn::GetAtt": [s.logical_id(s.stack.psk_rollout.role), "Arn"]}


def test_the_input_fits_eventbridge(s):
    """A target's Input is at most 8,192 characters; values here are never long."""
    refs = deployed(s)
    assert len(resolve(rule(s)["Targets"][0]["Input"], refs)) < 8192 // 2


def test_the_role_may_send_only_configure_tunnel_only_to_this_gateway(s):
    refs = deployed(s)
    role = s.resources("AWS::IAM::Role")[s.logical_id(s.stack.psk_rollout.role)]["Properties"]
    [trust] = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "events.amazonaws.com"}
    assert trust["Action"] == "sts:AssumeRole"
    assert "ManagedPolicyArns" not in role
    [policy] = role["Policies"]
    found = resolve(statements({"Properties": {"PolicyDocument": policy["PolicyDocument"]}}), refs)
    by_sid = {st["Sid"]: st for st in found}
    assert set(by_sid) == {"RunOnlyConfigureTunnel", "OnThisDeploymentsGateways"}
    for st in found:
        assert st["Effect"] == "Allow" and st["Action"] == "ssm:SendCommand"
    prefix = s.stack.documents.prefix
    assert by_sid["RunOnlyConfigureTunnel"]["Resource"] == (
        f"arn:aws:ssm:{REGION}:{ACCOUNT}:document/{prefix}ConfigureTunnel"
    )
    gateway = by_sid["OnThisDeploymentsGateways"]
    assert gateway["Resource"] == f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/*"
    assert gateway["Condition"] == {
        "StringEquals": {"ssm:resourceTag/aws:autoscaling:groupName": f"{deployment(s)}-gateway"}
    }
    # No other policy is attached to the role.
    for policy_res in s.resources("AWS::IAM::Policy").values():
        roles = policy_res["Properties"].get("Roles", [])
        assert {"Ref": s.logical_id(s.stack.psk_rollout.role)} not in roles


def test_no_lambda_was_added_for_it(s):
    assert not [k for k in s.resources("AWS::Lambda::Function") if k.startswith("PskRollout")]


# -- compliance ------------------------------------------------------------------------------------
def test_cfn_lint_has_nothing_to_say_about_it(s):
    beside = Path(sys.executable).with_name("cfn-lint")
    found = str(beside) if beside.exists() else shutil.which("cfn-lint")
    assert found, "cfn-lint is not installed (requirements-dev.txt)"
    result = subprocess.run(
        [found, "--format", "parseable", str(s.template_file)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    ours = [line for line in result.stdout.splitlines() if "PskRollout" in line]
    assert ours == [], "\n".join(ours)


def test_cdk_nag_ran_and_its_one_finding_here_is_acknowledged_with_a_reason(s):
    """Synthesis raises on an unacknowledged finding (cdk-nag 3.x); this is the one accepted."""
    report = json.loads((s.outdir / "validation-report.json").read_text())
    assert [v for r in report["pluginReports"] for v in r.get("violations", [])] == []
    found = {}
    for construct in s.stack.psk_rollout.node.find_all():
        for entry in construct.node.metadata:
            if entry.type == "aws:cdk:acknowledged-rules":
                path = construct.node.path.removeprefix(f"{s.stack.node.id}/")
                found |= {
                    (path, rule.split("::", 1)[-1]): reason for rule, reason in entry.data.items()
                }
    assert list(found) == [
        (
            "PskRollout/Role",
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>"
            ":<AWS::AccountId>:instance/*]",
        )
    ]
    [reason] = found.values()
    assert len(reason) >= 40 and reason.endswith(".")
