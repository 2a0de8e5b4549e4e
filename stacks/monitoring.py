"""Monitoring: the page topic, the alarms that page, and a dashboard.

- ``TunnelUp`` per tunnel: namespace ``tunnelnat/<deployment>`` (the only one this deployment's
  gateway role may publish to: issue 21), the series with dimensions ``Deployment`` and
  ``Tunnel`` that the gateway's health agent publishes beside its per-instance one (``Tunnel``,
  ``Gateway`` = instance ID); a replaced gateway keeps feeding it, so the alarm survives a
  replacement (docs/health.md). Missing data is breaching: a silent gateway is a down tunnel.
  Named ``tunnelnat-<deployment>-TunnelUp-<tunnel>``, the names the healer sweeps.
- The dead-letter queue's depth, and the age of the oldest queued event (a stuck controller).
- The controller's ``Failures`` of the reasons only a human can settle (``PAGED_FAILURES``): one
  is enough, the rest of the fleet converges around it (issue 14).
- Gateway launches and terminations (a replacement is worth knowing about), with ``watch_gateway``;
  in pair mode the pair agent publishes each failover to the same topic itself, and the dashboard
  shows ``Failovers`` and ``FailoverSeconds`` (namespace tunnelnat/<deployment>, dimension
  Deployment).
- The controller's and the healer's own metrics (Powertools, namespace ``tunnelnat``) carry a
  ``Deployment`` dimension: another deployment's failures never page this one.
- A dashboard: alarms, tunnels (up, traffic, silence, rekeys, NAT mappings: the health agent's
  per-tunnel metrics), queue, the controller's metrics (enrolment latency, gateway syncs, free
  pool addresses, failures by reason) and, with ``add_healer``, the healer's.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_cdk import Duration, Stack
from aws_cdk import aws_autoscaling as autoscaling
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from stacks.settings import StackSettings

NAMESPACE = "tunnelnat"
ALARM_PREFIX = "tunnelnat-"  # every alarm of ours: tunnelnat-<deployment>-...
TUNNEL_METRIC = "TunnelUp"
ESTABLISHED_METRIC = "TunnelEstablished"  # the health agent's: up since configured (docs/health.md)
# Powertools' "service" dimension of each function's metrics (Metrics(service=...) in handlers/).
CONTROLLER_SERVICE = "tunnelnat"
HEALER_SERVICE = "tunnelnat-healer"
# The health agent's per-tunnel series (Deployment, Tunnel) and the statistic each is shown by.
TUNNEL_STATS = {
    "TunnelDataIn": "Sum",
    "TunnelDataOut": "Sum",
    "SecondsSinceInbound": "Maximum",
    "ChildSaRekeys": "Sum",
    "ChildSaRekeyFailures": "Sum",
}
NAT_MAPPINGS_METRIC = "NatMappings"  # per Deployment
# The pair agent's, per Deployment (gateway/tunnelnat_gateway/pair.py; PAIR.md).
FAILOVERS_METRIC = "Failovers"
FAILOVER_SECONDS_METRIC = "FailoverSeconds"
# Failure reasons (telemetry.FAILURE_REASONS) that page: each needs a human, and what to do.
PAGED_FAILURES = {
    "conflict": (
        "an instance's private address is already mapped for another instance (both are named "
        "by `tunnelnat doctor`): re-address or untag one"
    ),
    "gateway-ambiguous": (
        "more than one instance is tagged as the gateway and holds G in the VPC and gateway "
        "group: the NAT table is not synced until one is stopped or untagged (`tunnelnat doctor`)"
    ),
    "invalid-mapping": (
        "the gateway left rows of the NAT table out (it applied every other one): "
        "`tunnelnat doctor` shows the rejected rows and why"
    ),
    "route-conflict": (
        "a route for a partner network in an enrolled instance's route table is not tunnelnat's: "
        "remove it, or keep the instance out (`tunnelnat doctor` names the table)"
    ),
}
GATEWAY_EVENTS = [
    "EC2 Instance Launch Successful",
    "EC2 Instance Launch Unsuccessful",
    "EC2 Instance Terminate Successful",
    "EC2 Instance Terminate Unsuccessful",
]


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: StackSettings,
        tunnels: list[str],
        queue: sqs.IQueue,
        dead_letter_queue: sqs.IQueue,
        function: lambda_.IFunction,
    ) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        deployment = settings.deployment
        self._settings = settings

        # -- the page topic, encrypted with a key CloudWatch and EventBridge may use ------------
        self.key = kms.Key(
            self,
            "TopicKey",
            description=f"{deployment}: encrypts the alarm topic",
            enable_key_rotation=True,
        )
        for service in ("cloudwatch.amazonaws.com", "events.amazonaws.com"):
            self.key.add_to_resource_policy(
                iam.PolicyStatement(
                    sid=f"Publish from {service.split('.')[0]}",
                    principals=[iam.ServicePrincipal(service)],
                    actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                    resources=["*"],
                    conditions={"StringEquals": {"aws:SourceAccount": stack.account}},
                )
            )
        self.topic = sns.Topic(
            self,
            "Topic",
            display_name=f"{deployment} alarms",
            master_key=self.key,
            enforce_ssl=True,
        )
        if settings.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(settings.alarm_email))
        page = actions.SnsAction(self.topic)

        # -- the alarms ------------------------------------------------------------------------
        self.tunnel_alarms: dict[str, cloudwatch.Alarm] = {}
        period = Duration.seconds(settings.tunnel_alarm_period_seconds)
        periods = settings.tunnel_alarm_evaluation_periods
        datapoints = settings.tunnel_alarm_datapoints
        self.gateway_namespace = gateway_namespace = settings.gateway_metric_namespace
        for tunnel in tunnels:
            metric = cloudwatch.Metric(
                namespace=gateway_namespace,
                metric_name=TUNNEL_METRIC,
                dimensions_map={"Deployment": deployment, "Tunnel": tunnel},
                statistic="Minimum",
                period=period,
            )
            alarm = cloudwatch.Alarm(
                self,
                f"TunnelUp-{tunnel}",
                # The healer's rule and sweep match this prefix (settings.tunnel_alarm_prefix).
                alarm_name=f"{settings.tunnel_alarm_prefix}{tunnel}",
                alarm_description=(
                    f"Tunnel {tunnel} of {deployment} is down (or its gateway stopped reporting) "
                    f"in {datapoints} of {periods} periods of {period.to_seconds()} s. If it has "
                    "never been up since the gateway was configured (TunnelEstablished 0), the "
                    "healer waits for the partner: check the PSK is set and the partner is up."
                ),
                metric=metric,
                comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                threshold=1,
                evaluation_periods=periods,
                datapoints_to_alarm=datapoints,
                treat_missing_data=cloudwatch.TreatMissingData.BREACHING,
            )
            alarm.add_alarm_action(page)
            alarm.add_ok_action(page)
            self.tunnel_alarms[tunnel] = alarm

        self.dlq_alarm = cloudwatch.Alarm(
            self,
            "DeadLetters",
            alarm_name=f"{ALARM_PREFIX}{deployment}-DeadLetters",
            alarm_description=(
                f"Events the {deployment} controller gave up on are in the dead-letter queue: "
                "read them, fix the cause, then redrive them to the queue."
            ),
            metric=dead_letter_queue.metric_approximate_number_of_messages_visible(
                period=Duration.minutes(1), statistic="Maximum"
            ),
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
            threshold=settings.dlq_alarm_threshold,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.dlq_alarm.add_alarm_action(page)
        self.queue_age_alarm = cloudwatch.Alarm(
            self,
            "QueueAge",
            alarm_name=f"{ALARM_PREFIX}{deployment}-QueueAge",
            alarm_description=(
                f"The {deployment} controller has left an event unprocessed for over "
                f"{settings.queue_age_alarm_seconds} s (failing, throttled or not running)."
            ),
            metric=queue.metric_approximate_age_of_oldest_message(
                period=Duration.minutes(5), statistic="Maximum"
            ),
            comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
            threshold=settings.queue_age_alarm_seconds,
            evaluation_periods=1,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.queue_age_alarm.add_alarm_action(page)
        self.failure_alarms: dict[str, cloudwatch.Alarm] = {}
        for reason, what in PAGED_FAILURES.items():
            alarm = cloudwatch.Alarm(
                self,
                f"Failures-{reason}",
                alarm_name=f"{ALARM_PREFIX}{deployment}-Failures-{reason}",
                alarm_description=f"The {deployment} controller reported {reason}: {what}.",
                metric=cloudwatch.Metric(
                    namespace=NAMESPACE,
                    metric_name="Failures",
                    dimensions_map={
                        "Reason": reason,
                        "service": CONTROLLER_SERVICE,
                        "Deployment": deployment,
                    },
                    statistic="Sum",
                    period=Duration.minutes(5),
                ),
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                threshold=1,
                evaluation_periods=1,
                # No failure reported is no failure: the metric exists only when one happens.
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            alarm.add_alarm_action(page)
            self.failure_alarms[reason] = alarm

        # -- the dashboard ---------------------------------------------------------------------
        self.dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=f"{ALARM_PREFIX}{deployment}"
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(
                title="Alarms",
                alarms=[
                    *self.tunnel_alarms.values(),
                    self.dlq_alarm,
                    self.queue_age_alarm,
                    *self.failure_alarms.values(),
                ],
                width=24,
                height=3,
            )
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Tunnels up (1 = up; established: up since configured)",
                left=[alarm.metric for alarm in self.tunnel_alarms.values()]
                + [
                    cloudwatch.Metric(
                        namespace=gateway_namespace,
                        metric_name=ESTABLISHED_METRIC,
                        dimensions_map={"Deployment": deployment, "Tunnel": tunnel},
                        statistic="Maximum",
                        label=f"{tunnel} established",
                        period=Duration.seconds(settings.tunnel_alarm_period_seconds),
                    )
                    for tunnel in self.tunnel_alarms
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0, max=1),
                width=12,
            ),
            cloudwatch.GraphWidget(
                title="Controller queue",
                left=[
                    queue.metric_approximate_number_of_messages_visible(statistic="Maximum"),
                    dead_letter_queue.metric_approximate_number_of_messages_visible(
                        statistic="Maximum", label="Dead letters"
                    ),
                ],
                right=[queue.metric_approximate_age_of_oldest_message(statistic="Maximum")],
                width=12,
            ),
        )

        def tunnel_stat(name: str, tunnel: str, label: str) -> cloudwatch.Metric:
            dimensions = {"Deployment": deployment, "Tunnel": tunnel}
            return tunnelnat_metric(
                name, TUNNEL_STATS[name], dimensions, label, namespace=gateway_namespace
            )

        tunnel_names = list(self.tunnel_alarms)
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Tunnel traffic (bytes per 5 min)",
                left=[tunnel_stat("TunnelDataIn", t, f"{t} in") for t in tunnel_names],
                right=[tunnel_stat("TunnelDataOut", t, f"{t} out") for t in tunnel_names],
                width=6,
            ),
            cloudwatch.GraphWidget(
                title="Seconds since the last inbound packet",
                left=[tunnel_stat("SecondsSinceInbound", t, t) for t in tunnel_names],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=6,
            ),
            cloudwatch.GraphWidget(
                title="CHILD_SA rekeys (done, failed)",
                left=[tunnel_stat("ChildSaRekeys", t, f"{t} rekeys") for t in tunnel_names]
                + [
                    tunnel_stat("ChildSaRekeyFailures", t, f"{t} failed rekeys")
                    for t in tunnel_names
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=6,
            ),
            cloudwatch.GraphWidget(
                title="NAT mappings on the gateway",
                left=[
                    cloudwatch.Metric(
                        namespace=gateway_namespace,
                        metric_name=NAT_MAPPINGS_METRIC,
                        dimensions_map={"Deployment": deployment},
                        statistic="Maximum",
                        label="mappings",
                        period=Duration.minutes(5),
                    )
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=6,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Controller function",
                left=[function.metric_invocations(), function.metric_errors()],
                right=[function.metric_duration(statistic="p99")],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Enrolments",
                left=[
                    controller_metric(deployment, "Enrolments", "Sum"),
                    controller_metric(deployment, "Unenrolments", "Sum"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Enrolment latency: event to converged (s)",
                left=[
                    controller_metric(deployment, "EnrolmentLatency", stat, label=stat)
                    for stat in ("p50", "p90", "Maximum")
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=8,
            ),
        )
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Gateway syncs",
                left=[controller_metric(deployment, "GatewaySyncs", "Sum")],
                right=[
                    controller_metric(
                        deployment, "GatewaySyncDuration", stat, label=f"duration {stat} (ms)"
                    )
                    for stat in ("p50", "p99")
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Address pool: free addresses",
                left=[controller_metric(deployment, "PoolFreeAddresses", "Minimum")],
                right=[controller_metric(deployment, "PoolExhausted", "Sum")],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Controller failures by reason",
                left=[
                    cloudwatch.MathExpression(
                        # One line per Reason the controller has reported, whatever they are.
                        expression=(
                            f"SEARCH('{{{NAMESPACE},Deployment,Reason,service}} "
                            f'MetricName="Failures" service="{CONTROLLER_SERVICE}" '
                            f"Deployment=\"{deployment}\"', 'Sum', 300)"
                        ),
                        label="",
                        period=Duration.minutes(5),
                    )
                ],
                right=[
                    controller_metric(deployment, name, "Sum")
                    for name in (
                        "CommandFailures",
                        "StoreConflicts",
                        "RejectedEvents",
                        "DeadLettered",
                    )
                ],
                width=8,
            ),
        )

    def watch_gateway(self, gateway_group: autoscaling.IAutoScalingGroup, *, pair: bool) -> None:
        """A replaced gateway is announced; in pair mode the dashboard shows the failovers (the
        pair agent publishes each to the topic itself: a switch is news even when it worked)."""
        deployment = self._settings.deployment
        self.gateway_rule = events.Rule(
            self,
            "GatewayReplaced",
            description=f"{deployment}: the gateway's Auto Scaling group launched or terminated",
            event_pattern=events.EventPattern(
                source=["aws.autoscaling"],
                detail_type=GATEWAY_EVENTS,
                detail={"AutoScalingGroupName": [gateway_group.auto_scaling_group_name]},
            ),
            targets=[targets.SnsTopic(self.topic)],
        )
        if not pair:
            return

        def pair_metric(
            name: str, statistic: str, label: str, period: Duration | None = None
        ) -> cloudwatch.Metric:
            return tunnelnat_metric(
                name,
                statistic,
                {"Deployment": deployment},
                label,
                period,
                namespace=self._settings.gateway_metric_namespace,
            )

        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Gateway pair: failovers (standby took G's ENI) and their time (s)",
                left=[pair_metric(FAILOVERS_METRIC, "Sum", "failovers")],
                right=[
                    pair_metric(FAILOVER_SECONDS_METRIC, "Maximum", "failover seconds (max)"),
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                right_y_axis=cloudwatch.YAxisProps(min=0),
                width=12,
            ),
            cloudwatch.SingleValueWidget(
                title="Failovers (last 7 days)",
                metrics=[pair_metric(FAILOVERS_METRIC, "Sum", "failovers", Duration.days(7))],
                width=12,
            ),
        )

    def add_partner_pools(self, partners: Sequence[str]) -> None:
        """Several partners: each partner's free pool addresses (the controller publishes them
        under a ``Partner`` dimension too; the deployment's line above is the scarcest pool)."""
        if not partners:
            return
        deployment = self._settings.deployment
        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Address pools per partner: free addresses",
                left=[
                    tunnelnat_metric(
                        "PoolFreeAddresses",
                        "Minimum",
                        {"service": CONTROLLER_SERVICE, "Deployment": deployment, "Partner": name},
                        name,
                    )
                    for name in partners
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=24,
            )
        )

    def add_healer(self, function: lambda_.IFunction) -> None:
        """The healer's row: what it did, how fast tunnels came back, and its function."""

        def healer_metric(name: str, statistic: str, label: str | None = None) -> cloudwatch.Metric:
            dimensions = {"service": HEALER_SERVICE, "Deployment": self._settings.deployment}
            return tunnelnat_metric(name, statistic, dimensions, label)

        self.dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Healer: restarts and pages",
                left=[
                    healer_metric("Restarts", "Sum"),
                    healer_metric("RestartFailures", "Sum"),
                    healer_metric("Pages", "Sum"),
                ],
                width=6,
            ),
            cloudwatch.GraphWidget(
                title="Healer: time to recovery (s)",
                left=[
                    healer_metric("TimeToRecovery", stat, label=stat)
                    for stat in ("Average", "Maximum")
                ],
                left_y_axis=cloudwatch.YAxisProps(min=0),
                width=6,
            ),
            cloudwatch.GraphWidget(
                title="Healer: held back",
                left=[
                    healer_metric(name, "Sum")
                    for name in (
                        "SkippedBackoff",
                        "SkippedCapped",
                        "SkippedWaitingForPartner",
                        "SkippedNoReport",
                        "SkippedAlreadyOk",
                        "DuplicateEvents",
                        "RejectedEvents",
                    )
                ],
                width=6,
            ),
            cloudwatch.GraphWidget(
                title="Healer function",
                left=[function.metric_invocations(), function.metric_errors()],
                right=[function.metric_duration(statistic="Maximum")],
                width=6,
            ),
        )


def tunnelnat_metric(
    name: str,
    statistic: str,
    dimensions: dict[str, str],
    label: str | None = None,
    period: Duration | None = None,
    *,
    namespace: str = NAMESPACE,
) -> cloudwatch.Metric:
    """A metric in tunnelnat's namespace, or ``namespace`` (5-minute periods unless told)."""
    return cloudwatch.Metric(
        namespace=namespace,
        metric_name=name,
        dimensions_map=dimensions,
        statistic=statistic,
        label=label,
        period=period or Duration.minutes(5),
    )


def controller_metric(
    deployment: str, name: str, statistic: str, label: str | None = None
) -> cloudwatch.Metric:
    """One of the controller's Powertools metrics (namespace tunnelnat, dimensions service and
    Deployment)."""
    dimensions = {"service": CONTROLLER_SERVICE, "Deployment": deployment}
    return tunnelnat_metric(name, statistic, dimensions, label)
