"""What every function of the project starts from: its log group and its own role."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from stacks.settings import LOG_RETENTION_DAYS, StackSettings


def log_group_and_role(
    scope: Construct, settings: StackSettings, role_description: str
) -> tuple[logs.LogGroup, iam.Role]:
    """A log group kept ``log_retention_days`` (``Logs``) and a Lambda role that may write to it
    and to nothing else yet (``Role``), both under ``scope``."""
    log_group = logs.LogGroup(
        scope,
        "Logs",
        retention=logs.RetentionDays[LOG_RETENTION_DAYS[settings.log_retention_days]],
        removal_policy=RemovalPolicy.DESTROY,
    )
    role = iam.Role(
        scope,
        "Role",
        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
        description=role_description,
    )
    log_group.grant_write(role)
    return log_group, role
