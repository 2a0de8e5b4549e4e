"""The healer in the quick-start stack (issue 5), the CLI's outputs and the dashboard (issue 7).

What the healer's code needs is read from the code itself where it can be (the environment
``HealerSettings.from_environ`` reads, the DynamoDB calls its adapters make, the metric names the
handlers publish), so a change on either side that breaks the other fails here.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from stacks.settings import load_settings
from tests.infra.conftest import ROOT, as_list, example_context, statements, synthesize

CONTEXT = example_context()
SETTINGS = load_settings(CONTEXT).stack
DEPLOYMENT = CONTEXT["deployment"]
PREFIX = f"tunnelnat-{DEPLOYMENT}-TunnelUp-"
LAMBDAS = ROOT / "lambdas" / "tunnelnat"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"))


def _function(s, construct) -> dict[str, Any]:
    return s.resources("AWS::Lambda::Function")[s.logical_id(construct)]["Properties"]


def _healer_statements(s) -> list[dict[str, Any]]:
    role = s.stack.healer.role
    policy = s.resources("AWS::IAM::Policy")[s.logical_id(role.node.find_child("DefaultPolicy"))]
    return statements(policy)


class _Recording(dict):
    """An environment that remembers which keys were asked for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key, default=None):  # type: ignore[override]
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)


def _deployed_env(s, construct) -> dict[str, str]:
    """The function's environment as it would be deployed: CloudFormation tokens resolved to
    plausible values of the right shape."""
    resolved = {
        s.logical_id(s.stack.controller.table): DEPLOYMENT,
        s.logical_id(s.stack.monitoring.topic): (
            f"arn:aws:sns:eu-west-1:123456789012:{DEPLOYMENT}-MonitoringTopic-ABC123"
        ),
        s.logical_id(s.stack.controller.dead_letter_queue): (
            f"https://sqs.eu-west-1.amazonaws.com/123456789012/{DEPLOYMENT}-events-dlq"
        ),
        s.one("AWS::EC2::VPC")[0]: "vpc-0123456789abcdef0",
        s.logical_id(s.stack.gateway.group): f"{DEPLOYMENT}-gateway-ABC123",
        s.logical_id(s.stack.gateway.eni): "eni-0123456789abcdef0",
    }
    out = {}
    for key, value in _function(s, construct)["Environment"]["Variables"].items():
        if isinstance(value, dict):
            (ref,) = [v for k, v in value.items() if k in ("Ref", "Fn::GetAtt")]
            value = resolved[ref if isinstance(ref, str) else ref[0]]
        out[key] = value
    return out | {"AWS_REGION": "eu-west-1"}


# -- the function ----------------------------------------------------------------------------


def test_healer_function_same_asset_python313_powertools_xray(s):
    healer = _function(s, s.stack.healer.function)
    controller = _function(s, s.stack.controller.function)
    assert healer["Runtime"] == "python3.13"
    assert healer["Handler"] == "tunnelnat.handlers.healer.handler"
    assert healer["TracingConfig"] == {"Mode": "Active"}
    assert healer["FunctionName"] == f"{DEPLOYMENT}-healer"
    # One code asset and one Powertools layer for both functions.
    assert healer["Code"] == controller["Code"]
    assert healer["Layers"] == controller["Layers"]
    # It waits for RestartTunnel up to its command timeout, then records and reports.
    assert healer["Timeout"] >= SETTINGS.healer_command_timeout_seconds + 30


