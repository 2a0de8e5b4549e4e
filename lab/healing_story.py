"""Issue 5's story in the lab: a tunnel that heals itself, timed from kill to traffic restored.

    tunnel up, web-1 enrolled, its requests reach A as S
    kill -9 the gateway's charon
    the health agent (installed by InstallHealthAgent in tn-gw's /etc/tunnelnat, run there with
      the moto environment as its systemd timer would, accelerated to every second) publishes
      TunnelUp 0 to moto; TunnelEstablished stays 1 (the tunnel was up since configured)
    ``AlarmEvaluator`` (CloudWatch's evaluation, which moto does not do, accelerated: N of M
      periods, missing data = breaching) sets the alarm to ALARM with set_alarm_state and
      delivers the EventBridge "CloudWatch Alarm State Change" event to the real healer handler
    the healer re-reads the alarm, runs RestartTunnel on the gateway through LabCommands
    web-1's requests reach A as S again; the alarm returns to OK; the healer records recovery

``run_healing_story(lab, controller)`` returns a ``HealingReport`` for the demo and tests/lab.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from lab import topology as topo
from lab.commands import LabCommands
from lab.constants import GATEWAY_GROUP
from lab.controller import QUIET, FakeContext, LabController
from lab.ssm_runner import default_env

ALARM = f"tunnelnat-{topo.DEPLOYMENT}-TunnelUp-{topo.TUNNEL}"
# What InstallHealthAgent's unit runs (the installed gateway software's ``health`` verb), read
# from the unit it installed in the gateway's /etc (its private overlay); the lab's state files
# live there too, removed with the lab's machine.
HEALTH_UNIT = "/etc/systemd/system/tunnelnat-health.service"
AGENT = ("python3", "/etc/tunnelnat/lib/tunnelnat-gateway.pyz", "health", "once")
AGENT_STATE = "/etc/tunnelnat/lab-health-counters.json"
AGENT_ESTABLISHED = "/etc/tunnelnat/lab-health-established.json"
ACCOUNT = "123456789012"


# -- the agent, as the timer runs it -------------------------------------------------------------


def agent_program(ns: str = "tn-gw") -> list[str]:
    """The health agent's command as the installed unit runs it, up to its ``once`` (the unit's
    own options are the timer's; the lab gives its own): AGENT when no unit is installed."""
    proc = topo.sh(topo.machine_argv(ns, ["cat", HEALTH_UNIT]), check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("ExecStart="):
            argv = shlex.split(line.removeprefix("ExecStart=").lstrip("-@"))
            if "once" in argv:
                return argv[: argv.index("once") + 1]
    return list(AGENT)


def agent_argv(gateway_id: str, *, probe: bool = True, ns: str = "tn-gw") -> list[str]:
    argv = [
        *agent_program(ns),
        "--tunnels",
        topo.TUNNEL,
        "--gateway-id",
        gateway_id,
        "--deployment",
        topo.DEPLOYMENT,
        "--region",
        topo.REGION,
        "--high-resolution",
        "--state-file",
        AGENT_STATE,
        "--established-file",
        AGENT_ESTABLISHED,
    ]
    if probe:
        # The shared address is on lo and inside the tunnel's selectors; no instance uses it in
        # this story, and a bare TCP connect leaves no line in the app server's log.
        argv += ["--probe", f"{topo.APP}:{topo.APP_PORT}", "--probe-source", topo.SHARED]
    return argv


def run_agent(lab: topo.Lab, *, probe: bool = True) -> dict[str, Any]:
    """One run of the agent in the gateway's namespace: what it printed (published or not)."""
    env = {**default_env(), **lab.gateway_env()}
    proc = topo.sh(
        [
            "env",
            "-i",
            *(f"{k}={v}" for k, v in env.items()),
            *topo.machine_argv("tn-gw", agent_argv(lab.aws.gateway_id, probe=probe)),
        ],
        check=False,
        timeout=30,
    )
    try:
        line = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        line = {"published": False, "error": proc.stderr.strip()[-300:]}
    line["exit"] = proc.returncode
    return line


@dataclass
class AgentLoop:
    """The systemd timer, accelerated: the agent every ``interval`` seconds in the background."""

    lab: topo.Lab
    interval: float = 1.0
    runs: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> AgentLoop:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tn-health-agent")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.runs.append((time.time(), run_agent(self.lab)))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def first_down_after(self, t: float) -> float | None:
        for at, line in list(self.runs):
            if at >= t and line.get("published") and not _up(line):
                return at
        return None


def _up(line: dict[str, Any]) -> bool:
    return all(t.get("up") for t in line.get("tunnels", [])) and bool(line.get("tunnels"))


# -- CloudWatch's alarm evaluation, accelerated ---------------------------------------------------


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+0000"


# The deployment's own namespace: the health agent publishes there, and the healer takes only
# alarms on it (issue 21).
METRIC_NAMESPACE = f"tunnelnat/{topo.DEPLOYMENT}"


@dataclass
class AlarmEvaluator:
    """Evaluates the TunnelUp alarm as CloudWatch would (Minimum < 1 in ``datapoints`` of the
    last ``periods`` complete periods; a period without data is breaching), sets its state in
    moto and returns the EventBridge event for a state change."""

    cloudwatch: Any
    alarm: str = ALARM
    tunnel: str = topo.TUNNEL  # the alarm's Tunnel dimension (the three-partner lab: per tunnel)
    # Seconds (CloudWatch: 60, or 10 with high-resolution metrics). At least twice the agent's
    # interval, so a slow agent run never leaves a period empty (missing data is breaching).
    period: int = 3
    periods: int = 3  # M
    datapoints: int = 2  # N
    history: list[dict[str, Any]] = field(default_factory=list)

    def create(self) -> None:
        self.cloudwatch.put_metric_alarm(
            AlarmName=self.alarm,
            AlarmDescription="tunnelnat: tunnel partner is down (lab, accelerated)",
            Namespace=METRIC_NAMESPACE,
            MetricName="TunnelUp",
            Dimensions=[
                {"Name": "Deployment", "Value": topo.DEPLOYMENT},
                {"Name": "Tunnel", "Value": self.tunnel},
            ],
            Statistic="Minimum",
            Period=10,  # the shortest CloudWatch allows for high resolution; we run faster
            EvaluationPeriods=self.periods,
            DatapointsToAlarm=self.datapoints,
            Threshold=1,
            ComparisonOperator="LessThanThreshold",
            TreatMissingData="breaching",
        )

    def breaching(self, now: datetime) -> list[bool]:
        """Breach per complete period, oldest first."""
        end = now.replace(microsecond=0) - timedelta(seconds=now.second % self.period)
        start = end - timedelta(seconds=self.period * self.periods)
        reply = self.cloudwatch.get_metric_data(
            MetricDataQueries=[
                {
                    "Id": "up",
                    "MetricStat": {
                        "Metric": {
                            "Namespace": METRIC_NAMESPACE,
                            "MetricName": "TunnelUp",
                            "Dimensions": [
                                {"Name": "Deployment", "Value": topo.DEPLOYMENT},
                                {"Name": "Tunnel", "Value": self.tunnel},
                            ],
                        },
                        "Period": 1,
                        "Stat": "Minimum",
                    },
                }
            ],
            StartTime=start,
            EndTime=end,
        )
        points = reply["MetricDataResults"][0]
        buckets: list[list[float]] = [[] for _ in range(self.periods)]
        for ts, value in zip(points["Timestamps"], points["Values"], strict=True):
            index = int((ts - start).total_seconds() // self.period)
            if 0 <= index < self.periods:
                buckets[index].append(value)
        return [not b or min(b) < 1 for b in buckets]

    def evaluate(self, now: datetime | None = None) -> dict[str, Any] | None:
        now = now or datetime.now(UTC)
        breaches = self.breaching(now)
        state = "ALARM" if sum(breaches) >= self.datapoints else "OK"
        current = self.cloudwatch.describe_alarms(AlarmNames=[self.alarm])["MetricAlarms"][0]
        previous, since = current["StateValue"], current["StateUpdatedTimestamp"]
        if state == previous:
            return None
        reason = f"{sum(breaches)} of the last {self.periods} datapoints breaching (lab)"
        self.cloudwatch.set_alarm_state(AlarmName=self.alarm, StateValue=state, StateReason=reason)
        updated = self.cloudwatch.describe_alarms(AlarmNames=[self.alarm])["MetricAlarms"][0]
        event = alarm_state_change_event(
            self.alarm, state, _stamp(updated["StateUpdatedTimestamp"]), previous, _stamp(since)
        )
        self.history.append({"at": time.time(), "state": state, "breaches": breaches})
        return event


def alarm_state_change_event(
    alarm: str, state: str, at: str, previous: str, since: str
) -> dict[str, Any]:
    """What EventBridge delivers for a CloudWatch alarm state change."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "CloudWatch Alarm State Change",
        "source": "aws.cloudwatch",
        "account": ACCOUNT,
        "time": at[:19] + "Z",
        "region": topo.REGION,
        "resources": [f"arn:aws:cloudwatch:{topo.REGION}:{ACCOUNT}:alarm:{alarm}"],
        "detail": {
            "alarmName": alarm,
            "state": {"value": state, "reason": "lab evaluator", "timestamp": at},
            "previousState": {"value": previous, "reason": "", "timestamp": since},
            "configuration": {"description": "tunnelnat TunnelUp (lab)"},
        },
    }


# -- the healer, as Lambda would run it -----------------------------------------------------------


@dataclass
class HealerContext(FakeContext):
    """A Lambda context with the remaining time, which Powertools Idempotency reads."""

    function_name: str = "tunnelnat-healer-lab"
    timeout_ms: int = 300_000

    def get_remaining_time_in_millis(self) -> int:
        return self.timeout_ms


@contextmanager
def healer_environment(lab: topo.Lab, topic_arn: str) -> Iterator[dict[str, str]]:
    environ = {
        **QUIET,
        **lab.aws_env(),
        "AWS_REGION": topo.REGION,
        "TUNNELNAT_TABLE_NAME": topo.TABLE,
        "TUNNELNAT_DEPLOYMENT": topo.DEPLOYMENT,
        "TUNNELNAT_PAGE_TOPIC_ARN": topic_arn,
        "TUNNELNAT_HEALER_ALARM_PREFIX": f"tunnelnat-{topo.DEPLOYMENT}-",
        "TUNNELNAT_HEALER_BACKOFF_BASE_SECONDS": "5",
        "TUNNELNAT_HEALER_RESTART_WAIT_SECONDS": "15",
        # The healer sends RestartTunnel only to G's ENI holder in the gateway group (issue 21).
        "TUNNELNAT_GATEWAY_ENI_ID": lab.aws.eni_id,
        "TUNNELNAT_GATEWAY_GROUP": GATEWAY_GROUP,
    }
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    try:
        yield environ
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class HealingReport:
    ok: bool
    kill_to_restored: float | None
    kill_to_agent_zero: float | None
    kill_to_alarm: float | None
    restart_seconds: float | None
    healer_outcome: dict[str, Any]
    recovery_outcome: dict[str, Any] | None
    peers_after: list[str]
    public: str | None
    timeline: list[tuple[float, str]]
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    agent_runs: int = 0

    def figure(self) -> str:
        def s(v: float | None) -> str:
            return "never" if v is None else f"{v:.2f}s"

        return (
            f"kill -9 charon -> agent published 0 after {s(self.kill_to_agent_zero)} -> alarm "
            f"ALARM after {s(self.kill_to_alarm)} -> healer {self.healer_outcome.get('action')} "
            f"RestartTunnel {self.healer_outcome.get('status', '-')} in "
            f"{s(self.restart_seconds)} -> web-1 reaches A as {self.public} again: "
            f"kill to traffic restored {s(self.kill_to_restored)}"
        )


def run_healing_story(
    lab: topo.Lab,
    controller: LabController,
    *,
    public: str,
    instance: str = "web-1",
    timeout: float = 60.0,
) -> HealingReport:
    """Needs the tunnel up and ``instance`` enrolled with address ``public`` (lab.story's
    first steps). Kills the gateway's charon and lets the health chain heal it."""
    cloudwatch = lab.aws.client("cloudwatch")
    sns = lab.aws.client("sns")
    topic = sns.create_topic(Name="tunnelnat-lab-page")["TopicArn"]
    evaluator = AlarmEvaluator(cloudwatch)
    evaluator.create()
    commands: LabCommands = lab.commands
    url = f"http://{topo.APP}:{topo.APP_PORT}/healing-{instance}"
    ns = lab.instance(instance).ns
    timeline: list[tuple[float, str]] = []

    def mark(what: str) -> None:
        timeline.append((time.monotonic(), what))

    with healer_environment(lab, topic), AgentLoop(lab) as agent:
        from tunnelnat.handlers import healer as module

        healer, persistence = module.build_healer(commands=commands)
        module.use_healer(healer, persistence)
        try:

            def deliver(event: dict[str, Any]) -> dict[str, Any]:
                mark(f"event {event['detail']['state']['value']} delivered to the healer")
                return module.handler(event, HealerContext(aws_request_id=str(uuid.uuid4())))

            # Steady state first: M periods of the agent's data (an alarm evaluated before any
            # datapoint exists would see missing = breaching), then the alarm settles in OK.
            time.sleep(evaluator.period * (evaluator.periods + 1))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                event = evaluator.evaluate()
                if event is not None:
                    deliver(event)
                state = cloudwatch.describe_alarms(AlarmNames=[ALARM])["MetricAlarms"][0]
                if state["StateValue"] == "OK":
                    break
                time.sleep(0.5)
            answered, body = lab.http(ns, url)
            if not answered:
                raise topo.LabError(f"{instance} does not reach A before the kill: {body}")

            before = len(lab.app_peers())
            kill_wall = time.time()
            killed = time.monotonic()
            lab.kill_gateway_charon()
            mark("gateway charon killed (-9)")
            healer_outcome: dict[str, Any] = {}
            recovery: dict[str, Any] | None = None
            alarm_at = restored_at = None
            restart_seconds = None
            while time.monotonic() - killed < timeout:
                event = evaluator.evaluate()
                if event is not None:
                    if event["detail"]["state"]["value"] == "ALARM":
                        alarm_at = alarm_at or time.monotonic()
                    out = deliver(event)
                    if event["detail"]["state"]["value"] == "ALARM":
                        healer_outcome = out
                        restart_seconds = out.get("seconds")
                        mark(f"healer: {out.get('action')} {out.get('status', '')}")
                    else:
                        recovery = out
                if alarm_at is not None and restored_at is None:
                    ok, _ = lab.http(ns, url, timeout=1)
                    if ok and public in lab.app_peers()[before:]:
                        restored_at = time.monotonic()
                        mark(f"{instance} reaches A as {public} again")
                if restored_at is not None and recovery is not None:
                    break
                time.sleep(0.2)
            down_at = agent.first_down_after(kill_wall)
        finally:
            module.use_healer(None)
    peers = lab.app_peers()[before:]
    return HealingReport(
        ok=restored_at is not None and healer_outcome.get("action") == "restart",
        kill_to_restored=None if restored_at is None else restored_at - killed,
        kill_to_agent_zero=None if down_at is None else down_at - kill_wall,
        kill_to_alarm=None if alarm_at is None else alarm_at - killed,
        restart_seconds=restart_seconds,
        healer_outcome=healer_outcome,
        recovery_outcome=recovery,
        peers_after=peers,
        public=public,
        timeline=[(t - killed, what) for t, what in timeline],
        evaluations=evaluator.history,
        agent_runs=len(agent.runs),
    )
