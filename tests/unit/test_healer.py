"""The healer's decisions (pure) and its service with in-memory adapters."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import pytest

from tunnelnat.adapters.commands import CommandError, CommandResult
from tunnelnat.core.config import ConfigError
from tunnelnat.healer import (
    Action,
    AlarmView,
    Attempt,
    GatewayReport,
    Healer,
    HealerPolicy,
    HealerSettings,
    HealState,
    InvalidAlarm,
    decide,
    latest_established,
    page_message,
    parse_alarm_time,
    tunnel_of,
    tunnel_up_dimensions,
)

POLICY = HealerPolicy(
    backoff_base_seconds=60, backoff_factor=2, backoff_max_seconds=300, max_restarts=3
)
T0 = 1_800_000_000.0


def attempt(at: float, status: str = "Failed") -> Attempt:
    return Attempt(
        id=f"a{at}", at=at, alarm="tunnelnat-lab-TunnelUp-partner", alarm_time="t", status=status
    )


# -- decide --------------------------------------------------------------------------------------


def test_backoff_is_exponential_and_capped():
    assert [POLICY.backoff(n) for n in range(0, 6)] == [0, 60, 120, 240, 300, 300]


def test_first_alarm_restarts():
    d = decide("ALARM", HealState("partner"), T0, POLICY, established=True)
    assert d.action is Action.RESTART and d.reason == "attempt 1 of 3"


@pytest.mark.parametrize(
    "state, action", [("OK", Action.SKIP_OK), ("INSUFFICIENT_DATA", Action.SKIP_NOT_ALARM)]
)
def test_alarm_no_longer_in_alarm_is_left_alone(state, action):
    busy = HealState("partner", attempts=(attempt(T0 - 5000),))
    assert decide(state, busy, T0, POLICY, established=True).action is action


def test_backoff_between_attempts():
    one = HealState("partner", attempts=(attempt(T0),))
    d = decide("ALARM", one, T0 + 59, POLICY, established=True)
    assert d.action is Action.WAIT and d.retry_at == T0 + 60
    assert decide("ALARM", one, T0 + 60, POLICY, established=True).action is Action.RESTART
    two = HealState("partner", attempts=(attempt(T0), attempt(T0 + 60)))
    assert decide("ALARM", two, T0 + 179, POLICY, established=True).action is Action.WAIT
    assert decide("ALARM", two, T0 + 180, POLICY, established=True).action is Action.RESTART


def test_cap_per_window_then_page_once():
    three = HealState("partner", attempts=(attempt(T0), attempt(T0 + 60), attempt(T0 + 180)))
    d = decide("ALARM", three, T0 + 500, POLICY, established=True)
    assert d.action is Action.PAGE and "3 restarts" in d.reason
    paged = replace(three, paged_at=T0 + 500)
    assert decide("ALARM", paged, T0 + 900, POLICY, established=True).action is Action.ALREADY_PAGED
    # An hour after the first attempt it leaves the (rolling) window: one more restart is allowed
    # (the last attempt is long past its back-off); then the cap holds again, already paged.
    assert decide("ALARM", paged, T0 + 3600, POLICY, established=True).action is Action.RESTART
    again = replace(paged, attempts=(*paged.attempts, attempt(T0 + 3600)))
    assert (
        decide("ALARM", again, T0 + 3620, POLICY, established=True).action is Action.ALREADY_PAGED
    )


def test_page_message_lists_the_attempts():
    state = HealState("partner", attempts=(attempt(T0, "Failed"), attempt(T0 + 60, "TimedOut")))
    msg = page_message("partner", "alarm-x", state, T0 + 100, POLICY)
    assert msg["tunnel"] == "partner" and msg["cap"] == 3
    assert [a["status"] for a in msg["attempts"]] == ["Failed", "TimedOut"]
    assert msg["attempts"][0]["at"] == "2027-01-15T08:00:00Z"
    assert "2 restarts" in msg["summary"]


def test_alarm_timestamps():
    assert parse_alarm_time("2026-11-24T12:00:00.500+0000") == pytest.approx(1795521600.5)
    assert parse_alarm_time("2026-11-24T12:00:00+0000") == 1795521600.0
    assert parse_alarm_time("2026-11-24T12:00:00Z") == 1795521600.0


NS = "tunnelnat/lab"


def test_tunnel_of_an_alarm():
    alarm = {
        "AlarmName": "a",
        "Namespace": NS,
        "MetricName": "TunnelUp",
        "Dimensions": [{"Name": "Deployment", "Value": "lab"}, {"Name": "Tunnel", "Value": "p"}],
    }
    assert tunnel_of(alarm, NS) == "p"
    with pytest.raises(InvalidAlarm):
        tunnel_of({**alarm, "MetricName": "CPUUtilization"}, NS)
    with pytest.raises(InvalidAlarm):
        tunnel_of({**alarm, "Dimensions": [{"Name": "Tunnel", "Value": "x; reboot"}]}, NS)
    # Issue 21, 3: the shared namespace anyone may publish to is not the deployment's.
    with pytest.raises(InvalidAlarm, match="not an alarm on tunnelnat/lab TunnelUp"):
        tunnel_of({**alarm, "Namespace": "tunnelnat"}, NS)
    math = {
        "AlarmName": "m",
        "Metrics": [
            {
                "MetricStat": {
                    "Metric": {
                        "Namespace": NS,
                        "MetricName": "TunnelUp",
                        "Dimensions": [{"Name": "Tunnel", "Value": "q"}],
                    }
                }
            }
        ],
    }
    assert tunnel_of(math, NS) == "q"


def test_settings_from_environ():
    env = {
        "TUNNELNAT_TABLE_NAME": "tbl",
        "TUNNELNAT_PAGE_TOPIC_ARN": "arn:aws:sns:eu-west-1:123456789012:page",
        "AWS_REGION": "eu-west-1",
        "TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS": "5",
        "TUNNELNAT_HEALER_MAX_RESTARTS_PER_HOUR": "4",
    }
    s = HealerSettings.from_environ(env)
    assert s.idempotency_table == "tbl" and s.policy.max_restarts == 4
    assert s.policy.backoff_base_seconds == 5 and s.region == "eu-west-1"
    s2 = HealerSettings.from_environ({**env, "TUNNELNAT_IDEMPOTENCY_TABLE": "idem"})
    assert s2.idempotency_table == "idem"
    assert s.metric_namespace == "tunnelnat/tunnelnat" and s.readiness_max_age_seconds == 90
    named = {**env, "TUNNELNAT_DEPLOYMENT": "prod"}
    assert HealerSettings.from_environ(named).metric_namespace == "tunnelnat/prod"
    given = {**named, "TUNNELNAT_METRIC_NAMESPACE": "tunnelnat/prod"}
    assert HealerSettings.from_environ(given).metric_namespace == "tunnelnat/prod"
    with pytest.raises(ConfigError):  # never the shared namespace
        HealerSettings.from_environ({**env, "TUNNELNAT_METRIC_NAMESPACE": "tunnelnat"})
    with pytest.raises(ConfigError, match="TUNNELNAT_PAGE_TOPIC_ARN"):
        HealerSettings.from_environ({"TUNNELNAT_TABLE_NAME": "tbl"})
    with pytest.raises(ConfigError):
        HealerSettings.from_environ({**env, "TUNNELNAT_HEALER_MAX_RESTARTS_PER_HOUR": "0"})


# -- the service with fakes ----------------------------------------------------------------------


@dataclass
class FakeAlarms:
    states: dict[str, str] = field(default_factory=dict)
    deployments: dict[str, str] = field(default_factory=dict)  # alarm -> Deployment dimension
    # The newest TunnelEstablished per (deployment, tunnel); absent: no datapoint at all.
    reports: dict[tuple[str, str], bool] = field(default_factory=lambda: {("lab", "partner"): True})
    established_reads: int = 0

    def current(self, name):
        if name not in self.states:
            return None
        return AlarmView(
            name, self.states[name], "partner", deployment=self.deployments.get(name, "lab")
        )

    def in_alarm(self, prefix):
        return sorted(n for n, s in self.states.items() if s == "ALARM" and n.startswith(prefix))

    def established(self, deployment, tunnel):
        self.established_reads += 1
        return self.reports.get((deployment, tunnel))


class MemoryStore:
    def __init__(self):
        self.items: dict[str, HealState] = {}
        self.lock = threading.Lock()

    def load(self, tunnel):
        return self.items.get(tunnel, HealState(tunnel))

    def save(self, state, *, expected_version):
        with self.lock:
            current = self.items.get(state.tunnel, HealState(state.tunnel))
            if current.version != expected_version:
                return False
            self.items[state.tunnel] = replace(state, version=expected_version + 1)
            return True


@dataclass
class FakeCommands:
    status: str = "Success"
    delay: float = 0.0
    calls: list = field(default_factory=list)
    raises: Exception | None = None

    def run(self, instance_id, document, parameters):
        self.calls.append((instance_id, document, dict(parameters)))
        if self.delay:
            time.sleep(self.delay)
        if self.raises:
            raise self.raises
        return CommandResult(
            instance_id,
            document,
            self.status,
            stdout='{"up": true}',
            stderr="RestartTunnel: tunnel partner did not come back",
        )


@dataclass
class FakePager:
    pages: list = field(default_factory=list)

    def page(self, subject, message):
        self.pages.append((subject, message))
        return f"msg-{len(self.pages)}"


class Gateways:
    def find_gateway(self, deployment):
        assert deployment == "lab"
        return "i-0gateway"


@dataclass
class Counting:
    counts: dict = field(default_factory=dict)

    def count(self, name, value=1):
        self.counts[name] = self.counts.get(name, 0) + value

    def seconds(self, name, value):
        self.counts[name] = value


ALARM = "tunnelnat-lab-TunnelUp-partner"


@pytest.fixture
def rig():
    now = [T0]
    healer = Healer(
        alarms=FakeAlarms({ALARM: "ALARM"}),
        store=MemoryStore(),
        commands=FakeCommands(),
        gateways=Gateways(),
        pager=FakePager(),
        deployment="lab",
        policy=POLICY,
        alarm_prefix="tunnelnat-lab-TunnelUp-",
        telemetry=Counting(),
        clock=lambda: now[0],
    )
    healer.now = now
    return healer


def test_alarm_restarts_the_tunnel_and_records_the_attempt(rig):
    out = rig.heal(ALARM, "2026-11-24T12:00:00.000+0000")
    assert out.action == "restart" and out.status == "Success" and out.gateway == "i-0gateway"
    assert rig.commands.calls == [
        ("i-0gateway", "RestartTunnel", {"TunnelName": "partner", "WaitSeconds": "30"})
    ]
    (a,) = rig.store.load("partner").attempts
    assert a.status == "Success" and a.at == T0 and a.alarm_time.startswith("2026-11-24")
    assert rig.telemetry.counts == {"Restarts": 1}


def test_already_ok_alarm_is_not_restarted(rig):
    rig.alarms.states[ALARM] = "OK"
    out = rig.heal(ALARM, "t")
    assert out.action == "skip-ok" and rig.commands.calls == []
    assert rig.telemetry.counts == {"SkippedAlreadyOk": 1}


def test_gone_alarm_is_invalid(rig):
    with pytest.raises(InvalidAlarm):
        rig.heal("nope", "t")


def test_failures_back_off_then_cap_then_page_once(rig):
    rig.commands.status = "Failed"
    assert rig.heal(ALARM).action == "restart"
    rig.now[0] += 30
    out = rig.heal(ALARM)
    assert out.action == "wait" and out.retry_at == T0 + 60
    rig.now[0] = T0 + 60
    assert rig.heal(ALARM).action == "restart"
    rig.now[0] = T0 + 60 + 119
    assert rig.heal(ALARM).action == "wait"
    rig.now[0] = T0 + 180
    assert rig.heal(ALARM).action == "restart"
    rig.now[0] = T0 + 500
    out = rig.heal(ALARM)
    assert out.action == "page" and out.page_id == "msg-1"
    assert len(rig.commands.calls) == 3
    subject, message = rig.pager.pages[0]
    assert "partner" in subject
    assert [a["status"] for a in message["attempts"]] == ["Failed"] * 3
    assert "did not come back" in message["attempts"][0]["detail"]
    rig.now[0] = T0 + 600
    assert rig.heal(ALARM).action == "already-paged"
    assert len(rig.pager.pages) == 1 and len(rig.commands.calls) == 3
    assert rig.telemetry.counts["RestartFailures"] == 3


def test_command_errors_are_recorded_as_failed_attempts(rig):
    rig.commands.raises = CommandError("SendCommand throttled")
    out = rig.heal(ALARM)
    assert out.action == "restart" and out.status == "Error"
    (a,) = rig.store.load("partner").attempts
    assert a.status == "Error" and "throttled" in a.detail


def test_concurrent_alarms_restart_once(rig):
    rig.commands.delay = 0.3
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(rig.heal(ALARM))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rig.commands.calls) == 1
    assert sorted(o.action for o in outs) == ["restart"] + ["wait"] * 4


def test_sweep_retries_alarms_still_in_alarm(rig):
    rig.alarms.states["tunnelnat-lab-TunnelUp-backup"] = "OK"
    rig.commands.status = "Failed"
    assert [o.action for o in rig.sweep()] == ["restart"]
    rig.now[0] += 61
    assert [o.action for o in rig.sweep()] == ["restart"]
    assert len(rig.commands.calls) == 2


def test_recovery_reports_time_to_recovery(rig):
    out = rig.recovered(ALARM, "2026-11-24T12:01:30.000+0000", "2026-11-24T12:00:00.000+0000")
    assert out.action == "recovered" and out.seconds == 90.0
    assert rig.telemetry.counts["TimeToRecovery"] == 90.0
    assert rig.store.load("partner").recovered_at == pytest.approx(1795521690.0)


def test_failed_page_is_retried_later(rig):
    def boom(subject, message):
        raise RuntimeError("sns down")

    rig.store.items["partner"] = HealState(
        "partner", attempts=(attempt(T0 - 300), attempt(T0 - 200), attempt(T0 - 100)), version=3
    )
    rig.pager.page = boom
    with pytest.raises(RuntimeError):
        rig.heal(ALARM)
    assert rig.store.load("partner").paged_at is None
    rig.pager.page = FakePager().page
    assert rig.heal(ALARM).action == "page"


def test_default_alarm_prefix_is_this_deployments_tunnel_alarms_only():
    from tunnelnat.healer import HealerSettings

    env = {
        "TUNNELNAT_TABLE_NAME": "prod",
        "TUNNELNAT_PAGE_TOPIC_ARN": "arn:aws:sns:eu-west-1:123456789012:pages",
        "TUNNELNAT_DEPLOYMENT": "prod",
    }
    assert HealerSettings.from_environ(env).alarm_prefix == "tunnelnat-prod-TunnelUp-"
    explicit = {**env, "TUNNELNAT_HEALER_ALARM_PREFIX": "custom-"}
    assert HealerSettings.from_environ(explicit).alarm_prefix == "custom-"


# -- no healing before the first report: TunnelEstablished ---------------------------------------


def test_a_tunnel_never_up_since_configured_is_waiting_not_restarted_not_paged():
    # At the cap, even: a tunnel that was never up is not the healer's to restart or page about.
    three = HealState("partner", attempts=(attempt(T0), attempt(T0 + 60), attempt(T0 + 180)))
    for state in (HealState("partner"), three):
        d = decide("ALARM", state, T0 + 500, POLICY, established=False)
        assert d.action is Action.SKIP_WAITING
        assert "waiting for the partner" in d.reason and "PSK" in d.reason
    # No datapoint at all (agent not installed yet, gateway silent) is its own answer.
    d = decide("ALARM", HealState("partner"), T0, POLICY, established=None)
    assert d.action is Action.SKIP_NO_REPORT and "no TunnelEstablished datapoint" in d.reason
    # OK stays OK whatever the report.
    assert decide("OK", HealState("partner"), T0, POLICY, established=None).action is Action.SKIP_OK


def test_first_deploy_alarm_neither_restarts_nor_uses_the_cap_nor_pages(rig):
    rig.alarms.reports[("lab", "partner")] = False  # the agent reports: never up since configured
    for minute in range(10):  # the alarm stays in ALARM; the sweep comes every minute
        rig.now[0] = T0 + 60 * minute
        (out,) = rig.sweep()
        assert out.action == "waiting-for-partner" and "PSK" in out.reason
    assert rig.commands.calls == [] and rig.pager.pages == []
    assert rig.store.load("partner").attempts == ()
    assert rig.telemetry.counts == {"SkippedWaitingForPartner": 10}
    # The partner is ready and the tunnel came up once: from then on a failure is healed.
    rig.alarms.reports[("lab", "partner")] = True
    assert rig.heal(ALARM).action == "restart"


def test_no_report_at_all_is_not_restarted(rig):
    rig.alarms.reports.clear()
    out = rig.heal(ALARM)
    assert out.action == "no-report" and rig.commands.calls == []
    assert rig.telemetry.counts == {"SkippedNoReport": 1}


def test_established_is_read_only_for_an_alarm_in_alarm(rig):
    rig.alarms.states[ALARM] = "OK"
    rig.heal(ALARM)
    assert rig.alarms.established_reads == 0
    rig.alarms.states[ALARM] = "ALARM"
    rig.heal(ALARM)
    assert rig.alarms.established_reads == 1


@dataclass
class MetricDataClient:
    points: list  # (datetime, value)
    calls: list = field(default_factory=list)

    def get_metric_data(self, **kwargs):
        self.calls.append(kwargs)
        return {
            "MetricDataResults": [
                {
                    "Id": "established",
                    "Timestamps": [t for t, _ in self.points],
                    "Values": [v for _, v in self.points],
                }
            ]
        }


def test_latest_established_reads_the_newest_datapoint_of_our_series():
    from datetime import UTC, datetime

    def at(seconds):
        return datetime.fromtimestamp(T0 - seconds, UTC)

    client = MetricDataClient([(at(120), 1.0), (at(60), 0.0), (at(600), 1.0)])
    assert latest_established(client, "lab", "partner", now=T0, lookback=900) is False
    (call,) = client.calls
    (query,) = call["MetricDataQueries"]
    assert query["MetricStat"]["Metric"] == {
        "Namespace": "tunnelnat/lab",  # the deployment's own (issue 21, 3)
        "MetricName": "TunnelEstablished",
        "Dimensions": [
            {"Name": "Deployment", "Value": "lab"},
            {"Name": "Tunnel", "Value": "partner"},
        ],
    }
    assert (T0 - call["StartTime"].timestamp()) == 900
    assert latest_established(MetricDataClient([(at(5), 1.0)]), "lab", "p", now=T0, lookback=900)
    assert latest_established(MetricDataClient([]), "lab", "p", now=T0, lookback=900) is None


# -- issue 14, finding 4: only this deployment's TunnelUp alarms ---------------------------------


def test_alarm_of_another_deployment_is_never_acted_on(rig):
    # Named with our prefix, but its metric is another deployment's TunnelUp.
    rig.alarms.deployments[ALARM] = "prod"
    rig.alarms.reports[("prod", "partner")] = True
    with pytest.raises(InvalidAlarm, match="deployment 'prod', not 'lab'"):
        rig.heal(ALARM, "2026-11-24T12:00:00.000+0000")
    assert rig.commands.calls == [] and rig.store.load("partner").attempts == ()
    (out,) = rig.sweep()
    assert out.action == "invalid" and rig.commands.calls == []


def test_alarm_outside_our_prefix_is_never_acted_on(rig):
    for name in ("tunnelnat-prod-TunnelUp-partner", "someone-elses-alarm"):
        rig.alarms.states[name] = "ALARM"  # its metric even has our Deployment dimension
        with pytest.raises(InvalidAlarm, match="not one of this deployment's TunnelUp alarms"):
            rig.heal(name, "2026-11-24T12:00:00.000+0000")
        with pytest.raises(InvalidAlarm):
            rig.recovered(name, "2026-11-24T12:00:00.000+0000", None)
    assert rig.commands.calls == []


def test_malformed_recovery_timestamp_is_an_invalid_alarm_not_a_crash(rig):
    for ok_time, since in (("yesterday-ish", None), ("2026-11-24T12:01:30.000+0000", "garbage")):
        with pytest.raises(InvalidAlarm, match="malformed alarm state timestamp"):
            rig.recovered(ALARM, ok_time, since)
    assert rig.store.load("partner").version == 0  # nothing written


def test_tunnel_up_dimensions():
    alarm = {
        "AlarmName": "a",
        "Namespace": NS,
        "MetricName": "TunnelUp",
        "Dimensions": [{"Name": "Deployment", "Value": "lab"}, {"Name": "Tunnel", "Value": "p"}],
    }
    assert tunnel_up_dimensions(alarm, NS) == {"Deployment": "lab", "Tunnel": "p"}
    for namespace in ("AWS/EC2", "tunnelnat", "tunnelnat/prod"):
        with pytest.raises(InvalidAlarm):
            tunnel_up_dimensions({**alarm, "Namespace": namespace}, NS)
    with pytest.raises(InvalidAlarm):
        tunnel_of({**alarm, "Dimensions": [{"Name": "Deployment", "Value": "lab"}]}, NS)


# -- issue 21, finding 3: the gateway's own report against a forged TunnelUp=0 ------------------


@dataclass
class Reports:
    items: dict = field(default_factory=dict)
    reads: list = field(default_factory=list)

    def report(self, instance_id):
        self.reads.append(instance_id)
        return self.items.get(instance_id)


def test_forged_tunnel_down_while_the_gateway_reports_sas_installed_restarts_nothing(rig):
    """Someone publishes TunnelUp=0 (the alarm fires, the tunnel was established before), but
    the gateway's own report, 20 s old, says its CHILD_SA is installed: no RestartTunnel."""
    rig.reports = Reports({"i-0gateway": GatewayReport("i-0gateway", 1, T0 - 20, "active")})
    out = rig.heal(ALARM, "2026-11-24T12:00:00.000+0000")
    assert out.action == "gateway-reports-up" and out.gateway == "i-0gateway"
    assert "1 CHILD_SA(s) installed" in out.reason and "gateway/i-0gateway" in out.reason
    assert rig.commands.calls == [] and rig.pager.pages == []
    assert rig.store.load("partner").attempts == ()  # nothing claimed: no cap used
    assert rig.telemetry.counts == {"SkippedGatewayReportsUp": 1}
    # The sweep a minute later: the same answer, still nothing sent.
    rig.now[0] += 60
    rig.reports.items["i-0gateway"] = GatewayReport("i-0gateway", 1, T0 + 50, "active")
    assert [o.action for o in rig.sweep()] == ["gateway-reports-up"]
    assert rig.commands.calls == []