def test_healer_environment_is_everything_its_settings_read(s):
    from tunnelnat.healer import HealerSettings

    env = _Recording(_deployed_env(s, s.stack.healer.function))
    settings = HealerSettings.from_environ(env)
    read = {k for k in env.asked if k.startswith("TUNNELNAT_")}
    assert read <= set(env), f"not set by the stack: {sorted(read - set(env))}"
    assert settings.table_name == settings.idempotency_table == DEPLOYMENT
    assert settings.deployment == DEPLOYMENT
    assert settings.document_prefix == f"{DEPLOYMENT}-"
    assert settings.alarm_prefix == PREFIX
    assert settings.restart_wait_seconds == SETTINGS.healer_restart_wait_seconds
    assert settings.command_timeout_seconds == SETTINGS.healer_command_timeout_seconds
    assert settings.established_lookback_seconds == max(900, 3 * SETTINGS.health_interval_seconds)
    policy = settings.policy
    assert policy.backoff_base_seconds == SETTINGS.healer_backoff_base_seconds
    assert policy.backoff_factor == SETTINGS.healer_backoff_factor
    assert policy.backoff_max_seconds == SETTINGS.healer_backoff_max_seconds
    assert policy.max_restarts == SETTINGS.healer_max_restarts
    assert policy.window_seconds == SETTINGS.healer_window_seconds
    # The gateway as the controller finds it: the tagged instance holding G in this VPC and group.
    assert str(settings.gateway_ip) == CONTEXT["gateway_private_ip"]
    assert settings.vpc_id == "vpc-0123456789abcdef0"
    assert settings.gateway_group == f"{DEPLOYMENT}-gateway"
    raw = _function(s, s.stack.healer.function)["Environment"]["Variables"]
    controller = _function(s, s.stack.controller.function)["Environment"]["Variables"]
    for key in ("TUNNELNAT_VPC_ID", "TUNNELNAT_GATEWAY_GROUP"):
        assert raw[key] == controller[key], key
    assert raw["TUNNELNAT_GATEWAY_GROUP"] == f"{DEPLOYMENT}-gateway"  # the group's explicit name
    assert raw["TUNNELNAT_METRIC_NAMESPACE"] == f"tunnelnat/{DEPLOYMENT}"
    # RestartTunnel goes to the holder of G's ENI: the active gateway of the pair.
    assert settings.gateway_eni_id == "eni-0123456789abcdef0"
    assert raw["TUNNELNAT_GATEWAY_ENI_ID"] == s.ref(s.stack.gateway.eni)
    assert raw["TUNNELNAT_PAGE_TOPIC_ARN"] == s.ref(s.stack.monitoring.topic)
    assert raw["POWERTOOLS_METRICS_NAMESPACE"] == "tunnelnat"


def test_every_tunnel_up_alarm_is_one_the_healer_sweeps(s):
    for alarm in s.stack.monitoring.tunnel_alarms.values():
        name = s.resources("AWS::CloudWatch::Alarm")[s.logical_id(alarm)]["Properties"]
        assert name["AlarmName"].startswith(PREFIX)
    for alarm in (s.stack.monitoring.dlq_alarm, s.stack.monitoring.queue_age_alarm):
        name = s.resources("AWS::CloudWatch::Alarm")[s.logical_id(alarm)]["Properties"]
        assert not name["AlarmName"].startswith(PREFIX)


# -- what invokes it -------------------------------------------------------------------------


def test_alarm_rule_matches_only_this_deployments_tunnel_up_alarms(s):
    healer = s.stack.healer
    rule = s.resources("AWS::Events::Rule")[s.logical_id(healer.alarm_rule)]["Properties"]
    assert rule["EventPattern"] == {
        "source": ["aws.cloudwatch"],
        "detail-type": ["CloudWatch Alarm State Change"],
        "detail": {
            "alarmName": [{"prefix": PREFIX}],
            "state": {"value": ["ALARM", "OK"]},
        },
    }
    (target,) = rule["Targets"]
    assert target["Arn"] == s.arn(healer.function)
    assert target["RetryPolicy"]["MaximumRetryAttempts"] == 2


def test_sweep_rule_runs_the_healer_every_minute(s):
    healer = s.stack.healer
    rule = s.resources("AWS::Events::Rule")[s.logical_id(healer.sweep_rule)]["Properties"]
    assert rule["ScheduleExpression"] == "rate(1 minute)"
    (target,) = rule["Targets"]
    assert target["Arn"] == s.arn(healer.function)


def test_only_the_two_rules_may_invoke_the_healer(s):
    healer = s.stack.healer
    permissions = [
        p["Properties"]
        for p in s.resources("AWS::Lambda::Permission").values()
        if p["Properties"]["FunctionName"] == s.arn(healer.function)
    ]
    assert {p["Principal"] for p in permissions} == {"events.amazonaws.com"}
    assert {p["SourceArn"]["Fn::GetAtt"][0] for p in permissions} == {
        s.logical_id(healer.alarm_rule),
        s.logical_id(healer.sweep_rule),
    }


