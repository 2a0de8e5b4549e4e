"""Any SQS body at all beside a good event (issue 14): no exception escapes the controller's
handler, the good event is processed, and nothing unreadable is ever retried.

Bodies: any JSON value, JSON nested far deeper than the parser recurses, event-shaped JSON with
any value in any field, text that is not JSON (any Unicode, or bytes read as Latin-1), bodies
near SQS's 256 KiB, dead-letter wrappers around all of those, and junk message attributes."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lambdas.events import Context, sqs_batch, state_change
from tests.lambdas.test_controller_faults import FakeLifecycle
from tunnelnat.adapters.queue import FAILED_ATTEMPTS
from tunnelnat.handlers import controller as handler_module
from tunnelnat.handlers.controller import handler

KINDS = [
    "EC2 Instance State-change Notification",
    "Tag Change on Resource",
    "EC2 Instance-launch Lifecycle Action",
    "EC2 Instance-terminate Lifecycle Action",
    "Scheduled Event",
    "tunnelnat Reconcile Request",
]
SOURCES = ["aws.ec2", "aws.tag", "aws.autoscaling", "aws.events", "tunnelnat.cli", "tunnelnat"]
# Instances the bodies may name: none of them is the good one (a genuine terminate event for it
# would rightly unenrol it), one is a real untagged instance of the world.
FAKE_IDS = ["i-0123456789abcdef0", "i-00000000", "i-ffffffffffffffff0"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=24,
)
instance_ids = st.sampled_from(FAKE_IDS) | st.text(max_size=30)
details = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "instance-id": instance_ids,
            "state": st.sampled_from(["running", "stopped", "terminated"]) | st.text(max_size=10),
            "changed-tag-keys": st.lists(st.text(max_size=12), max_size=3) | json_values,
            "service": st.just("ec2") | json_values,
            "resource-type": st.just("instance") | json_values,
            "tags": st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3),
            "EC2InstanceId": instance_ids,
            "AutoScalingGroupName": st.just("web") | st.text(max_size=20),
            "LifecycleHookName": st.sampled_from(["tunnelnat-web", "codedeploy"])
            | st.text(max_size=20),
            "LifecycleActionToken": st.uuids().map(str) | st.text(max_size=20),
            "LifecycleTransition": st.sampled_from(
                ["autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"]
            )
            | st.text(max_size=20),
            "instance-ids": st.lists(instance_ids, max_size=5) | json_values,
        },
    ),
)
times = st.one_of(
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(
        ["2026-11-25T12:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"]
    ),
    json_values,
)
events = st.fixed_dictionaries(
    {"detail-type": st.sampled_from(KINDS) | json_values},
    optional={
        "version": st.just("0") | json_values,
        "id": st.uuids().map(str) | json_values,
        "source": st.sampled_from(SOURCES) | json_values,
        "account": st.just("123456789012") | json_values,
        "time": times,
        "region": st.just("us-east-1") | json_values,
        "resources": st.lists(
            st.sampled_from(FAKE_IDS).map(
                lambda i: f"arn:aws:ec2:us-east-1:123456789012:instance/{i}"
            )
            | st.text(max_size=40),
            max_size=3,
        )
        | json_values,
        "detail": details,
    },
)
deep = st.one_of(
    st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 60_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1, 60_000).map(lambda n: '{"detail-type": "Scheduled Event", "detail": ' + "[" * n),
)
encoded = st.tuples(json_values | events, st.booleans()).map(
    lambda pair: json.dumps(pair[0], ensure_ascii=pair[1])
)
large = st.integers(0, 250_000).map(
    lambda n: json.dumps({"detail-type": KINDS[0], "source": "aws.ec2", "pad": "x" * n})
)
not_json = st.text() | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
plain = st.one_of(encoded, deep, large, not_json)
wrapped = plain.map(lambda b: json.dumps({"event": b, "instance_ids": [], "reason": "x"}))
bodies = st.one_of(plain, wrapped)
attributes = st.one_of(st.none(), st.text(max_size=12), st.integers(-5, 10**9).map(str))


@pytest.fixture
def good(world, queues):
    """A tagged instance and the handler wired to moto's queues and a lifecycle port."""
    web = world.launch("10.10.1.21", tags={"tunnelnat": "enabled"})
    world.launch("10.10.1.22")  # a real instance the bodies may name, never tagged
    controller = handler_module._get_service().controller
    handler_module.use_controller(controller, lifecycle=FakeLifecycle())
    return web


STATS = {"examples": 0, "seconds": 0.0}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    bad=st.lists(st.tuples(bodies, attributes), min_size=1, max_size=4),
    position=st.integers(0, 4),
)
def test_any_body_beside_a_good_event(world, good, bad, position):
    started = time.monotonic()
    bodies = [body for body, _ in bad]
    at = min(position, len(bodies))
    bodies.insert(at, json.dumps(state_change(good, "running")))
    batch = sqs_batch(*bodies)
    for record, (_, attribute) in zip(
        [r for i, r in enumerate(batch["Records"]) if i != at], bad, strict=True
    ):
        if attribute is not None:
            record["messageAttributes"][FAILED_ATTEMPTS] = {
                "stringValue": attribute,
                "dataType": "Number",
            }
    result = handler(batch, Context())  # nothing escapes
    failed = {f["itemIdentifier"] for f in result["batchItemFailures"]}
    assert f"m-{at}" not in failed, "the good event beside the bad ones failed"
    record = world.items("instance")[good]
    assert record["status"]["S"] == "enrolled"
    assert world.fleet.applied_pairs() == {("10.10.1.21", "203.0.113.10")}
    STATS["examples"] += 1
    STATS["seconds"] += time.monotonic() - started