@pytest.mark.parametrize(
    "report",
    [
        None,  # a single gateway: no pair agent, no report
        GatewayReport("i-0gateway", 1, T0 - 200, "active"),  # stale: the agent stopped writing
        GatewayReport("i-0gateway", 0, T0 - 5, "active"),  # fresh, and nothing installed
        GatewayReport("i-0gateway", None, T0 - 5, "active"),  # written by an older agent
    ],
)
def test_a_missing_stale_or_empty_report_lets_the_restart_go_ahead(rig, report):
    rig.reports = Reports({"i-0gateway": report} if report else {})
    out = rig.heal(ALARM)
    assert out.action == "restart" and rig.reports.reads == ["i-0gateway"]
    assert [c[0] for c in rig.commands.calls] == ["i-0gateway"]


def test_restart_tunnel_that_found_the_tunnel_healthy_is_not_counted_against_the_cap(rig):
    rig.commands = FakeCommands()
    healthy = '{"tunnel": "partner", "up": true, "skipped": "healthy", "installed": 1}'
    rig.commands.run = lambda i, d, p: (
        rig.commands.calls.append((i, d, p)) or CommandResult(i, d, "Success", stdout=healthy)
    )
    for step in range(6):  # far past the cap of 3, each after its back-off
        out = rig.heal(ALARM)
        assert out.action == "restart" and "skipped: healthy" in out.reason, step
        rig.now[0] += 400
    assert len(rig.commands.calls) == 6 and rig.pager.pages == []
    assert all(a.skipped for a in rig.store.load("partner").attempts)
    assert rig.telemetry.counts == {"RestartSkippedHealthy": 6}
