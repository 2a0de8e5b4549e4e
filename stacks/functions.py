"""What every function of the project starts from: its log group, its own role, and the
Powertools layer of the version the tests run."""

from __future__ import annotations

import re
from pathlib import Path

from aws_cdk import RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from stacks.settings import LOG_RETENTION_DAYS, StackSettings

# What the functions run with; the tests install the same (requirements.txt).
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
_POWERTOOLS_PIN = re.compile(
    r"^aws-lambda-powertools(?:\[[A-Za-z0-9_,\s-]*\])?\s*==\s*([0-9]+\.[0-9]+\.[0-9]+)\s*(?:#.*)?$",
    re.MULTILINE,
)


def powertools_version(requirements: Path = REQUIREMENTS) -> str:
    """The aws-lambda-powertools release requirements.txt pins (``==X.Y.Z``)."""
    match = _POWERTOOLS_PIN.search(requirements.read_text())
    if match is None:
        raise ValueError(
            f"{requirements.name}: aws-lambda-powertools must be pinned as ==X.Y.Z: the "
            "functions' Powertools layer is pinned to the same release"
        )
    return match.group(1)


def powertools_layer_parameter(
    runtime: lambda_.Runtime, architecture: lambda_.Architecture, version: str
) -> str:
    """Powertools publishes one public SSM parameter per release, runtime and architecture
    (besides ``latest``); its value is that release's layer ARN in the deploying region."""
    return f"/aws/service/powertools/python/{architecture.name}/{runtime.name}/{version}"


def powertools_layer(
    scope: Construct,
    construct_id: str,
    *,
    runtime: lambda_.Runtime,
    architecture: lambda_.Architecture,
) -> lambda_.ILayerVersion:
    """The public Powertools layer of the release requirements.txt pins, so the functions run
    in AWS the Powertools the tests ran (``latest`` would move under them). The ARN is resolved
    by CloudFormation at deploy time: synthesis needs no lookup."""
    parameter = powertools_layer_parameter(runtime, architecture, powertools_version())
    return lambda_.LayerVersion.from_layer_version_arn(
        scope, construct_id, ssm.StringParameter.value_for_string_parameter(scope, parameter)
    )


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
