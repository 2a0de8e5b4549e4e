"""How many partners one stack holds (issue 23; docs/stack.md, Several partners): 30 partners
synthesize within CloudFormation's and IAM's default quotas. One synthesis (cdk-nag off: the
three-partner module runs it on the same constructs).

Quotas: 500 resources per stack and a template of at most 1 MB from S3 (CloudFormation User
Guide, "Understand CloudFormation quotas"); at most 10 managed policies per role by default,
20 on request (IAM User Guide, "IAM and AWS STS quotas"; AWS re:Post knowledge center
"iam-increase-policy-size"). CDK moves a role's statements beyond its inline policy's size
into managed policies (OverflowPolicy<n>): the controller's grow with each lane.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml

from tests.infra.test_partners_stack import SINGLE_KEYS, partners_context

PARTNERS = 30
MAX_RESOURCES = 500
MAX_TEMPLATE_BYTES = 1024 * 1024
MAX_MANAGED_POLICIES_PER_ROLE = 10
# EventBridge's default quota on an event pattern (EventBridge User Guide, EventBridge quotas).
MAX_EVENT_PATTERN = 2048
ENROLLER = "arn:aws:iam::123456789012:role/enroller"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    import tests.infra.conftest as conftest

    path = tmp_path_factory.mktemp("partners") / "partners.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "partners": [
                    {
                        "name": f"partner-{i:02d}",
                        "endpoint": f"198.51.100.{i + 1}",
                        "networks": [f"172.16.{i}.0/24"],
                        "auth": {"psk_secret": f"tunnelnat/partner-{i:02d}"},
                        "nat": {"mode": "dedicated", "pool": [f"203.0.113.{i + 1}"]},
                    }
                    for i in range(PARTNERS)
                ]
            }
        )
    )
    saved = dict(conftest.EXAMPLE_CONTEXT)
    try:
        for key in SINGLE_KEYS:
            conftest.EXAMPLE_CONTEXT.pop(key)
        # The enrolment watch on: its patterns list every partner's key twice.
        context = partners_context(path, enrolment_role_arn=ENROLLER)
        return conftest.synthesize(tmp_path_factory.mktemp("cdk.out"), context, nag=False)
    finally:
        conftest.EXAMPLE_CONTEXT.clear()
        conftest.EXAMPLE_CONTEXT.update(saved)


def test_thirty_partners_fit_cloudformations_quotas(s):
    assert len(s.stack.settings.lanes) == PARTNERS
    assert len(s.json["Resources"]) <= MAX_RESOURCES
    assert s.template_file.stat().st_size <= MAX_TEMPLATE_BYTES


def test_thirty_partners_fit_iams_default_managed_policies_per_role(s):
    attached: Counter[str] = Counter()
    for resource in s.json["Resources"].values():
        if resource["Type"] == "AWS::IAM::ManagedPolicy":
            for role in resource["Properties"].get("Roles", []):
                attached[role["Ref"]] += 1
    controller = s.logical_id(s.stack.controller.role)
    assert attached[controller] > 0  # the lanes' statements did overflow: the check is live
    assert max(attached.values()) <= MAX_MANAGED_POLICIES_PER_ROLE, attached


def test_every_partner_has_its_association_alarm_and_table(s):
    kinds = Counter(r["Type"] for r in s.json["Resources"].values())
    assert kinds["AWS::DynamoDB::Table"] == PARTNERS + 1
    assert kinds["AWS::SSM::Parameter"] >= PARTNERS
    # ConfigureGateway, InstallGatewaySoftware, InstallHealthAgent and one ConfigureTunnel each.
    assert kinds["AWS::SSM::Association"] == PARTNERS + 3


def test_every_partners_key_is_heard_by_rules_that_fit_eventbridge(s):
    lanes = s.stack.settings.lanes
    keys = ["tunnelnat", *(lane.tag_key for lane in lanes)]
    heard: list[str] = []
    for name, rule in s.stack.controller.rules.items():
        if not name.startswith("TagChange"):
            continue
        pattern = s.json["Resources"][s.logical_id(rule)]["Properties"]["EventPattern"]
        assert len(json.dumps(pattern, separators=(",", ":"))) <= MAX_EVENT_PATTERN
        heard += pattern["detail"]["changed-tag-keys"]
    assert heard == keys
    watched: dict[str, list[str]] = {"Ec2": [], "AutoScaling": []}
    for name, rule in s.stack.enrolment_watch.rules.items():
        pattern = s.json["Resources"][s.logical_id(rule)]["Properties"]["EventPattern"]
        # Its tokens (partition, account) resolve shorter than this text.
        assert len(json.dumps(pattern, separators=(",", ":"))) <= MAX_EVENT_PATTERN, name
        kind = "Ec2" if name.startswith("Ec2") else "AutoScaling"
        if kind == "Ec2":
            first, second = pattern["detail"]["$or"]
            assert (
                first["requestParameters"]["tagSet"]["items"]["key"]
                == (second["requestParameters"]["tagSpecificationSet"]["items"]["tags"]["key"])
            )
            watched[kind] += first["requestParameters"]["tagSet"]["items"]["key"]
        else:
            watched[kind] += pattern["detail"]["requestParameters"]["tags"]["key"]
    assert watched == {"Ec2": keys, "AutoScaling": keys}
    assert len(s.stack.enrolment_watch.rules) > 2  # the watch's patterns did need splitting