def test_handler_accepts_what_the_rules_send():
    """The rules' two event shapes parse as the handler's models (and nothing else does)."""
    from tunnelnat.handlers.healer import AlarmStateChangeEvent, ScheduledSweepEvent, classify

    alarm = {
        "version": "0",
        "id": "c4c1c1c9-6542-e61b-6ef0-8c4d36933a92",
        "detail-type": "CloudWatch Alarm State Change",
        "source": "aws.cloudwatch",
        "account": "123456789012",
        "time": "2026-11-24T12:00:00Z",
        "region": "eu-west-1",
        "resources": ["arn:aws:cloudwatch:eu-west-1:123456789012:alarm:x"],
        "detail": {
            "alarmName": f"{PREFIX}partner",
            "state": {"value": "ALARM", "timestamp": "2026-11-24T12:00:00.000+0000"},
        },
    }
    sweep = alarm | {"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}}
    assert isinstance(classify(alarm), AlarmStateChangeEvent)
    assert isinstance(classify(sweep), ScheduledSweepEvent)


# -- least privilege -------------------------------------------------------------------------


def test_healer_sends_only_restart_tunnel_and_only_to_this_gateway(s):
    by_sid = {st.get("Sid"): st for st in _healer_statements(s)}
    document = by_sid["RunOnlyRestartTunnel"]
    assert document["Action"] == "ssm:SendCommand"
    rendered = json.dumps(document["Resource"])
    assert f":document/{DEPLOYMENT}-RestartTunnel" in rendered and "*" not in rendered
    gateway = by_sid["OnThisDeploymentsGateways"]
    assert ":instance/*" in json.dumps(gateway["Resource"])
    # Issue 21, finding 1: the group's members, never whatever carries the gateway's tags.
    assert gateway["Condition"] == {
        "StringEquals": {"ssm:resourceTag/aws:autoscaling:groupName": f"{DEPLOYMENT}-gateway"}
    }
    sends = [st for st in _healer_statements(s) if "ssm:SendCommand" in as_list(st["Action"])]
    assert {st["Sid"] for st in sends} == {"RunOnlyRestartTunnel", "OnThisDeploymentsGateways"}


def test_healer_reads_only_tunnel_up_alarms_and_pages_only_its_topic(s):
    by_sid = {st.get("Sid"): st for st in _healer_statements(s)}
    alarms = by_sid["ReadTunnelUpAlarms"]
    assert alarms["Action"] == "cloudwatch:DescribeAlarms"
    assert json.dumps(alarms["Resource"]).endswith(f':alarm:{PREFIX}*"]]}}')
    assert by_sid["PageTheTopic"] == {
        "Sid": "PageTheTopic",
        "Effect": "Allow",
        "Action": "sns:Publish",
        "Resource": s.ref(s.stack.monitoring.topic),
    }
    assert by_sid["EncryptForTheTopic"]["Resource"] == s.arn(s.stack.monitoring.key)
    assert set(by_sid["EncryptForTheTopic"]["Action"]) == {"kms:GenerateDataKey", "kms:Decrypt"}


def _dynamodb_calls(*paths: Path) -> set[str]:
    """IAM actions of the DynamoDB calls in these modules (``self._db.put_item`` -> PutItem)."""
    calls: set[str] = set()
    for path in paths:
        text = path.read_text()
        calls |= set(re.findall(r"self\._db\.([a-z_]+)\(", text)) - {"get_paginator"}
        calls |= set(re.findall(r"self\._db\.get_paginator\(\"([a-z_]+)\"\)", text))
    # A transaction is authorized by the per-item actions in it.
    calls.discard("transact_write_items")
    return {"dynamodb:" + "".join(p.title() for p in c.split("_")) for c in calls}


def test_healer_touches_only_its_own_items_with_the_calls_its_code_makes(s):
    from aws_lambda_powertools.utilities.idempotency.persistence import dynamodb as persistence

    from tunnelnat.handlers.healer import IDEMPOTENCY_PK
    from tunnelnat.healer import HEALER_PK

    by_sid = {st.get("Sid"): st for st in _healer_statements(s)}
    table = by_sid["ItsRecordsInTheTable"]
    assert table["Resource"] == s.arn(s.stack.controller.table)
    assert table["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [HEALER_PK, IDEMPOTENCY_PK]}
    }
    # The heal record's adapter, and Powertools Idempotency's DynamoDB layer.
    needed = _dynamodb_calls(LAMBDAS / "healer.py")
    idempotency = Path(persistence.__file__).read_text()
    needed |= {
        "dynamodb:" + "".join(p.title() for p in c.split("_"))
        for c in re.findall(r"self\.client\.([a-z_]+)\(", idempotency)
    }
    assert needed <= set(table["Action"]), sorted(needed - set(table["Action"]))
    assert not {a for a in table["Action"] if a in ("dynamodb:Scan", "dynamodb:Query")}


def test_healer_has_nothing_else(s):
    allowed_star = {
        "ssm:GetCommandInvocation",
        "ec2:DescribeInstances",
        "ec2:DescribeNetworkInterfaces",
        "cloudwatch:GetMetricData",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }
    sids = set()
    for st in _healer_statements(s):
        actions = set(as_list(st["Action"]))
        assert not any(a.endswith("*") for a in actions), st
        if st["Resource"] == "*":
            assert actions <= allowed_star, st
        sids.add(st.get("Sid"))
    assert sids - {None} == {
        "RunOnlyRestartTunnel",
        "OnThisDeploymentsGateways",
        "FollowCommandsFindTheGateway",
        "ReadTunnelUpAlarms",
        "ReadTheGatewaysReports",
        "ReadTunnelEstablished",
        "ItsRecordsInTheTable",
        "PageTheTopic",
        "EncryptForTheTopic",
    }


def test_controller_table_actions_cover_the_calls_its_store_makes(s):
    controller = s.stack.controller
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(controller.role.node.find_child("DefaultPolicy"))
    ]
    (table,) = [st for st in statements(policy) if st.get("Sid") == "OwnTable"]
    needed = _dynamodb_calls(LAMBDAS / "adapters" / "store.py")
    assert needed <= set(table["Action"]), sorted(needed - set(table["Action"]))


