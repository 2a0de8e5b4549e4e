"""Healer: the Lambda that restarts a tunnel whose TunnelUp alarm fired (docs/health.md).

Two EventBridge rules invoke it directly (no queue: an alarm that stays in ALARM is retried by
the sweep, not by redelivery):

- "CloudWatch Alarm State Change" for this deployment's TunnelUp alarms only (a prefix match on
  the name Monitoring gives them), ALARM and OK: restart, or record the time to recovery;
- a schedule (every minute by default): the sweep of this deployment's alarms still in ALARM,
  which retries after the back-off and pages at the cap. It is also the backstop for an alarm
  event the function failed to handle, so neither rule needs a dead-letter queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import ArnFormat, Duration, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from constructs import Construct

from stacks.documents import Documents
from stacks.functions import log_group_and_role
from stacks.gateway import READINESS_PK
from stacks.nag import acknowledge, wildcard_arn
from stacks.policies import send_command_to_gateway
from stacks.settings import (
    StackSettings,
)
from tunnelnat.healer import DOCUMENT, HEALER_PK

HANDLER = "tunnelnat.handlers.healer.handler"
SERVICE = "tunnelnat-healer"
METRIC_NAMESPACE = "tunnelnat"
# tunnelnat.handlers.healer.IDEMPOTENCY_PK (not imported: the handler module builds Powertools
# objects at import); tests/infra checks the two agree.
IDEMPOTENCY_PK = "idempotency#tunnelnat-healer"
ALARM_STATE_CHANGE = "CloudWatch Alarm State Change"
# How old the gateway's own readiness item (gateway/<id>: sas, updated_at) may be for the healer
# to cross-check its decision against it (issue 21): the healer's default, set explicitly.
READINESS_MAX_AGE_SECONDS = 90


def established_lookback_seconds(settings: StackSettings) -> int:
    """How old the newest TunnelEstablished may be: three agent runs, at least 15 minutes."""
    return max(900, 3 * settings.health_interval_seconds)


class Healer(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: StackSettings,
        tunnel_name: str,
        table: dynamodb.ITable,
        topic: sns.ITopic,
        topic_key: kms.IKey,
        documents: Documents,
        code: lambda_.Code,
        powertools: lambda_.ILayerVersion,
        other_tunnels: Sequence[str] = (),
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        deployment = settings.deployment
        # The value the healer will pass must be one RestartTunnel accepts: fail synthesis, not
        # the first restart. With a partners file, every partner's tunnel (the healer restarts
        # the one its alarm's Tunnel dimension names, and only that one).
        for tunnel in (tunnel_name, *other_tunnels):
            documents.check_parameters(
                DOCUMENT,
                {"TunnelName": tunnel, "WaitSeconds": str(settings.healer_restart_wait_seconds)},
            )

        self.log_group, self.role = log_group_and_role(
            self,
            settings,
            f"{deployment} healer: restart this deployment's tunnels, page at the cap",
        )
        self.function = lambda_.Function(
            self,
            "Function",
            function_name=f"{deployment}-healer",
            description=f"{deployment} healer: restart a tunnel whose TunnelUp alarm fired",
            runtime=lambda_.Runtime.PYTHON_3_13,
            architecture=lambda_.Architecture.X86_64,
            handler=HANDLER,
            code=code,
            layers=[powertools],
            role=self.role,
            timeout=Duration.seconds(settings.healer_timeout_seconds),
            memory_size=256,
            log_group=self.log_group,
            tracing=lambda_.Tracing.ACTIVE,
            environment={
                # Every key HealerSettings.from_environ reads, set explicitly: what is deployed is
                # what the context says, not the code's defaults of the day.
                "TUNNELNAT_TABLE_NAME": table.table_name,
                "TUNNELNAT_IDEMPOTENCY_TABLE": table.table_name,
                "TUNNELNAT_PAGE_TOPIC_ARN": topic.topic_arn,
                "TUNNELNAT_DEPLOYMENT": deployment,
                "TUNNELNAT_DOCUMENT_PREFIX": documents.prefix,
                "TUNNELNAT_HEALER_ALARM_PREFIX": settings.tunnel_alarm_prefix,
                "TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS": str(settings.healer_backoff_base_seconds),
                "TUNNELNAT_HEALER_BACKOFF_FACTOR": str(settings.healer_backoff_factor),
                "TUNNELNAT_HEALER_BACKOFF_MAX_SECONDS": str(settings.healer_backoff_max_seconds),
                "TUNNELNAT_HEALER_MAX_RESTARTS_PER_HOUR": str(settings.healer_max_restarts),
                "TUNNELNAT_HEALER_WINDOW_SECONDS": str(settings.healer_window_seconds),
                "TUNNELNAT_HEALER_RESTART_WAIT_SECONDS": str(settings.healer_restart_wait_seconds),
                "TUNNELNAT_HEALER_COMMAND_TIMEOUT_SECONDS": str(
                    settings.healer_command_timeout_seconds
                ),
                # The newest TunnelEstablished may be a few agent runs old (docs/health.md).
                "TUNNELNAT_HEALER_ESTABLISHED_LOOKBACK_SECONDS": str(
                    established_lookback_seconds(settings)
                ),
                "TUNNELNAT_HEALER_READINESS_MAX_AGE_SECONDS": str(READINESS_MAX_AGE_SECONDS),
                # The gateways' namespace (where TunnelEstablished is read); the healer's own
                # metrics stay in tunnelnat with a Deployment dimension.
                "TUNNELNAT_METRIC_NAMESPACE": settings.gateway_metric_namespace,
                "POWERTOOLS_SERVICE_NAME": SERVICE,
                "POWERTOOLS_METRICS_NAMESPACE": METRIC_NAMESPACE,
            },
        )

        # -- what invokes it ---------------------------------------------------------------------
        # EventBridge retries a failed delivery twice and Lambda a failed (asynchronous)
        # invocation twice; past that the sweep finds the alarm still in ALARM a minute later.
        target = targets.LambdaFunction(
            self.function, retry_attempts=2, max_event_age=Duration.hours(1)
        )
        self.alarm_rule = events.Rule(
            self,
            "AlarmRule",
            description=f"{deployment}: TunnelUp alarm state changes to the healer",
            event_pattern=events.EventPattern(
                source=["aws.cloudwatch"],
                detail_type=[ALARM_STATE_CHANGE],
                detail={
                    "alarmName": events.Match.prefix(settings.tunnel_alarm_prefix),
                    # INSUFFICIENT_DATA is no verdict (and with missing data breaching, rare).
                    "state": {"value": ["ALARM", "OK"]},
                },
            ),
            targets=[target],
        )
        self.sweep_rule = events.Rule(
            self,
            "SweepRule",
            description=f"{deployment}: the healer's sweep of TunnelUp alarms still in ALARM",
            schedule=events.Schedule.expression(settings.healer_sweep_schedule),
            targets=[target],
        )

        # -- least privilege ---------------------------------------------------------------------
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")
        alarms = stack.format_arn(
            service="cloudwatch",
            resource="alarm",
            resource_name=f"{settings.tunnel_alarm_prefix}*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        statements = [
            iam.PolicyStatement(
                sid="RunOnlyRestartTunnel",
                actions=["ssm:SendCommand"],
                resources=[
                    stack.format_arn(
                        service="ssm",
                        resource="document",
                        resource_name=documents.name(DOCUMENT),
                        arn_format=ArnFormat.SLASH_RESOURCE_NAME,
                    )
                ],
            ),
            send_command_to_gateway(instances, settings.gateway_group_name),
            iam.PolicyStatement(
                sid="FollowCommandsFindTheGateway",
                actions=[
                    "ssm:GetCommandInvocation",
                    "ec2:DescribeInstances",
                    "ec2:DescribeNetworkInterfaces",
                ],
                resources=["*"],
            ),
            iam.PolicyStatement(
                # Has the tunnel been up since the gateway was configured? (TunnelEstablished,
                # the health agent's.) GetMetricData has no resource-level permissions.
                sid="ReadTunnelEstablished",
                actions=["cloudwatch:GetMetricData"],
                resources=["*"],
            ),
            iam.PolicyStatement(
                sid="ReadTunnelUpAlarms",
                actions=["cloudwatch:DescribeAlarms"],
                resources=[alarms],
            ),
            iam.PolicyStatement(
                # Its attempts (healer/<tunnel>) and its idempotency records, nothing else of the
                # controller's table.
                sid="ItsRecordsInTheTable",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                ],
                resources=[table.table_arn],
                conditions={
                    "ForAllValues:StringEquals": {
                        "dynamodb:LeadingKeys": [HEALER_PK, IDEMPOTENCY_PK]
                    }
                },
            ),
            iam.PolicyStatement(
                # The pair agents' own reports (gateway/<instance-id>, READINESS_PK): the
                # healer checks the holder's report of installed CHILD_SAs against an alarm
                # before it restarts anything (issue 21, 3). Read only.
                sid="ReadTheGatewaysReports",
                actions=["dynamodb:GetItem"],
                resources=[table.table_arn],
                conditions={"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [READINESS_PK]}},
            ),
            iam.PolicyStatement(
                sid="PageTheTopic",
                actions=["sns:Publish"],
                resources=[topic.topic_arn],
            ),
            iam.PolicyStatement(
                # The topic is encrypted: a publisher needs a data key from the topic's key.
                sid="EncryptForTheTopic",
                actions=["kms:GenerateDataKey", "kms:Decrypt"],
                resources=[topic_key.key_arn],
            ),
        ]
        for statement in statements:
            self.role.add_to_policy(statement)

        acknowledge(
            self.function,
            "AwsSolutions-L1",
            "Python 3.13 is the runtime the healer is built and tested for, and the one the "
            "Powertools public layer is resolved for (its SSM parameter names python3.13); a "
            "runtime upgrade is a deliberate change, made together with the layer.",
        )
        policy = self.role.node.find_child("DefaultPolicy")
        alarm_pattern = f"{settings.tunnel_alarm_prefix}*"
        for finding, reason in (
            (
                "Resource::*",
                "ssm:GetCommandInvocation, ec2:DescribeInstances and DescribeNetworkInterfaces "
                "(finding the gateway: holding G's ENI, tagged), cloudwatch:GetMetricData "
                "(reading TunnelEstablished) and the X-Ray trace API have no resource-level "
                "permissions.",
            ),
            (
                f"Resource::{wildcard_arn(self, 'ec2', 'instance/*')}",
                "The gateway is whichever instance its Auto Scaling group launched: SendCommand "
                "on instance/* requires the instance's aws:autoscaling:groupName to be the "
                "gateway group's (a tag no user can set).",
            ),
            (
                f"Resource::{wildcard_arn(self, 'cloudwatch', f'alarm:{alarm_pattern}')}",
                "The sweep lists this deployment's TunnelUp alarms by name prefix; the ARN "
                "pattern is that prefix, one alarm per tunnel.",
            ),
        ):
            acknowledge(policy, f"AwsSolutions-IAM5[{finding}]", reason)

    def serve_gateway(
        self, *, vpc_id: str, gateway_group: str, gateway_ip: str, gateway_eni_id: str
    ) -> None:
        """RestartTunnel goes to the instance G's ENI is attached to: the active gateway (of a
        pair, or the only one), which must also be a running gateway of this deployment; a
        detached ENI (a failover under way) is a failed restart, never a command to a standby.
        VPC, group and G stay in the environment (the healer's fallback without an ENI ID)."""
        self.function.add_environment("TUNNELNAT_VPC_ID", vpc_id)
        self.function.add_environment("TUNNELNAT_GATEWAY_GROUP", gateway_group)
        self.function.add_environment("TUNNELNAT_GATEWAY_IP", gateway_ip)
        self.function.add_environment("TUNNELNAT_GATEWAY_ENI_ID", gateway_eni_id)
