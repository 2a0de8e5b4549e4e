"""Controller: the table, the event rules, the queue with its dead-letter queue, and the Lambda.

EventBridge -> SQS (+ DLQ) -> Lambda. The queue absorbs bursts and is the controller's back-off:
a record that may succeed later fails (partial batch response) and comes back after the
visibility timeout; after ``queue_max_receive_count`` deliveries it lands in the DLQ, which
pages. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stacks.documents import Documents
from stacks.functions import log_group_and_role, powertools_layer
from stacks.lanes import Lanes, split_to_fit
from stacks.nag import acknowledge, wildcard_arn
from stacks.policies import (
    lane_statements,
    lanes_status_tags_removed,
    only_the_status_tag,
    send_command_to_gateway,
    send_command_to_marked_instances,
)
from stacks.settings import ROUTES_TAG, StackSettings
from tunnelnat.core.config import TunnelnatConfig

HANDLER = "tunnelnat.handlers.controller.handler"
SERVICE = "tunnelnat"
# Not code: kept out of the Lambda asset.
# The Lambda asset is lambdas/ less build litter. The operator's CLI lives in cli/ and the gateway's
# software in gateway/: neither is under lambdas/, so neither reaches the asset.
ASSET_EXCLUDES = [
    "**/__pycache__",
    "**/*.pyc",
    "*.egg-info",
    "**/.pytest_cache",
]
# The only documents the controller sends (controller.py, gateway_sync.py): the rest are the
# associations', the healer's and the operator's.
SENT_DOCUMENTS = ("AddHostRoute", "RemoveHostRoute", "SyncNatTable")
INSTANCE_STATES = ["running", "stopping", "stopped", "shutting-down", "terminated"]
# How long Auto Scaling waits for a heartbeat or a completion: more than the controller's longest
# back-off between attempts (delivery.py: 900 s), so a held launch never times out between two.
HOOK_HEARTBEAT_SECONDS = 1800
LIFECYCLE_DETAIL_TYPES = [
    "EC2 Instance-launch Lifecycle Action",
    "EC2 Instance-terminate Lifecycle Action",
]


def tag_change_pattern(keys: list[str]) -> dict[str, Any]:
    """The TagChange rule's pattern (EventPattern's keyword arguments): a tag change on an EC2
    instance touching one of ``keys``."""
    return {
        "source": ["aws.tag"],
        "detail_type": ["Tag Change on Resource"],
        "detail": {
            "service": ["ec2"],
            "resource-type": ["instance"],
            "changed-tag-keys": keys,
        },
    }


def lifecycle_statement(
    stack: Stack, sid: str, group_names: Sequence[str] | None = None, tag_key: str | None = None
) -> iam.PolicyStatement:
    """Completing and heartbeating the lifecycle actions of the Auto Scaling groups named (None:
    any group) and, with ``tag_key``, only of those carrying that tag (any value)."""
    names = ["*"] if group_names is None else [f"*:autoScalingGroupName/{n}" for n in group_names]
    return iam.PolicyStatement(
        sid=sid,
        actions=[
            "autoscaling:CompleteLifecycleAction",
            "autoscaling:RecordLifecycleActionHeartbeat",
        ],
        resources=[
            stack.format_arn(
                service="autoscaling",
                resource="autoScalingGroup",
                resource_name=name,
                arn_format=ArnFormat.COLON_RESOURCE_NAME,
            )
            for name in names
        ],
        conditions=None if tag_key is None else {"StringLike": {f"aws:ResourceTag/{tag_key}": "*"}},
    )


def document_arn(stack: Stack, documents: Documents, stem: str) -> str:
    """One of the project's documents, by its fixed name."""
    return stack.format_arn(
        service="ssm",
        resource="document",
        resource_name=documents.name(stem),
        arn_format=ArnFormat.SLASH_RESOURCE_NAME,
    )