# The controller's adapters and the IAM service prefix of the client each holds.
CONTROLLER_CLIENTS = {
    "_ssm": "ssm",
    "_ec2": "ec2",
    "_db": "dynamodb",
    "_sqs": "sqs",
    "_asg": "autoscaling",
}


def _pascal(call: str) -> str:
    return "".join(part.title() for part in call.split("_"))


def test_controller_may_make_every_call_its_adapters_make(s):
    """Read the calls from the adapters' code: a new API call without its permission fails here,
    not with AccessDenied in production."""
    needed: set[str] = set()
    # adapters/pair.py serves the healer and the CLI (test_healer_may_find_the_eni_holder).
    for path in sorted(p for p in (LAMBDAS / "adapters").glob("*.py") if p.name != "pair.py"):
        text = path.read_text()
        for attr, service in CONTROLLER_CLIENTS.items():
            calls = set(re.findall(rf"self\.{attr}\.([a-z_]+)\(", text))
            calls |= set(re.findall(rf"self\.{attr}\.get_paginator\(\"([a-z_]+)\"\)", text))
            calls -= {"get_paginator", "transact_write_items"}  # per-item actions authorize it
            # SQS's batch calls are authorized by their single-message actions.
            needed |= {f"{service}:{_pascal(c.removesuffix('_batch'))}" for c in calls}
    controller = s.stack.controller
    policy = s.resources("AWS::IAM::Policy")[
        s.logical_id(controller.role.node.find_child("DefaultPolicy"))
    ]
    granted = {a for st in statements(policy) for a in as_list(st["Action"])}
    assert needed <= granted, sorted(needed - granted)


def test_healer_may_find_the_eni_holder(s):
    """EniHolder's EC2 calls (the healer's GatewayLocator in pair and single mode alike)."""
    text = (LAMBDAS / "adapters" / "pair.py").read_text()
    needed = {f"ec2:{_pascal(c)}" for c in re.findall(r"self\._ec2\.([a-z_]+)\(", text)}
    assert needed == {"ec2:DescribeNetworkInterfaces", "ec2:DescribeInstances"}
    granted = {a for st in _healer_statements(s) for a in as_list(st["Action"])}
    assert needed <= granted, sorted(needed - granted)


# -- outputs and dashboard -------------------------------------------------------------------


def test_outputs_the_cli_reads(s):
    from tunnelnat_cli.app import STACK_OUTPUTS

    outputs = s.json["Outputs"]
    assert set(STACK_OUTPUTS) <= set(outputs)
    controller = s.stack.controller
    assert outputs["TableName"]["Value"] == s.ref(controller.table)
    assert outputs["QueueUrl"]["Value"] == s.ref(controller.queue)
    assert outputs["DeadLetterQueueUrl"]["Value"] == s.ref(controller.dead_letter_queue)
    assert outputs["ControllerFunctionName"]["Value"] == s.ref(controller.function)
    assert outputs["HealerFunctionName"]["Value"] == s.ref(s.stack.healer.function)


