"""Lanes: what a deployment with a partners file adds per partner (issue 23, docs/partners.md).

Each partner is a lane (core/lanes.py, where every name is derived): its own DynamoDB table of
mappings (``<deployment>-<partner>``, the deployment's table keeps the pair's state) and one SSM
String parameter (``/tunnelnat/<deployment>/partners/<partner>``, the lane as JSON) that the
controller, the gateway (ConfigureGateway, the sync) and the CLI read with one
GetParametersByPath. A deployment without a partners file creates none of this.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from tunnelnat.core.lanes import Lane, parameter_path

# EventBridge's default quota on an event pattern: 2,048 characters (Amazon EventBridge User
# Guide, EventBridge quotas, "Event pattern size"). Kept below it: tokens (the partition, the
# account) are measured as CDK's placeholders, not their values.
EVENT_PATTERN_BUDGET = 2048 - 256


def split_to_fit(
    keys: Sequence[str],
    pattern: Callable[[list[str]], Mapping[str, Any]],
    budget: int = EVENT_PATTERN_BUDGET,
) -> list[list[str]]:
    """``keys`` in order, cut into groups whose ``pattern(group)`` fits an event pattern: one
    rule per group (today's one rule while everything fits). Each lane adds its tag key to the
    rules that listen for enrolment tags, so enough partners would outgrow one pattern."""
    groups: list[list[str]] = [[]]
    for key in keys:
        candidate = [*groups[-1], key]
        if groups[-1] and len(json.dumps(pattern(candidate), separators=(",", ":"))) > budget:
            groups.append([key])
        else:
            groups[-1] = candidate
    return groups


def lanes_digest(lanes: Sequence[Lane]) -> str:
    """SHA-256 of the lanes' JSON, in index order: ConfigureGateway's ``PartnersDigest``. It
    changes exactly when a published lane does, so State Manager re-runs the association."""
    text = "\n".join(lane.to_json() for lane in sorted(lanes, key=lambda lane: lane.index))
    return hashlib.sha256(text.encode()).hexdigest()


def lane_table(scope: Construct, construct_id: str, name: str) -> dynamodb.Table:
    """A table of mappings with the deployment table's key schema and settings
    (stacks/controller.py): the controller's code is the same for either."""
    return dynamodb.Table(
        scope,
        construct_id,
        table_name=name,
        partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
        sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
        billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
        point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
            point_in_time_recovery_enabled=True
        ),
        time_to_live_attribute="expiration",
        # A partner's enrolments and pool claims: kept when the stack (or the partner) goes.
        removal_policy=RemovalPolicy.RETAIN,
    )


class Lanes(Construct):
    """Per lane: its table and its published parameter."""

    def __init__(
        self, scope: Construct, construct_id: str, *, deployment: str, lanes: Sequence[Lane]
    ) -> None:
        super().__init__(scope, construct_id)
        self.deployment = deployment
        self.lanes = tuple(lanes)
        self.path = parameter_path(deployment)
        self.digest = lanes_digest(self.lanes)
        self.tables: dict[str, dynamodb.Table] = {}
        self.parameters: dict[str, ssm.StringParameter] = {}
        for lane in self.lanes:
            self.tables[lane.name] = lane_table(self, f"Table-{lane.name}", lane.table)
            self.parameters[lane.name] = ssm.StringParameter(
                self,
                f"Parameter-{lane.name}",
                parameter_name=lane.parameter,
                # Well under a standard parameter's 4 KB (core/lanes.py): no Advanced tier cost.
                string_value=lane.to_json(),
                tier=ssm.ParameterTier.STANDARD,
                description=f"tunnelnat {deployment}: partner {lane.name} (core/lanes.py)",
            )

    @property
    def table_arns(self) -> list[str]:
        return [table.table_arn for table in self.tables.values()]

    @property
    def path_arn(self) -> str:
        """The path's own ARN: GetParametersByPath is authorized against the path in the
        request, not the parameters it returns (Systems Manager User Guide, How Parameter Store
        authorizes parameter retrieval)."""
        return Stack.of(self).format_arn(
            service="ssm", resource="parameter", resource_name=self.path.lstrip("/")
        )
