"""EnrolmentWatch: a page when anyone but the enrolment role tags an instance for enrolment.

Enrolment is a tag (that is the product); an organisation keeps it for those who should have it
with an SCP or a permissions boundary (docs/security.md). This is the alarm behind that fence:
an EventBridge rule on CloudTrail's record of the tagging calls (``AWS API Call via CloudTrail``:
EC2 ``CreateTags`` and ``RunInstances`` with the enrolment key in its tag specifications, Auto
Scaling ``CreateOrUpdateTags`` and ``CreateAutoScalingGroup`` with it, since a group propagates
its tags to the instances it launches) by a principal other than ``enrolment_role_arn``, sent to
the alarm topic.

CloudTrail delivers management events to EventBridge only where a trail records them: "To
record events with a detail-type value of AWS API Call via CloudTrail, a CloudTrail trail with
logging enabled is required" (EventBridge User Guide, Events from AWS services delivered via
AWS CloudTrail). The stack does not create one (an organisation has its own): the rule is
opt-in (context ``enrolment_role_arn``) and docs/security.md says what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_cdk import Aws
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_sns as sns
from constructs import Construct

from stacks.lanes import split_to_fit
from stacks.settings import StackSettings

CLOUDTRAIL = "AWS API Call via CloudTrail"
# Auto Scaling launches an enrolled group's instances with the group's propagated tags through
# its service-linked role: that RunInstances is the group's tag at work (the group's own tagging
# is what pages), not a new enrolment.
AUTOSCALING_SERVICE_ROLE = (
    "role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"
)


def not_the_enrolment_role(role_arn: str, exempt: list[str]) -> dict[str, Any]:
    """``userIdentity`` of anyone but ``role_arn`` (and ``exempt``): an assumed role whose
    issuer is another role, or any other identity type (IAM user, root, federated user)."""
    return {
        "$or": [
            {"type": [{"anything-but": ["AssumedRole", "AWSService"]}]},
            {
                "type": ["AssumedRole"],
                "sessionContext": {
                    "sessionIssuer": {"arn": [{"anything-but": [role_arn, *exempt]}]}
                },
            },
        ]
    }


def _keys(enrolment_key: str | Sequence[str]) -> list[str]:
    return [enrolment_key] if isinstance(enrolment_key, str) else list(enrolment_key)


def ec2_pattern(
    enrolment_key: str | Sequence[str], role_arn: str, exempt: list[str]
) -> dict[str, Any]:
    """CreateTags, or RunInstances with a tag specification, putting the enrolment key (or, with
    a partners file, any partner's key)."""
    keys = _keys(enrolment_key)
    return {
        "source": ["aws.ec2"],
        "detail-type": [CLOUDTRAIL],
        "detail": {
            "eventSource": ["ec2.amazonaws.com"],
            "userIdentity": not_the_enrolment_role(role_arn, exempt),
            "$or": [
                {
                    "eventName": ["CreateTags"],
                    "requestParameters": {"tagSet": {"items": {"key": keys}}},
                },
                {
                    "eventName": ["RunInstances"],
                    "requestParameters": {
                        "tagSpecificationSet": {"items": {"tags": {"key": keys}}}
                    },
                },
            ],
        },
    }


def autoscaling_pattern(
    enrolment_key: str | Sequence[str], role_arn: str, exempt: list[str]
) -> dict[str, Any]:
    """A group given the enrolment key: it propagates it to every instance it launches."""
    return {
        "source": ["aws.autoscaling"],
        "detail-type": [CLOUDTRAIL],
        "detail": {
            "eventSource": ["autoscaling.amazonaws.com"],
            "eventName": ["CreateOrUpdateTags", "CreateAutoScalingGroup"],
            "userIdentity": not_the_enrolment_role(role_arn, exempt),
            "requestParameters": {"tags": {"key": _keys(enrolment_key)}},
        },
    }


class EnrolmentWatch(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: StackSettings,
        enrolment_key: str,
        topic: sns.ITopic,
        partner_keys: Sequence[str] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        assert settings.enrolment_role_arn is not None
        role = settings.enrolment_role_arn
        deployment = settings.deployment
        exempt = [f"arn:{Aws.PARTITION}:iam::{Aws.ACCOUNT_ID}:{AUTOSCALING_SERVICE_ROLE}"]
        message = events.RuleTargetInput.from_text(
            f"{deployment}: {events.EventField.from_path('$.detail.userIdentity.arn')} called "
            f"{events.EventField.from_path('$.detail.eventName')} with the enrolment key "
            f"{enrolment_key} (only {role} should): "
            f"{events.EventField.from_path('$.detail.requestParameters')}. Enrolment gives an "
            "instance the partner's network, an address of the pool and a root command "
            "(docs/security.md)."
        )
        self.rules: dict[str, events.CfnRule] = {}
        # A partners file: each partner's key enrols too (<enrolment key>:partner:<name>), in
        # as many rules as EventBridge's pattern size needs (stacks/lanes.py, split_to_fit).
        keys = [enrolment_key, *partner_keys]
        watched: list[tuple[str, str, dict[str, Any]]] = []
        for kind, build in (("Ec2", ec2_pattern), ("AutoScaling", autoscaling_pattern)):
            groups = split_to_fit(keys, lambda group, b=build: b(group, role, exempt))
            for index, group in enumerate(groups):
                # The first rule of each kind keeps today's name (Ec2Rule, AutoScalingRule).
                suffix = str(index + 1) if index else ""
                name = f"{kind}-{suffix}" if suffix else kind
                watched.append((name, f"{kind}Rule{suffix}", build(group, role, exempt)))
        for name, construct_id, pattern in watched:
            rule = events.Rule(
                self,
                construct_id,
                description=f"{deployment}: the enrolment key set by someone other than the "
                "enrolment role (CloudTrail)",
                event_pattern=events.EventPattern(source=pattern["source"]),
                targets=[targets.SnsTopic(topic, message=message)],
            )
            cfn = rule.node.default_child
            assert isinstance(cfn, events.CfnRule)
            # The pattern as written ($or and anything-but lists): CDK's EventPattern type has
            # no $or at a nested level.
            cfn.add_property_override("EventPattern", pattern)
            self.rules[name] = cfn
