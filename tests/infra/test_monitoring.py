"""Monitoring: the failures that page a human (issue 14's follow-up) and the dashboard's view into
the tunnel (issue 12). The names on both sides are read from the code that publishes them (the
controller's failure reasons and its metric's dimensions, the health agent's metric data), so a
rename on either side fails here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from stacks.monitoring import PAGED_FAILURES, TUNNEL_STATS
from tests.infra.conftest import ROOT, example_context, synthesize
from tunnelnat.telemetry import FAILURE_REASONS

sys.path.insert(0, str(ROOT / "gateway"))
from tunnelnat_gateway import health as agent  # noqa: E402

CONTEXT = example_context()
DEPLOYMENT = CONTEXT["deployment"]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("cdk.out"))


def _alarms(s) -> dict[str, dict[str, Any]]:
    return {
        a["Properties"]["AlarmName"]: a["Properties"]
        for a in s.resources("AWS::CloudWatch::Alarm").values()
    }


def _dashboard(s) -> dict[str, Any]:
    """The dashboard's body as JSON, each CloudFormation token (an alarm's ARN, a queue's name)
    replaced by a marker."""
    _, dashboard = s.one("AWS::CloudWatch::Dashboard")
    body = dashboard["Properties"]["DashboardBody"]
    if isinstance(body, dict):
        body = "".join(p if isinstance(p, str) else "TOKEN" for p in body["Fn::Join"][1])
    return json.loads(body)


def test_every_failure_a_human_must_settle_pages_the_topic(s):
    assert set(PAGED_FAILURES) == {
        "conflict",
        "gateway-ambiguous",
        "invalid-mapping",
        "route-conflict",
    }
    assert set(PAGED_FAILURES) <= set(FAILURE_REASONS)  # reasons the controller reports
    alarms = _alarms(s)
    topic = s.ref(s.stack.monitoring.topic)
    for reason in PAGED_FAILURES:
        alarm = alarms[f"tunnelnat-{DEPLOYMENT}-Failures-{reason}"]
        assert (alarm["Namespace"], alarm["MetricName"]) == ("tunnelnat", "Failures")
        # What handlers/controller.py's single metric carries: service, Reason and (issue 21,
        # finding 4: another deployment's failures never page this one) Deployment.
        assert sorted(alarm["Dimensions"], key=lambda d: d["Name"]) == [
            {"Name": "Deployment", "Value": DEPLOYMENT},
            {"Name": "Reason", "Value": reason},
            {"Name": "service", "Value": "tunnelnat"},
        ]
        assert (alarm["Statistic"], alarm["Period"]) == ("Sum", 300)
        assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
        assert (alarm["Threshold"], alarm["EvaluationPeriods"]) == (1, 1)
        assert alarm["TreatMissingData"] == "notBreaching"
        assert alarm["AlarmActions"] == [topic]
        assert "tunnelnat doctor" in alarm["AlarmDescription"]


def test_the_failure_metric_is_the_one_the_controller_publishes():
    source = (ROOT / "lambdas" / "tunnelnat" / "handlers" / "controller.py").read_text()
    assert 'name="Failures"' in source
    assert 'metric.add_dimension(name="Reason", value=reason)' in source
    assert '"service": SERVICE' in source
    stack_source = (ROOT / "stacks" / "controller.py").read_text()
    assert '"POWERTOOLS_SERVICE_NAME": SERVICE' in stack_source
    assert 'SERVICE = "tunnelnat"' in stack_source


def test_the_alarm_widget_shows_the_failure_alarms(s):
    [status] = [w for w in _dashboard(s)["widgets"] if w["type"] == "alarm"]
    assert len(status["properties"]["alarms"]) == 1 + 2 + len(PAGED_FAILURES)


def _published_per_tunnel() -> dict[str, list[dict[str, str]]]:
    """What the health agent publishes per tunnel beside TunnelUp, with every statistic known."""
    stats = agent.TunnelStats(bytes_in=1, bytes_out=2, idle_in=3.0, rekeys=4, rekey_failures=5)
    status = agent.TunnelStatus("partner", True, "up", 1, stats=stats)
    report = agent.Report("i-1", DEPLOYMENT, tunnels=[status], nat_mappings=7)
    return {d["MetricName"]: d["Dimensions"] for d in agent.metric_data(report, now=0)}


def test_the_dashboard_graphs_each_tunnel_statistic_the_agent_publishes(s):
    published = _published_per_tunnel()
    per_tunnel = [
        {"Name": "Deployment", "Value": DEPLOYMENT},
        {"Name": "Tunnel", "Value": "partner"},
    ]
    assert {n for n, dims in published.items() if dims == per_tunnel} == {
        "TunnelEstablished",
        "TunnelUp",
        *TUNNEL_STATS,
    }
    assert published["NatMappings"] == [{"Name": "Deployment", "Value": DEPLOYMENT}]
    graphed: dict[str, list] = {}
    for widget in _dashboard(s)["widgets"]:
        for line in widget["properties"].get("metrics", []):
            # Issue 21, finding 3: the gateways' namespace of this deployment.
            namespace = f"tunnelnat/{DEPLOYMENT}"
            if line[:1] == [namespace] and line[1] in (*TUNNEL_STATS, "NatMappings"):
                graphed.setdefault(line[1], []).append(line)
    assert set(graphed) == {*TUNNEL_STATS, "NatMappings"}
    tunnel = CONTEXT.get("tunnel_name", "partner")
    for name, statistic in TUNNEL_STATS.items():
        [line] = graphed[name]
        assert line[2:6] == ["Deployment", DEPLOYMENT, "Tunnel", tunnel]
        assert line[6]["stat"] == statistic
    [line] = graphed["NatMappings"]
    assert line[2:4] == ["Deployment", DEPLOYMENT] and line[4]["stat"] == "Maximum"
