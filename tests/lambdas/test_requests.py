"""Requests that come from operators rather than from AWS: reconcile requests and redriven
dead letters."""

from __future__ import annotations

import json
import uuid

from tests.lambdas.events import Context, sqs_batch, state_change
from tunnelnat.events import RECONCILE_REQUEST, parse_request
from tunnelnat.handlers.controller import handler

TAG = {"tunnelnat": "enabled"}


def reconcile_request(*instance_ids: str) -> dict:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": RECONCILE_REQUEST,
        "source": "tunnelnat.cli",
        "account": "123456789012",
        "time": "2026-11-25T12:00:00Z",
        "region": "us-east-1",
        "resources": [],
        "detail": {"instance-ids": list(instance_ids)},
    }


def test_a_handled_reconcile_request_is_marked_with_its_id(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    request = reconcile_request(web1)
    result = handler(sqs_batch(request), Context())
    assert result == {"batchItemFailures": []}
    marker = world.items("meta")["reconcile"]
    assert marker["request_id"]["S"] == request["id"]
    assert marker["instances"]["N"] == "1"
    assert marker["failures"]["N"] == "0"
    assert world.fleet.routes[web1] == {"192.0.2.0/24"}


def test_a_full_reconcile_request_counts_every_instance_it_looked_at(world):
    world.launch("10.10.1.21", tags=TAG)
    world.launch("10.10.1.22", tags=TAG)
    request = reconcile_request()
    handler(sqs_batch(request), Context())
    marker = world.items("meta")["reconcile"]
    assert marker["request_id"]["S"] == request["id"]
    assert marker["instances"]["N"] == "2"


def test_other_events_leave_no_reconcile_marker(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    handler(sqs_batch(state_change(web1, "running")), Context())
    assert "reconcile" not in world.items("meta")


def test_a_redriven_dead_letter_is_its_original_event(world):
    web1 = world.launch("10.10.1.21", tags=TAG)
    original = state_change(web1, "running")
    parked = {"event": json.dumps(original), "instance_ids": [web1], "reason": "agent offline"}
    request = parse_request(json.dumps(parked))
    assert request.instance_ids == (web1,)
    assert request.event_id == original["id"]
    assert handler(sqs_batch(parked), Context()) == {"batchItemFailures": []}
    assert world.fleet.routes[web1] == {"192.0.2.0/24"}
