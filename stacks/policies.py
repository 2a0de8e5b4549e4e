"""Policy statements that more than one function's role carries."""

from __future__ import annotations

from aws_cdk import aws_iam as iam

from stacks.settings import DEPLOYMENT_TAG, ROLE_GATEWAY, ROLE_TAG


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
