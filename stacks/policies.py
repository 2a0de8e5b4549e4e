"""Policy statements that more than one function's role carries."""

from __future__ import annotations

from aws_cdk import aws_iam as iam

from stacks.settings import DEPLOYMENT_TAG, ROLE_GATEWAY, ROLE_TAG
from tunnelnat.core.enrolment import status_tag


def send_command_to_gateway(instances_arn: str, deployment: str) -> iam.PolicyStatement:
    """``ssm:SendCommand`` on this deployment's gateway only, whichever instance it is now (a
    replacement carries the same tags); the documents are limited by a statement of their own."""
    return iam.PolicyStatement(
        sid="OnThisDeploymentsGateway",
        actions=["ssm:SendCommand"],
        resources=[instances_arn],
        conditions={
            "StringEquals": {
                f"ssm:resourceTag/{ROLE_TAG}": ROLE_GATEWAY,
                f"ssm:resourceTag/{DEPLOYMENT_TAG}": deployment,
            }
        },
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


def only_the_status_tag(instances_arn: str, deployment: str) -> iam.PolicyStatement:
    """CreateTags/DeleteTags of this deployment's status tag key, and nothing else."""
    return iam.PolicyStatement(
        sid="OnlyTheStatusTag",
        actions=["ec2:CreateTags", "ec2:DeleteTags"],
        resources=[instances_arn],
        conditions={
            "ForAllValues:StringEquals": {"aws:TagKeys": [status_tag(deployment)]},
            # DeleteTags without keys would delete every tag: require the key list.
            "Null": {"aws:TagKeys": "false"},
        },
    )
