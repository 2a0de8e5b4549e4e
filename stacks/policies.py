"""Policy statements that more than one function's role carries."""

from __future__ import annotations

from aws_cdk import aws_iam as iam

from stacks.settings import GROUP_NAME_TAG
from tunnelnat.core.enrolment import status_tag
from tunnelnat.core.lanes import Lane


def send_command_to_gateway(instances_arn: str, group_name: str) -> iam.PolicyStatement:
    """``ssm:SendCommand`` on this deployment's gateways only, whichever instances they are now:
    the members of the gateway group, by the ``aws:autoscaling:groupName`` tag Auto Scaling sets
    and no user can (an instance tagged tunnelnat:role=gateway outside the group gets nothing).
    The documents are limited by a statement of their own."""
    return iam.PolicyStatement(
        sid="OnThisDeploymentsGateways",
        actions=["ssm:SendCommand"],
        resources=[instances_arn],
        conditions={"StringEquals": {f"ssm:resourceTag/{GROUP_NAME_TAG}": group_name}},
    )


def send_command_to_marked_instances(instances_arn: str, deployment: str) -> iam.PolicyStatement:
    """``ssm:SendCommand`` on instances this deployment's controller has marked with its own
    status tag (an instance whose enrolment tag was just removed still needs RemoveHostRoute).
    The key names the deployment: another deployment's marks authorise nothing here."""
    return iam.PolicyStatement(
        sid="OnInstancesTheControllerEnrolled",
        actions=["ssm:SendCommand"],
        resources=[instances_arn],
        conditions={"StringLike": {f"ssm:resourceTag/{status_tag(deployment)}": "*"}},
    )


def only_the_status_tag(
    instances_arn: str, deployment: str, enrolment_key: str, vpc_arn: str
) -> list[iam.PolicyStatement]:
    """CreateTags/DeleteTags of this deployment's status tag key and nothing else, only on
    instances carrying this deployment's enrolment key (any value: a rejected value gets a
    status too), in this VPC. DeleteTags also where the status tag alone is left (the operator
    removed the enrolment tag: the controller unmarks the instance after RemoveHostRoute).
    ec2:Vpc is the instance's VPC where EC2 supplies the key (IfExists: AWS does not document
    it for every instance request)."""
    key = status_tag(deployment)
    only_the_key = {
        "ForAllValues:StringEquals": {"aws:TagKeys": [key]},
        # DeleteTags without keys would delete every tag: require the key list.
        "Null": {"aws:TagKeys": "false"},
    }
    in_this_vpc = {"ArnEqualsIfExists": {"ec2:Vpc": vpc_arn}}
    return [
        iam.PolicyStatement(
            sid="StatusTagOnEnrolmentTaggedInstances",
            actions=["ec2:CreateTags", "ec2:DeleteTags"],
            resources=[instances_arn],
            conditions={
                **only_the_key,
                **in_this_vpc,
                "StringLike": {f"aws:ResourceTag/{enrolment_key}": "*"},
            },
        ),
        iam.PolicyStatement(
            sid="StatusTagRemovedWhereItIs",
            actions=["ec2:DeleteTags"],
            resources=[instances_arn],
            conditions={
                **only_the_key,
                **in_this_vpc,
                "StringLike": {f"aws:ResourceTag/{key}": "*"},
            },
        ),
    ]


def lane_statements(instances_arn: str, lane: Lane, vpc_arn: str) -> list[iam.PolicyStatement]:
    """A lane's share of the controller's instance permissions (issue 23): the same conditions
    as the deployment's own (``only_the_status_tag``, ``send_command_to_marked_instances`` and
    the enrolment key's SendCommand), with the lane's tag key and status tag key. One set per
    lane: a condition block ANDs its keys, so one statement cannot say "any lane's key"."""
    n = lane.index
    only_the_key = {
        "ForAllValues:StringEquals": {"aws:TagKeys": [lane.status_tag]},
        "Null": {"aws:TagKeys": "false"},
    }
    in_this_vpc = {"ArnEqualsIfExists": {"ec2:Vpc": vpc_arn}}
    return [
        iam.PolicyStatement(
            sid=f"Lane{n}OnInstancesCarryingItsKey",
            actions=["ssm:SendCommand"],
            resources=[instances_arn],
            conditions={"StringLike": {f"ssm:resourceTag/{lane.tag_key}": "*"}},
        ),
        iam.PolicyStatement(
            sid=f"Lane{n}OnInstancesItEnrolled",
            actions=["ssm:SendCommand"],
            resources=[instances_arn],
            conditions={"StringLike": {f"ssm:resourceTag/{lane.status_tag}": "*"}},
        ),
        iam.PolicyStatement(
            sid=f"Lane{n}StatusTagOnTaggedInstances",
            actions=["ec2:CreateTags", "ec2:DeleteTags"],
            resources=[instances_arn],
            conditions={
                **only_the_key,
                **in_this_vpc,
                "StringLike": {f"aws:ResourceTag/{lane.tag_key}": "*"},
            },
        ),
    ]


def lanes_status_tags_removed(
    instances_arn: str, deployment: str, vpc_arn: str
) -> iam.PolicyStatement:
    """DeleteTags of any lane's status tag key (``tunnelnat:status:<deployment>:<partner>``)
    and nothing else, on instances of this VPC: one statement for every lane (a key pattern
    is allowed in ``aws:TagKeys``'s values, not in a condition key's name). Removing our own
    mark only ever takes a permission away (the mark is what SendCommand is conditioned on);
    the ``:`` after the deployment keeps ``acme`` from matching ``acme-2``'s keys."""
    return iam.PolicyStatement(
        sid="LaneStatusTagsRemoved",
        actions=["ec2:DeleteTags"],
        resources=[instances_arn],
        conditions={
            "ForAllValues:StringLike": {"aws:TagKeys": [f"{status_tag(deployment)}:*"]},
            "Null": {"aws:TagKeys": "false"},
            "ArnEqualsIfExists": {"ec2:Vpc": vpc_arn},
        },
    )