def _published_metrics() -> set[str]:
    """Metric names the Lambda code publishes (telemetry.count/seconds, add_metric, ...)."""
    names: set[str] = set()
    for path in LAMBDAS.rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"telemetry\.[a-z_]+\(\s*\"([A-Za-z]+)\"", text))
        names |= set(re.findall(r"(?:add_metric|single_metric)\(\s*name=\"([A-Za-z]+)\"", text))
        # The healer's skip counters, named in a mapping passed to telemetry.count.
        names |= set(re.findall(r"Action\.[A-Z_]+: \"([A-Za-z]+)\"", text))
    return names


def _agent_metrics() -> set[str]:
    """Metric names the gateway's health agent (tunnelnat_gateway/health.py) publishes, with
    every statistic and counter known."""
    sys.path.insert(0, str(ROOT / "gateway"))
    from tunnelnat_gateway import health as agent

    stats = agent.TunnelStats(bytes_in=1, bytes_out=2, idle_in=3.0, rekeys=4, rekey_failures=5)
    report = agent.Report(
        "i-1",
        DEPLOYMENT,
        tunnels=[agent.TunnelStatus("partner", True, "up", 1, stats=stats)],
        counters=dict.fromkeys(agent.COUNTER_METRICS, 1),
        nat_mappings=1,
    )
    return {d["MetricName"] for d in agent.metric_data(report, now=0)}


def _pair_metrics() -> set[str]:
    """Metric names the pair agent (tunnelnat_gateway/pair.py) publishes."""
    text = (ROOT / "gateway" / "tunnelnat_gateway" / "pair.py").read_text()
    return set(re.findall(r"\"MetricName\": \"([A-Za-z]+)\"", text))


def _dashboard(s) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The dashboard's tunnelnat metrics (name -> dimensions) and its math expressions."""
    _, dashboard = s.one("AWS::CloudWatch::Dashboard")
    parts = dashboard["Properties"]["DashboardBody"]["Fn::Join"][1]
    # Tokens (ARNs, the region) sit inside JSON strings: a placeholder keeps it valid JSON.
    body = json.loads("".join(p if isinstance(p, str) else "TOKEN" for p in parts))
    metrics: dict[str, dict[str, str]] = {}
    expressions: list[str] = []
    for widget in body["widgets"]:
        for line in widget["properties"].get("metrics", []):
            if isinstance(line[0], dict):
                expressions.append(line[0]["expression"])
                continue
            fields = [f for f in line if not isinstance(f, dict)]
            if fields[0] in ("tunnelnat", f"tunnelnat/{DEPLOYMENT}"):
                metrics[fields[1]] = dict(zip(fields[2::2], fields[3::2], strict=True))
    return metrics, expressions


def test_dashboard_shows_the_controllers_and_the_healers_metrics(s):
    metrics, expressions = _dashboard(s)
    controller = {
        "Enrolments",
        "Unenrolments",
        "GatewaySyncs",
        "EnrolmentLatency",
        "GatewaySyncDuration",
        "PoolFreeAddresses",
        "PoolExhausted",
        "CommandFailures",
        "DeadLettered",
    }
    healer = {"Restarts", "RestartFailures", "TimeToRecovery", "Pages"}
    # Pair mode (the default): the pair agent's, per deployment.
    for name in ("Failovers", "FailoverSeconds"):
        assert metrics.get(name) == {"Deployment": DEPLOYMENT}, name
    # Issue 21, finding 4: the controller's and the healer's carry the deployment.
    for name in controller:
        assert metrics.get(name) == {"service": "tunnelnat", "Deployment": DEPLOYMENT}, name
    for name in healer:
        assert metrics.get(name) == {"service": "tunnelnat-healer", "Deployment": DEPLOYMENT}, name
    # Failures by reason: every Reason the controller reports, without listing them here.
    (search,) = [e for e in expressions if "Failures" in e]
    assert search.startswith('SEARCH(\'{tunnelnat,Deployment,Reason,service} MetricName="Failures"')
    assert f'Deployment="{DEPLOYMENT}"' in search


def test_dashboard_names_only_metrics_the_code_publishes(s):
    metrics, _ = _dashboard(s)
    unknown = set(metrics) - _published_metrics() - _agent_metrics() - _pair_metrics()
    assert not unknown, f"on the dashboard but published by no code: {sorted(unknown)}"
