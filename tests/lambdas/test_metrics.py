"""Issue 7's metrics and log context, read back from what Powertools really prints: EMF JSON
documents on stdout (metrics) and the Logger's JSON lines (logs)."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from tests.lambdas.conftest import REGION
from tests.lambdas.events import Context, sqs_batch, state_change
from tunnelnat.adapters.queue import EventQueue
from tunnelnat.controller import FAILURE_REASONS
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}
ARN = f"arn:aws:sqs:{REGION}:123456789012:tunnelnat-events"


def emf(stdout: str) -> list[dict]:
    """Every metric datapoint printed: name, unit, value, dimensions, namespace."""
    points = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        doc = json.loads(line)
        meta = doc.get("_aws")
        if not meta:
            continue
        for directive in meta["CloudWatchMetrics"]:
            dims = {d: doc[d] for group in directive["Dimensions"] for d in group}
            for metric in directive["Metrics"]:
                values = doc[metric["Name"]]
                for value in values if isinstance(values, list) else [values]:
                    points.append({
                        "name": metric["Name"], "unit": metric["Unit"], "value": value,
                        "dims": dims, "namespace": directive["Namespace"],
                    })  # fmt: skip
    return points


def named(points: list[dict], name: str) -> list[dict]:
    return [p for p in points if p["name"] == name]


def failures(points: list[dict], deployment: str = "test") -> list[str]:
    found = named(points, "Failures")
    # What the dashboard's SEARCH('{tunnelnat,Deployment,Reason,service} ...') finds: this
    # deployment's failures only (issue 21, finding 4).
    assert all(set(p["dims"]) == {"Deployment", "Reason", "service"} for p in found), found
    assert all(p["dims"]["Deployment"] == deployment for p in found), found
    assert all(p["unit"] == "Count" and p["namespace"] == "tunnelnat" for p in found), found
    return sorted(p["dims"]["Reason"] for p in found)


@pytest.fixture
def logs():
    """The handler's log lines, formatted by Powertools' own formatter."""
    buffer = io.StringIO()
    extra = logging.StreamHandler(buffer)
    extra.setFormatter(handler_module.logger.registered_formatter)
    handler_module.logger._logger.addHandler(extra)  # noqa: SLF001 - a second sink, for the test
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines() if line]
    handler_module.logger._logger.removeHandler(extra)  # noqa: SLF001


def test_enrolment_publishes_latency_sync_duration_and_free_pool(world, capsys):
    web1 = world.launch("10.10.1.21", tags=TAG)
    event = state_change(web1, "running")
    event["time"] = (datetime.now(UTC) - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    handler(event, Context())
    points = emf(capsys.readouterr().out)
    assert {p["namespace"] for p in points} == {handler_module.metrics.namespace} == {"tunnelnat"}
    # Issue 21, finding 4: every datapoint names its deployment (two deployments' failures are
    # two series, each paging its own on-call).
    assert all(p["dims"] == {"service": "tunnelnat", "Deployment": "test"} for p in points), points
    [enrolments] = named(points, "Enrolments")
    assert enrolments["unit"] == "Count" and enrolments["value"] == 1
    [latency] = named(points, "EnrolmentLatency")
    assert latency["unit"] == "Seconds" and latency["value"] >= 30
    [sync] = named(points, "GatewaySyncDuration")
    assert sync["unit"] == "Milliseconds" and sync["value"] >= 0
    assert [p["value"] for p in named(points, "GatewaySyncs")] == [1]
    [free] = named(points, "PoolFreeAddresses")
    assert free["unit"] == "Count" and free["value"] == 2  # 3 in the pool, 1 claimed
    assert failures(points) == []

    # The same event again changes nothing: no enrolment, no latency, no sync.
    handler(event, Context())
    again = emf(capsys.readouterr().out)
    assert not named(again, "Enrolments") and not named(again, "EnrolmentLatency")
    assert not named(again, "GatewaySyncDuration")


def test_unenrolment_counts_and_reports_the_pool(world, capsys):
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(state_change(web1, "running"), Context())
    capsys.readouterr()
    world.ec2.terminate_instances(InstanceIds=[web1])
    handler(state_change(web1, "terminated"), Context())
    points = emf(capsys.readouterr().out)
    assert [p["value"] for p in named(points, "Unenrolments")] == [1]
    assert [p["value"] for p in named(points, "PoolFreeAddresses")] == [3]


def test_failures_carry_their_reason_as_a_dimension(world, capsys):
    ready_later = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready.add(ready_later)
    handler(sqs_batch(state_change(ready_later, "running")), Context())
    assert failures(emf(capsys.readouterr().out)) == ["agent-not-ready"]

    world.fleet.not_ready.clear()
    world.fleet.failing.add("AddHostRoute")
    handler(sqs_batch(state_change(ready_later, "running")), Context())
    assert failures(emf(capsys.readouterr().out)) == ["command-failed"]

    world.fleet.failing = {"SyncNatTable"}
    third = world.launch("10.10.1.23", tags=TAG)
    handler(sqs_batch(state_change(ready_later, "running"), state_change(third, "running")),
            Context())  # fmt: skip
    # One failed sync is one failure, however many instances wait for it.
    assert failures(emf(capsys.readouterr().out)) == ["gateway-sync"]


def test_unsupported_subnet_and_pool_exhausted(world, capsys):
    reply = world.ec2.run_instances(
        ImageId="ami-12345678", MinCount=1, MaxCount=1, SubnetId=world.other_subnet_id,
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "tunnelnat", "Value": "enabled"}]}],
    )  # fmt: skip
    outside = reply["Instances"][0]["InstanceId"]
    handler(state_change(outside, "running"), Context())
    assert failures(emf(capsys.readouterr().out)) == ["unsupported-subnet"]

    ids = [world.launch(f"10.10.1.{30 + k}", tags=TAG) for k in range(4)]  # the pool holds 3
    handler(sqs_batch(*[state_change(i, "running") for i in ids]), Context())
    points = emf(capsys.readouterr().out)
    assert failures(points) == ["pool-exhausted"]
    assert [p["value"] for p in named(points, "PoolFreeAddresses")] == [0]


def test_dead_lettered_is_a_failure_reason(world, capsys):
    sqs = boto3.client("sqs", region_name=REGION)
    dlq = sqs.create_queue(QueueName="tunnelnat-events-dlq")["QueueUrl"]
    sqs.create_queue(QueueName="tunnelnat-events")
    handler_module.use_queue(EventQueue(sqs, dead_letter_url=dlq))
    try:
        web1 = world.launch("10.10.1.21", tags=TAG)
        world.fleet.failing.add("AddHostRoute")
        batch = sqs_batch(state_change(web1, "running"))
        for record in batch["Records"]:
            record["eventSourceARN"] = ARN
            record["attributes"]["ApproximateReceiveCount"] = str(handler_module.MAX_ATTEMPTS)
        assert handler(batch, Context()) == {"batchItemFailures": []}
        assert failures(emf(capsys.readouterr().out)) == ["command-failed", "dead-lettered"]
    finally:
        handler_module.use_queue(None)


def test_every_reason_is_one_of_the_documented_names():
    assert set(FAILURE_REASONS) == {
        "agent-not-ready", "command-failed", "store-conflict", "pool-exhausted",
        "unsupported-subnet", "gateway-sync", "dead-lettered", "conflict", "invalid-mapping",
        "gateway-ambiguous", "route-conflict", "not-allowed", "route-table-not-opted-in",
    }  # fmt: skip


def test_store_conflict_is_a_failure_reason(world, capsys, monkeypatch):
    from tunnelnat.adapters.store import EnrolmentStore, StoreConflict

    def always(self, *args, **kwargs):
        raise StoreConflict("a rival bumped the generation")

    monkeypatch.setattr(EnrolmentStore, "write_mappings", always)
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(sqs_batch(state_change(web1, "running")), Context())
    points = emf(capsys.readouterr().out)
    assert failures(points) == ["store-conflict"]
    assert named(points, "StoreConflicts")


def test_every_log_line_names_the_instance_and_the_event(world, logs, capsys):
    web1 = world.launch("10.10.1.21", tags=TAG)
    world.fleet.not_ready_for[web1] = 1
    first, second = state_change(web1, "running"), state_change(web1, "running")
    handler(sqs_batch(first), Context())  # not ready: "will retry"
    handler(first, Context())  # direct invocation: "reconciled"
    web2 = world.launch("10.10.1.22", tags=TAG)
    handler(sqs_batch(second, state_change(web2, "running")), Context())
    capsys.readouterr()
    lines = logs()
    assert len(lines) >= 3
    for line in lines:
        assert line.get("instance_id"), line
        assert line.get("correlation_id"), line
    retry = next(line for line in lines if line["message"] == "will retry")
    assert retry["instance_id"] == web1 and retry["correlation_id"] == first["id"]
    reconciled = [line for line in lines if line["message"] == "reconciled"]
    assert {(line["instance_id"], line["correlation_id"]) for line in reconciled} >= {
        (web1, first["id"]),
        (web1, second["id"]),
    }
