from __future__ import annotations

import json
import re

import jsonschema

from tests.cli.conftest import TABLE
from tunnelnat.events import parse_request
from tunnelnat_cli.schemas import RECONCILE

TAG = {"tunnelnat": "enabled"}


def test_reconcile_sends_the_request_event_to_the_queue(dep):
    result = dep.run("reconcile", react=False)
    assert result.code == 0, result.err
    assert "reconcile requested for all instances" in result.out
    [message] = dep.sqs.receive_message(QueueUrl=dep.queue_url)["Messages"]
    body = json.loads(message["Body"])
    assert body["source"] == "tunnelnat.cli"
    assert body["detail-type"] == "tunnelnat Reconcile Request"
    assert body["detail"] == {"instance-ids": []}
    assert body["region"] == "us-east-1" and body["account"] == "123456789012"
    request = parse_request(message["Body"])  # the controller accepts it as it is
    assert request.full and request.instance_ids == ()


def test_reconcile_named_instances_with_an_explicit_queue_url(dep):
    a, b = dep.launch("10.10.1.21"), dep.launch("10.10.1.22")
    result = dep.run("reconcile", b, a, "--queue-url", dep.queue_url, "--json", react=False)
    assert result.code == 0, result.err
    doc = result.json()
    jsonschema.validate(doc, RECONCILE)
    assert doc["instance_ids"] == sorted([a, b]) and doc["waited"] is False
    assert doc["completed"] is None and doc["queue_url"] == dep.queue_url
    [message] = dep.sqs.receive_message(QueueUrl=dep.queue_url)["Messages"]
    assert json.loads(message["Body"])["detail"]["instance-ids"] == sorted([a, b])
    assert json.loads(message["Body"])["id"] == doc["request_id"]


def test_full_reconcile_wait_repairs_drift_and_reports_it(dep):
    """Tags changed while the controller missed the events: a full reconcile finds them."""
    web1 = dep.launch("10.10.1.21", name="web-1")
    dep.run("enroll", web1, "--wait")
    missed = dep.launch("10.10.1.22", name="web-2", tags=TAG)  # its event was lost
    dep.ec2.delete_tags(Resources=[web1], Tags=[{"Key": "tunnelnat"}])  # so was this one

    result = dep.run("reconcile", "--wait")
    assert result.code == 0, result.err
    lines = {line.split()[0]: line for line in result.out.splitlines() if line.startswith("i-")}
    assert "added" in lines[missed] and "- -> enrolled" in lines[missed]
    assert "- -> 203.0.113.1" in lines[missed]
    assert "removed" in lines[web1] and "enrolled -> -" in lines[web1]
    # One generation bump per controller batch (both changes here are one batch), not per
    # mapping: what matters is that the gateway applied what is desired.
    moved = re.search(r"generation desired 1 -> (\d+), applied 1 -> (\d+)", result.out)
    assert moved and int(moved[1]) > 1 and moved[1] == moved[2], result.out
    assert dep.items("mapping").keys() == {missed}


def test_reconcile_wait_json_follows_its_schema(dep):
    missed = dep.launch("10.10.1.22", tags=TAG)
    result = dep.run("reconcile", missed, "--wait", "--json")
    assert result.code == 0, result.err
    doc = result.json()
    jsonschema.validate(doc, RECONCILE)
    assert doc["completed"] is True
    [change] = doc["changes"]
    assert change["instance_id"] == missed and change["change"] == "added"
    assert change["before"] is None
    assert change["after"]["status"] == "enrolled"
    assert change["after"]["public_ip"] == "203.0.113.10"
    assert doc["generation"] == {
        "before": {"desired": 0, "applied": 0},
        "after": {"desired": 1, "applied": 1},
    }


def test_reconcile_with_nothing_to_do_says_so(dep):
    web1 = dep.launch("10.10.1.21")
    dep.run("enroll", web1, "--wait")
    result = dep.run("reconcile", "--wait")
    assert result.code == 0
    assert "no changes" in result.out
    assert "generation desired 1 -> 1, applied 1 -> 1" in result.out


def test_reconcile_wait_times_out_when_nobody_consumes_the_queue(dep):
    result = dep.run("reconcile", "--wait", "--timeout", "20", "--interval", "5", react=False)
    assert result.code == 1
    assert "queue: 1 waiting, 0 in flight" in result.err
    assert "timed out after 20s waiting for the controller" in result.err


def test_reconcile_done_marker_ends_the_wait_at_once(dep):
    """A controller that records the request it finished (meta/reconcile) ends the wait."""

    def after_change(aws, change):
        dep.dynamodb.put_item(
            TableName=TABLE,
            Item={
                "pk": {"S": "meta"},
                "sk": {"S": "reconcile"},
                "request_id": {"S": change.message["id"]},
            },
        )

    dep.after_change = after_change
    result = dep.run("reconcile", "--wait")
    assert result.code == 0, result.err
    assert dep.clock.sleeps == []


def test_reconcile_without_the_queue(dep):
    dep.sqs.delete_queue(QueueUrl=dep.queue_url)
    result = dep.run("reconcile")
    assert result.code == 2
    assert result.err == (
        "tunnelnat: queue 'test-events' not found in region us-east-1: check --deployment and "
        "--region, or pass --queue-url\n"
    )


def test_reconcile_refuses_a_malformed_id(dep):
    result = dep.run("reconcile", "i-123; rm -rf /")
    assert result.code == 2 and "not an EC2 instance ID" in result.err
    assert "Messages" not in dep.sqs.receive_message(QueueUrl=dep.queue_url)