class Controller(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: TunnelnatConfig,
        settings: StackSettings,
        documents: Documents,
        code_directory: Path,
        lanes: Lanes | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        deployment = settings.deployment
        self._settings = settings
        # A partners file: one lane per partner (stacks/lanes.py), each with its own table,
        # tag key and status tag; None: today's single partner, unchanged.
        self._lanes = lanes

        # -- the one source of truth -----------------------------------------------------------
        # Predictable names: the operator's CLI (tunnelnat doctor/reconcile) finds them by the
        # deployment name. The retained table's fixed name also makes a re-deploy after a
        # destroy stop at the old table (import it) instead of silently starting empty.
        self.table = dynamodb.Table(
            self,
            "Table",
            table_name=deployment,
            partition_key=dynamodb.Attribute(name="pk", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            # Expiring records (the healer's idempotency keys) carry this attribute.
            time_to_live_attribute="expiration",
            # Enrolments and address-pool claims: kept when the stack goes.
            removal_policy=RemovalPolicy.RETAIN,
        )

        # -- the queue in front of the controller ----------------------------------------------
        self.dead_letter_queue = sqs.Queue(
            self,
            "DeadLetterQueue",
            queue_name=f"{deployment}-events-dlq",
            retention_period=Duration.days(14),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        timeout = Duration.seconds(settings.controller_timeout_seconds)
        self.queue = sqs.Queue(
            self,
            "Queue",
            queue_name=f"{deployment}-events",
            # Six times the function's timeout (AWS's guidance for an SQS event source): a batch
            # whose invocation was throttled and retried is not delivered twice meanwhile. The
            # handler sets its own, shorter, back-off on each record it fails.
            visibility_timeout=Duration.seconds(settings.queue_visibility_timeout_seconds),
            retention_period=Duration.days(4),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            # The backstop: the handler dead-letters an event itself, with the instances and the
            # reason, at its TUNNELNAT_MAX_ATTEMPTS-th attempt; SQS moves one only after more
            # receives than that (a crash or timeout on every attempt).
            dead_letter_queue=sqs.DeadLetterQueue(
                max_receive_count=settings.queue_max_receive_count, queue=self.dead_letter_queue
            ),
        )

        # -- the function ----------------------------------------------------------------------
        self.log_group, self.role = log_group_and_role(
            self, settings, f"{deployment} controller: observe EC2, drive SSM, own its table"
        )
        # At its last attempt the handler parks the event in the DLQ itself, with the reason; an
        # event that waits for another worker's gateway sync goes back to the queue as a new
        # message, so the wait uses none of its attempts.
        self.dead_letter_queue.grant_send_messages(self.role)
        self.queue.grant_send_messages(self.role)
        # One code asset for every function of the project (the healer's too).
        self.code = lambda_.Code.from_asset(str(code_directory), exclude=ASSET_EXCLUDES)
        self.powertools = powertools_layer(
            self,
            "Powertools",
            runtime=lambda_.Runtime.PYTHON_3_13,
            architecture=lambda_.Architecture.X86_64,
        )
        self.function = lambda_.Function(
            self,
            "Function",
            function_name=f"{deployment}-controller",
            description=f"{deployment} controller: reconcile instances and the gateway",
            runtime=lambda_.Runtime.PYTHON_3_13,
            architecture=lambda_.Architecture.X86_64,
            handler=HANDLER,
            code=self.code,
            layers=[self.powertools],
            role=self.role,
            timeout=timeout,
            memory_size=512,
            log_group=self.log_group,
            tracing=lambda_.Tracing.ACTIVE,
            environment={
                "TUNNELNAT_CONFIG": json.dumps(
                    config.model_dump(mode="json"), separators=(",", ":"), sort_keys=True
                ),
                "TUNNELNAT_TABLE_NAME": self.table.table_name,
                "TUNNELNAT_DEPLOYMENT": deployment,
                "TUNNELNAT_DOCUMENT_PREFIX": documents.prefix,
                "TUNNELNAT_MAX_ATTEMPTS": str(settings.controller_max_attempts),
                "TUNNELNAT_DLQ_URL": self.dead_letter_queue.queue_url,
                # The allow-list (issue 21): empty means no restriction.
                "TUNNELNAT_ALLOWED_SUBNETS": ",".join(settings.enrolment_subnets),
                "TUNNELNAT_ALLOWED_GROUPS": ",".join(settings.enrolment_groups),
                # The gateways' namespace; the controller's own metrics stay in tunnelnat with
                # a Deployment dimension.
                "TUNNELNAT_METRIC_NAMESPACE": settings.gateway_metric_namespace,
                "POWERTOOLS_SERVICE_NAME": SERVICE,
                "POWERTOOLS_METRICS_NAMESPACE": SERVICE,
                # Several partners: the handler reads the lanes there and runs one controller
                # per lane (absent: the single controller of TUNNELNAT_CONFIG).
                **(
                    {
                        "TUNNELNAT_PARTNERS_PATH": lanes.path,
                        # Changes with any lane: a new function configuration, so no warm
                        # container keeps serving the old lanes from its cache.
                        "TUNNELNAT_PARTNERS_DIGEST": lanes.digest,
                    }
                    if lanes is not None
                    else {}
                ),
            },
        )
        self.function.add_event_source(
            sources.SqsEventSource(
                self.queue,
                # A burst of launches waits up to the window and becomes one invocation, i.e.
                # one gateway sync for the whole batch.
                batch_size=settings.controller_batch_size,
                max_batching_window=Duration.seconds(settings.controller_batch_window_seconds),
                report_batch_item_failures=True,
                max_concurrency=settings.controller_max_concurrency,
            )
        )

        # -- what sends events to the queue ----------------------------------------------------
        target = targets.SqsQueue(
            self.queue,
            dead_letter_queue=self.dead_letter_queue,
            retry_attempts=185,
            max_event_age=Duration.hours(24),
        )
        self.rules = {
            "InstanceState": events.Rule(
                self,
                "InstanceStateRule",
                description=f"{deployment}: EC2 instance state changes",
                event_pattern=events.EventPattern(
                    source=["aws.ec2"],
                    detail_type=["EC2 Instance State-change Notification"],
                    detail={"state": INSTANCE_STATES},
                ),
                targets=[target],
            ),
        }
        # With lanes: each partner's key too (an instance joins a partner by its key,
        # <enrolment key>:partner:<name>), in as many rules as the keys need (one up to about
        # 40 partners: EventBridge's 2,048 characters a pattern).
        tag_keys = [
            config.enrolment_tag_key,
            *(lane.tag_key for lane in (lanes.lanes if lanes else ())),
        ]
        for index, group in enumerate(split_to_fit(tag_keys, tag_change_pattern)):
            suffix = str(index + 1) if index else ""
            self.rules[f"TagChange{suffix}"] = events.Rule(
                self,
                f"TagChangeRule{suffix}",
                description=f"{deployment}: the enrolment tag added, changed or removed",
                event_pattern=events.EventPattern(**tag_change_pattern(group)),
                targets=[target],
            )
        self.rules["Lifecycle"] = events.Rule(
            self,
            "LifecycleRule",
            description=f"{deployment}: Auto Scaling lifecycle actions (launch, terminate) "
            f"of its hooks ({', '.join(settings.hook_names)})",
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"],
                detail_type=LIFECYCLE_DETAIL_TYPES,
                # Only this deployment's hooks: every other team's, and another
                # deployment's, stay theirs to complete (the handler checks the name too).
                detail={"LifecycleHookName": list(settings.hook_names)},
            ),
            targets=[target],
        )
        self.rules["Reconcile"] = events.Rule(
            self,
            "ReconcileRule",
            description=f"{deployment}: scheduled full reconcile",
            schedule=events.Schedule.expression(settings.reconcile_schedule),
            targets=[target],
        )

        # -- least privilege -------------------------------------------------------------------
        instances = stack.format_arn(service="ec2", resource="instance", resource_name="*")
        key = config.enrolment_tag_key
        self._instances = instances
        self._documents = documents
        # SendCommand authorizes the document and each instance as separate resources, and has
        # no condition key naming the document (Service Authorization Reference, AWS Systems
        # Manager: only aws:ResourceTag and ssm:resourceTag): a policy can limit the documents
        # and the instances, not pair them. The pairing (AddHostRoute never on a gateway) is
        # the code's; docs/security.md says so.
        statements = [
            iam.PolicyStatement(
                sid="ObserveInstances",
                actions=["ec2:DescribeInstances"],
                resources=["*"],
            ),
            iam.PolicyStatement(
                sid="RunOnlyTheDocumentsItSends",
                actions=["ssm:SendCommand"],
                resources=[document_arn(stack, documents, stem) for stem in SENT_DOCUMENTS],
            ),
            iam.PolicyStatement(
                # Any value: RemoveHostRoute also goes to an instance whose value was changed.
                sid="OnInstancesCarryingTheEnrolmentKey",
                actions=["ssm:SendCommand"],
                resources=[instances],
                conditions={"StringLike": {f"ssm:resourceTag/{key}": "*"}},
            ),
            send_command_to_marked_instances(instances, deployment),
            iam.PolicyStatement(
                # ListCommands: one poll for a command sent to many instances at once.
                sid="FollowCommands",
                actions=["ssm:GetCommandInvocation", "ssm:ListCommands"],
                resources=["*"],
            ),
            iam.PolicyStatement(
                sid="OwnTable",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                    "dynamodb:Query",
                    "dynamodb:ConditionCheckItem",
                    # The generations of a batch's instances in one call.
                    "dynamodb:BatchGetItem",
                ],
                # With lanes: every partner's table of mappings too.
                resources=[self.table.table_arn, *(lanes.table_arns if lanes else ())],
            ),
            iam.PolicyStatement(
                # Whether a held lifecycle action is still open, and its hook's timeouts.
                sid="ReadLifecycleActions",
                actions=[
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLifecycleHooks",
                ],
                resources=["*"],
            ),
            lifecycle_statement(stack, "LifecycleOfEnrolledGroups", tag_key=key),
        ]
        for lane in lanes.lanes if lanes is not None else ():
            # A group whose instances join partner <name> carries the lane's key.
            statements.append(
                lifecycle_statement(
                    stack, f"Lane{lane.index}LifecycleOfEnrolledGroups", tag_key=lane.tag_key
                )
            )
        if lanes is not None:
            statements.append(
                iam.PolicyStatement(
                    # The lanes, published by this stack. GetParametersByPath is authorized
                    # against the path in the request, not the parameters it returns (Systems
                    # Manager User Guide, "How Parameter Store authorizes parameter retrieval").
                    sid="ReadTheLanes",
                    actions=["ssm:GetParametersByPath"],
                    resources=[lanes.path_arn],
                )
            )
        if settings.auto_scaling_groups:
            # The user's own groups named in auto_scaling_groups: tunnelnat's hooks are on them
            # (add_lifecycle_hooks), whatever tags the groups carry.
            statements.append(
                lifecycle_statement(stack, "LifecycleOfNamedGroups", settings.auto_scaling_groups)
            )
        for statement in statements:
            self.role.add_to_policy(statement)
        self.hooks = self._lifecycle_hooks(settings)
        for name in settings.auto_scaling_groups:
            group = f"autoScalingGroup:*:autoScalingGroupName/{name}"
            acknowledge(
                self.role.node.find_child("DefaultPolicy"),
                f"AwsSolutions-IAM5[Resource::{wildcard_arn(self, 'autoscaling', group)}]",
                "A group named in auto_scaling_groups exists already: its ARN's only unknown part "
                "is the group's ID, so the resource names the group and nothing else.",
            )

        acknowledge(
            self.function,
            "AwsSolutions-L1",
            "Python 3.13 is the runtime the controller is built and tested for, and the one the "
            "Powertools public layer is resolved for (its SSM parameter names python3.13); a "
            "runtime upgrade is a deliberate change, made together with the layer.",
        )
        policy = self.role.node.find_child("DefaultPolicy")
        for finding, reason in (
            (
                "Resource::*",
                "ec2:DescribeInstances, ssm:GetCommandInvocation, ssm:ListCommands, "
                "autoscaling:DescribeAutoScalingInstances and DescribeLifecycleHooks and the "
                "X-Ray trace API have no resource-level permissions"
                + (
                    "; nor has ec2:DescribeRouteTables (route-table mode: the route changes "
                    "themselves are allowed only on route tables of the gateway's VPC)."
                    if settings.route_table_mode
                    else "."
                ),
            ),
            (
                f"Resource::{wildcard_arn(self, 'ec2', 'instance/*')}",
                "Enrolled instances are whatever the operator tags: every statement on instance/* "
                "is conditioned on a tag (the enrolment key, this deployment's status key, or the "
                "gateway group's aws:autoscaling:groupName, which no user can set), and "
                "CreateTags/DeleteTags only of this deployment's status key, on instances "
                "carrying the enrolment key, in this VPC.",
            ),
            (
                f"Resource::{wildcard_arn(self, 'autoscaling', 'autoScalingGroup:*')}",
                "Lifecycle hooks live on the operator's groups, unknown here; the statement "
                "requires the enrolment tag on the group.",
            ),
        ):
            acknowledge(policy, f"AwsSolutions-IAM5[{finding}]", reason)
        if lanes is not None:
            # With many lanes the statements outgrow the role's inline policy: CDK moves the
            # rest into managed policies (OverflowPolicy<n>, children of the role), where the
            # same reviewed findings appear.
            for finding, reason in (
                (
                    f"Resource::{wildcard_arn(self, 'ec2', 'instance/*')}",
                    "Each lane's statements on instance/* are conditioned on a tag: the lane's "
                    "tag key (<enrolment key>:partner:<name>) or its status tag key, and "
                    "CreateTags/DeleteTags only of that lane's status key, in this VPC.",
                ),
                (
                    f"Resource::{wildcard_arn(self, 'autoscaling', 'autoScalingGroup:*')}",
                    "Lifecycle hooks live on the operator's groups, unknown here; each lane's "
                    "statement requires that lane's tag key on the group.",
                ),
            ):
                acknowledge(self.role, f"AwsSolutions-IAM5[{finding}]", reason)

    def serve_gateway(
        self,
        *,
        vpc_id: str,
        gateway_group: str,
        enrolment_key: str,
        gateway_eni_id: str | None = None,
    ) -> None:
        """Tell the controller which VPC it serves and which group its gateway is in: instances
        of other VPCs are never enrolled, and the gateway is the member of that group holding G
        (not whatever carries the gateway's tags). With route-table mode, the ENI holding G:
        other subnets' route tables send the partner's networks to it."""
        self.function.add_environment("TUNNELNAT_VPC_ID", vpc_id)
        self.function.add_environment("TUNNELNAT_GATEWAY_GROUP", gateway_group)
        stack = Stack.of(self)
        vpc_arn = stack.format_arn(service="ec2", resource="vpc", resource_name=vpc_id)
        # SyncNatTable (and the other sent documents) on the gateway group's members only.
        self.role.add_to_policy(send_command_to_gateway(self._instances, gateway_group))
        for statement in only_the_status_tag(
            self._instances, self._settings.deployment, enrolment_key, vpc_arn
        ):
            self.role.add_to_policy(statement)
        for lane in self._lanes.lanes if self._lanes is not None else ():
            for statement in lane_statements(self._instances, lane, vpc_arn):
                self.role.add_to_policy(statement)
        if self._lanes is not None:
            self.role.add_to_policy(
                lanes_status_tags_removed(self._instances, self._settings.deployment, vpc_arn)
            )
        if not self._settings.route_table_mode or gateway_eni_id is None:
            return
        self.function.add_environment("TUNNELNAT_GATEWAY_ENI_ID", gateway_eni_id)
        self.function.add_environment(
            "TUNNELNAT_ROUTE_TABLES", ",".join(self._settings.route_tables)
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                # No resource-level permissions (Service Authorization Reference): "*".
                sid="ReadRouteTables",
                actions=["ec2:DescribeRouteTables"],
                resources=["*"],
            )
        )
        # Only route tables a network owner opted in: tagged tunnelnat:routes=<deployment>, or
        # listed in route_tables; of the gateway's VPC either way. ec2:Vpc and the route
        # table's tags apply to the route-table resource of all three actions; no condition key
        # names the route's destination (Service Authorization Reference, Amazon EC2:
        # CreateRoute's keys are aws:ResourceTag, ec2:Region, ec2:ResourceTag, ec2:RouteTableID,
        # ec2:Vpc), so 0.0.0.0/0 is kept out by the code and by the opt-in (docs/security.md).
        route_actions = ["ec2:CreateRoute", "ec2:ReplaceRoute", "ec2:DeleteRoute"]
        in_the_vpc = {"ArnEquals": {"ec2:Vpc": vpc_arn}}
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="RoutesInOptedInRouteTables",
                actions=route_actions,
                resources=[
                    stack.format_arn(service="ec2", resource="route-table", resource_name="*")
                ],
                conditions={
                    **in_the_vpc,
                    "StringEquals": {f"aws:ResourceTag/{ROUTES_TAG}": self._settings.deployment},
                },
            )
        )
        if self._settings.route_tables:
            self.role.add_to_policy(
                iam.PolicyStatement(
                    sid="RoutesInListedRouteTables",
                    actions=route_actions,
                    resources=[
                        stack.format_arn(service="ec2", resource="route-table", resource_name=rtb)
                        for rtb in self._settings.route_tables
                    ],
                    conditions=in_the_vpc,
                )
            )
        policy = self.role.node.find_child("DefaultPolicy")
        acknowledge(
            policy,
            f"AwsSolutions-IAM5[Resource::{wildcard_arn(self, 'ec2', 'route-table/*')}]",
            "Route-table mode serves the route tables their owners opted in: the statement "
            "allows CreateRoute/ReplaceRoute/DeleteRoute only on route tables tagged "
            "tunnelnat:routes=<deployment> in the gateway's VPC (conditions aws:ResourceTag and "
            "ec2:Vpc), and the controller never touches a route it did not create.",
        )

    def _lifecycle_hooks(self, settings: StackSettings) -> list[autoscaling.CfnLifecycleHook]:
        """tunnelnat's launch and terminate hooks on each group of ``auto_scaling_groups``:
        launches are held until enrolled, terminations until the mapping is gone. Auto Scaling
        sends the actions to EventBridge by itself, so the hooks need no notification target
        and no role; their names carry the prefix the Lifecycle rule matches."""
        hooks = []
        for index, name in enumerate(settings.auto_scaling_groups):
            for transition, lifecycle, default in (
                ("launch", "autoscaling:EC2_INSTANCE_LAUNCHING", "ABANDON"),
                ("terminate", "autoscaling:EC2_INSTANCE_TERMINATING", "CONTINUE"),
            ):
                hooks.append(
                    autoscaling.CfnLifecycleHook(
                        self,
                        f"Group{index}{transition.title()}Hook",
                        auto_scaling_group_name=name,
                        lifecycle_hook_name=settings.hook_name(transition),
                        lifecycle_transition=lifecycle,
                        heartbeat_timeout=HOOK_HEARTBEAT_SECONDS,
                        # Launch: an instance never enrolled is never put in service.
                        default_result=default,
                    )
                )
        return hooks
